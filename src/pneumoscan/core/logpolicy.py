"""What may be logged about untrusted files: codes and counts, never their contents.

pydicom's and Pillow's warnings quote what they read (a malformed IS value holding a patient's
name, an odd tag's value); their errors may carry tracebacks with the same text. The service and
the DICOM node log none of it: ``capture_decoder_warnings`` routes the ``warnings`` of decoding
libraries and the log records of their loggers to one line each, "decoder warning <code>
(<n> so far)", where the code is the library module, line and warning class (no message text,
no arguments, no traceback), logged the first time and at each power of two after, so a client
looping a bad file cannot flood the log.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections import Counter
from typing import Iterator

log = logging.getLogger("pneumoscan.decoder")

DECODER_LOGGERS = ("pydicom", "PIL", "pylibjpeg", "openjpeg", "libjpeg", "pynetdicom.dsutils")
DECODER_MODULES = ("pydicom", "PIL", "pylibjpeg", "openjpeg", "libjpeg", "numpy", "highdicom", "pynetdicom")

_counts: Counter[str] = Counter()
_lock = threading.Lock()


def record(code: str) -> int:
    """Count one occurrence of ``code`` and log it the 1st, 2nd, 4th, 8th... time; the count."""
    with _lock:
        _counts[code] += 1
        n = _counts[code]
    if n & (n - 1) == 0:
        log.warning("decoder warning %s (%d so far)", code, n)
    return n


def counts() -> dict[str, int]:
    with _lock:
        return dict(_counts)


class ContentFree(logging.Filter):
    """On the root's handlers: a decoder library's record (its logger or a child) is counted by
    code and not written."""

    def filter(self, record_: logging.LogRecord) -> bool:
        if not any(record_.name == n or record_.name.startswith(n + ".") for n in DECODER_LOGGERS):
            return True
        record(f"{record_.name}:{record_.lineno}:{record_.levelname.lower()}")
        return False


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    module = filename.replace("\\", "/")
    for root in DECODER_MODULES:
        marker = f"/{root}/"
        if marker in module:
            module = root + "/" + module.split(marker, 1)[1]
            break
    else:
        module = module.rsplit("/", 1)[-1]  # a path outside the libraries: its file name only
    record(f"{module}:{lineno}:{category.__name__}")


@contextlib.contextmanager
def capture_decoder_warnings() -> Iterator[None]:
    """While serving: every ``warnings.warn`` and every decoder-library log record becomes a code
    and a count. Process-wide (warnings and loggers are), so only servers turn it on."""
    previous = warnings.showwarning
    filters = warnings.filters[:]
    ours = ContentFree()
    handlers = list(logging.getLogger().handlers)
    warnings.simplefilter("always")  # every occurrence counted (and none printed)
    warnings.showwarning = _showwarning
    for h in handlers:
        h.addFilter(ours)
    try:
        yield
    finally:
        warnings.showwarning = previous
        warnings.filters[:] = filters
        for h in handlers:
            h.removeFilter(ours)
