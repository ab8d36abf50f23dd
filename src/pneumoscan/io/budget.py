"""A memory budget for decoding, in bytes, estimated from the header before a pixel is decoded.

A pixel limit alone does not bound memory: a 1.6 MB RLE DICOM of 7071 x 7071 16-bit pixels sits
under 50 M pixels yet decoded through float64 copies to +1.6 GB, and eight at once took 4 GB. So
every decode states what it will allocate (rows x columns x bytes per sample x frames x samples,
plus the copies the conversion to 8-bit makes) and:

- is refused (``OverBudget``, one reason, HTTP 413 in the service) when that is over the
  per-image budget;
- otherwise holds that many bytes of one process-wide budget while it decodes, so concurrent
  decodes together stay under ``total`` and a few large files make the others wait rather than
  the machine swap (``BudgetBusy`` when the wait exceeds ``wait_s``: HTTP 503).

The DICOM node and the REST service share this one budget because they share the process.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from pneumoscan.core.errors import ImageError

MiB = 2**20
DEFAULT_DECODE_BUDGET_BYTES = 256 * MiB  # one image: a 50 M-pixel 16-bit radiograph and its 8-bit copy fit
DEFAULT_TOTAL_DECODE_BYTES = 512 * MiB  # all decodes at once
DEFAULT_WAIT_S = 30.0


class OverBudget(ImageError):
    """The image would take more memory to decode than one image may."""


class BudgetBusy(ImageError):
    """Other decodes hold the budget for longer than a request may wait."""


class ByteBudget:
    """A counting semaphore on bytes (threads decode, so a threading.Condition)."""

    def __init__(self, per_decode: int, total: int, wait_s: float = DEFAULT_WAIT_S) -> None:
        self.per_decode = int(per_decode)
        self.total = max(int(total), self.per_decode)  # one image at the limit must always fit
        self.wait_s = wait_s
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()

    def check(self, n_bytes: int, name: str) -> None:
        if n_bytes > self.per_decode:
            raise OverBudget(name, f"decoding it would take about {n_bytes / MiB:,.0f} MiB of memory; the limit "
                                   f"is {self.per_decode / MiB:,.0f} MiB per image")

    @contextlib.contextmanager
    def hold(self, n_bytes: int, name: str) -> Iterator[None]:
        self.check(n_bytes, name)
        with self._cond:
            if not self._cond.wait_for(lambda: self.in_use + n_bytes <= self.total, timeout=self.wait_s):
                raise BudgetBusy(name, "the server is busy decoding other large images; retry later")
            self.in_use += n_bytes
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= n_bytes
                self._cond.notify_all()


_budget = ByteBudget(DEFAULT_DECODE_BUDGET_BYTES, DEFAULT_TOTAL_DECODE_BYTES)


def configure(per_decode: int, total: int, wait_s: float = DEFAULT_WAIT_S) -> ByteBudget:
    """Replace the process-wide budget (``pneumoscan serve --decode-budget-mb``); returns it."""
    global _budget
    _budget = ByteBudget(per_decode, total, wait_s)
    return _budget


def current() -> ByteBudget:
    return _budget


def hold(n_bytes: int, name: str):
    """Hold ``n_bytes`` of the process-wide budget while decoding (a context manager)."""
    return _budget.hold(n_bytes, name)


def pixel_limit_reason(width: int, height: int, limit: int) -> str:
    """The one message for too many pixels: the real size, not the limit plus one."""
    return f"the image is {width:,} x {height:,} = {width * height:,} pixels, over the limit of {limit:,}"


# bytes per pixel as Pillow stores each mode (multi-band modes take 4 bytes a pixel)
_PIL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


def pil_bytes(mode: str, width: int, height: int) -> int:
    """What Pillow allocates for the decoded image, plus the 8-bit copy and (palette) RGBA copy
    the conversion to grayscale makes."""
    n = width * height
    stored = _PIL_BYTES.get(mode, 4)
    extra = 4 if mode in ("P", "PA") else 0
    return n * (stored + extra + 1)


def dicom_bytes(rows: int, cols: int, bits_allocated: int, frames: int, samples: int, compressed: bool) -> int:
    """The pixel array, the decoder's own buffer for compressed data, and the 8-bit output."""
    n = rows * cols * frames * samples
    stored = n * max(1, bits_allocated // 8)
    return stored * (2 if compressed else 1) + n
