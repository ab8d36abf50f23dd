"""Scoring for many concurrent requests: one bounded FIFO queue, micro-batches, one worker thread.

Each request puts its decoded images in the queue and awaits a ``concurrent.futures.Future``
(decoding still runs in parallel in the threadpool). The worker takes up to ``max_batch``
images (what is queued, then, if that was more than one request, waiting at most
``max_wait_ms`` for more), scores them in one engine call and hands each caller its rows. Compared with requests taking turns on a lock, the FIFO order bounds
the tail (no request starves while others barge in), and a full queue is refused at once with
``Busy`` (HTTP 503 and Retry-After) rather than letting latency grow without limit; a request
whose turn came after ``timeout_s`` is dropped unscored (``TimedOut``, HTTP 504).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pneumoscan.serve import settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSettings:
    max_batch: int = settings.DEFAULT_MICRO_BATCH
    max_wait_ms: float = settings.DEFAULT_MAX_WAIT_MS
    queue_size: int = settings.DEFAULT_QUEUE_SIZE
    timeout_s: float = settings.DEFAULT_SCORE_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.queue_size < 1 or self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError(f"invalid batch settings {self}")

    def describe(self) -> str:
        batching = (f"up to {self.max_batch} images per model call (waiting at most {self.max_wait_ms:g} ms "
                    "for a batch to fill)") if self.max_batch > 1 else "one request per model call"
        return (f"Requests are scored in arrival order, {batching}. At most {self.queue_size} requests wait; "
                f"beyond that the answer is 503 `busy` with a Retry-After header, and a request not scored "
                f"within {self.timeout_s:g} s gets 504 `timeout`.")


class Busy(Exception):
    """The queue is full: try again after ``retry_after`` seconds."""

    def __init__(self, detail: str, retry_after: int = settings.RETRY_AFTER_S):
        super().__init__(detail)
        self.detail, self.retry_after = detail, retry_after


class TimedOut(Exception):
    """The request waited longer than the limit and was not scored."""


@dataclass
class _Item:
    images: np.ndarray
    future: Future
    deadline: float


class MicroBatcher:
    """``submit(images) -> Future`` of ``score(images)``'s rows, scored in FIFO micro-batches.

    ``score`` maps uint8 (N, H, W) to a sequence of N results; it runs only on the worker thread.
    """

    def __init__(self, score: Callable[[np.ndarray], list], config: BatchSettings = BatchSettings()):
        self.score, self.config = score, config
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=config.queue_size)
        self.batch_sizes: list[int] = []  # images per engine call, for tests and benchmarks (last 1000)
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="pneumoscan-scorer", daemon=True)
        self._worker.start()

    def submit(self, images: np.ndarray) -> Future:
        if self._closed:  # no worker will take it: say so now, not after the timeout (an app used past
            # its lifespan, e.g. a TestClient outside ``with`` after the ``with`` block closed the service)
            raise Busy("the server is shutting down; retry shortly")
        future: Future = Future()
        item = _Item(images, future, time.monotonic() + self.config.timeout_s)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise Busy(f"the server is busy: {self.config.queue_size} requests are already waiting to be "
                       f"scored; retry in {settings.RETRY_AFTER_S} s") from None
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after the requests already queued; later submits are refused at once."""
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout)

    def _take(self) -> tuple[list[_Item], bool]:
        """The next micro-batch (at least one item), and whether close() was called.

        It takes what is already queued, and waits up to ``max_wait_ms`` for more only when it
        found some (the sign of load): a lone request is never held back waiting for company,
        which at one client cost ~20% of throughput in benchmarks/load_test.py."""
        first = self._queue.get()
        if first is None:
            return [], True
        items, n = [first], len(first.images)
        wait_until = None
        while n < self.config.max_batch:
            try:
                if wait_until is None:
                    item = self._queue.get_nowait()
                else:
                    item = self._queue.get(timeout=max(0.0, wait_until - time.monotonic()))
            except queue.Empty:
                if wait_until is not None or len(items) == 1 or not self.config.max_wait_ms:
                    break
                wait_until = time.monotonic() + self.config.max_wait_ms / 1000
                continue
            if item is None:
                self._score(items)
                return [], True
            items.append(item)
            n += len(item.images)
        return items, False

    def _run(self) -> None:
        while True:
            items, closing = self._take()
            if items:
                self._score(items)
            if closing:
                return

    def _score(self, items: list[_Item]) -> None:
        now = time.monotonic()
        live = []
        for item in items:
            if not item.future.set_running_or_notify_cancel():
                continue  # the caller gave up already
            if now > item.deadline:
                item.future.set_exception(TimedOut(f"not scored within {self.config.timeout_s:g} s"))
            else:
                live.append(item)
        if not live:
            return
        try:
            rows = list(self.score(np.concatenate([item.images for item in live])))
        except Exception as exc:  # every caller hears of it; none is left waiting
            log.exception("scoring a batch of %d requests failed", len(live))
            for item in live:
                item.future.set_exception(exc)
            return
        self.batch_sizes = self.batch_sizes[-999:] + [len(rows)]
        start = 0
        for item in live:
            item.future.set_result(rows[start:start + len(item.images)])
            start += len(item.images)
