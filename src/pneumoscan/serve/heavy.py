"""Large decodes in a separate, low-priority process, so they cannot starve everyone else.

Decoding a 50 M-pixel 16-bit DICOM takes seconds of CPU, much of it holding the GIL (pydicom's
RLE decoder, numpy over strips). In the server's own process two clients looping such files cut
well-behaved clients from 15 to 2 answers a second on two cores: the event loop and the scoring
thread wait for the GIL. Uploads whose estimated decode (``io.budget``) is over ``HEAVY_BYTES``
therefore go to one worker process (spawned, so it holds no torch and no threads) running at
the lowest CPU priority: one heavy decode at a time, its memory out of the server's, and the CPU
to the light requests first. The worker applies the same decode budget and the same checks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import multiprocessing
import os

from pneumoscan.io import budget
from pneumoscan.serve import uploads

HEAVY_BYTES = 64 * 2**20  # a 3000 x 3000 16-bit compressed radiograph (~45 MB) stays in-process


def _start_worker(per_decode: int, total: int) -> None:
    os.nice(19)
    budget.configure(per_decode, total)


def _decode(blob: bytes, size: int, limits: uploads.Limits):
    """In the worker: the picture, or the rejection as plain values (Rejected does not pickle)."""
    try:
        return uploads.to_model_input(blob, size, limits)
    except uploads.Rejected as r:
        return (r.status, r.error, r.detail)


class HeavyLane:
    def __init__(self) -> None:
        shared = budget.current()
        self.pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker, initargs=(shared.per_decode, shared.per_decode))

    def warm(self) -> None:
        """Start the worker now, not on the first large upload."""
        self.pool.submit(os.getpid).result(timeout=120)

    async def decode(self, blob: bytes, size: int, limits: uploads.Limits):
        result = await asyncio.wrap_future(self.pool.submit(_decode, blob, size, limits))
        if isinstance(result, tuple):
            raise uploads.Rejected(*result)
        return result

    def close(self) -> None:
        """Stop the worker and free the pool's queues now: the server leaves by ``os._exit``
        (cli.serve_command.exit_now), which skips the finalizers that would unlink their named
        semaphores, and multiprocessing's resource tracker then warns of leaked semaphores on stderr."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = None
        gc.collect()


def estimate(blob: bytes, limits: uploads.Limits) -> int:
    """The decode estimate of an acceptable upload (``Rejected`` for what ``uploads.check`` refuses)."""
    kind = uploads.check(blob, limits)
    try:
        return uploads.decode_bytes(blob, kind)
    except Exception:  # unreadable header details: the decode itself will say why
        return 0
