"""The service's scoring queue: answers reach their own callers, a full queue says busy, waits end."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pneumoscan.serve.app import create_app
from pneumoscan.serve.batcher import BatchSettings, Busy, MicroBatcher, TimedOut
from test_serve import encode, xray


def _tagged(tag: int, n: int) -> np.ndarray:
    return np.full((n, 2, 2), tag, dtype=np.uint8)


def test_each_caller_gets_its_own_rows_in_order():
    calls: list[int] = []

    def score(images):
        calls.append(len(images))
        time.sleep(0.01)  # slow enough for requests to pile up into batches
        return [(int(im[0, 0]), int(im[1, 1])) for im in images]

    batcher = MicroBatcher(score, BatchSettings(max_batch=8, max_wait_ms=5, queue_size=100))
    results: dict[int, list] = {}

    def client(tag: int) -> None:
        images = _tagged(tag, 1 + tag % 3)
        images[:, 1, 1] = np.arange(len(images))  # row order inside one request
        results[tag] = batcher.submit(images).result(timeout=10)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert results == {t: [(t, i) for i in range(1 + t % 3)] for t in range(40)}
    assert max(calls) > 1 and sum(calls) == sum(1 + t % 3 for t in range(40))  # batched, nothing lost


def test_full_queue_is_refused_and_a_failure_reaches_every_caller():
    release = threading.Event()

    def score(images):
        release.wait(10)
        raise RuntimeError("engine broke")

    batcher = MicroBatcher(score, BatchSettings(max_batch=1, max_wait_ms=0, queue_size=2))
    running = batcher.submit(_tagged(1, 1))
    while batcher._queue.qsize():  # the worker has taken the first one and is stuck in score
        time.sleep(0.001)
    queued = [batcher.submit(_tagged(2, 1)), batcher.submit(_tagged(3, 1))]
    with pytest.raises(Busy, match="busy"):
        batcher.submit(_tagged(4, 1))
    release.set()
    for future in [running, *queued]:
        with pytest.raises(RuntimeError, match="engine broke"):
            future.result(timeout=10)
    batcher.close()


def test_request_past_its_deadline_is_not_scored():
    release, scored = threading.Event(), []

    def score(images):
        release.wait(10)
        scored.append(int(images[0, 0, 0]))
        return [0] * len(images)

    batcher = MicroBatcher(score, BatchSettings(max_batch=1, max_wait_ms=0, queue_size=4, timeout_s=0.05))
    first = batcher.submit(_tagged(1, 1))
    late = batcher.submit(_tagged(2, 1))
    time.sleep(0.1)
    release.set()
    assert first.result(timeout=10) == [0]
    with pytest.raises(TimedOut):
        late.result(timeout=10)
    batcher.close()
    assert scored == [1]


def test_submit_after_close_is_refused_at_once():
    """A closed batcher has no worker: a submit would wait its whole timeout, stay queued, and
    fill the queue (then 503 for everyone). This is what an app used past its lifespan showed
    (a TestClient outside ``with`` after a ``with`` block ended): refused now, with the reason."""
    batcher = MicroBatcher(lambda images: [0] * len(images), BatchSettings(queue_size=1, timeout_s=30))
    assert batcher.submit(_tagged(1, 1)).result(timeout=10) == [0]
    batcher.close()
    with pytest.raises(Busy, match="shutting down"):
        batcher.submit(_tagged(2, 1))


@pytest.mark.slow  # seconds of a real server or model; make test runs it
def test_service_answers_503_busy_with_retry_after_then_recovers(trained_model):
    app = create_app(trained_model, api_key=None, batching=BatchSettings(max_batch=1, queue_size=1, timeout_s=20))
    body = {"file": ("x.png", encode(xray(size=64), "PNG"))}
    with TestClient(app) as client:
        batcher = app.state.service.batcher
        real, entered, release = batcher.score, threading.Event(), threading.Event()

        def stuck(images):
            entered.set()
            release.wait(20)
            return real(images)

        batcher.score = stuck
        answers = []
        waiting = [threading.Thread(target=lambda: answers.append(client.post("/v1/predict", files=body)))
                   for _ in range(2)]
        waiting[0].start()
        assert entered.wait(20)  # the worker is scoring the first request
        waiting[1].start()
        while batcher._queue.qsize() < 1:  # the second waits in the (full) queue
            time.sleep(0.005)
        refused = client.post("/v1/predict", files=body)
        release.set()
        for t in waiting:
            t.join(30)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == "busy" and "retry" in refused.json()["detail"]
    assert [a.status_code for a in answers] == [200, 200]
