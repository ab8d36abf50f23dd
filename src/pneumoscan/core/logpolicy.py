"""What may be logged about untrusted files: codes and counts, never their contents.

pydicom's and Pillow's warnings quote what they read (a malformed IS value holding a patient's
name, an odd tag's value); their errors may carry tracebacks with the same text. The service, the
DICOM node and every command of the CLI log none of it: ``capture_decoder_warnings`` routes the ``warnings`` of decoding
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


class ContentFree(logging.Handler):
    """On each decoder library's logger (propagation off while capturing): its records, and its
    child loggers' records, are counted by code and written nowhere. On the loggers rather than on
    the root's handlers, so a handler added later (a command's run log, a queue) never sees them."""

    def emit(self, record_: logging.LogRecord) -> None:
        record(f"{record_.name}:{record_.lineno}:{record_.levelname.lower()}")


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


_depth = 0  # nested captures (the CLI's around a serve's or a node's) are one capture


@contextlib.contextmanager
def capture_decoder_warnings(every: bool = True) -> Iterator[None]:
    """While serving, or while a command runs: every warning shown and every decoder-library log
    record becomes a code and a count. Process-wide (warnings and loggers are). ``every``: count each
    occurrence (a server: how often a client sends a bad file); else the warning filters stay as
    configured (a command's ignored library warnings stay silent; others are counted once per
    place, as Python shows them). Re-entrant: an inner capture adds only its ``every``."""
    global _depth
    with _lock:
        _depth += 1
        outer = _depth == 1
    previous, filters = warnings.showwarning, warnings.filters[:]
    ours = ContentFree()
    loggers = [(logging.getLogger(name), logging.getLogger(name).propagate) for name in DECODER_LOGGERS]
    if every:  # also inside a command's capture: a server started by the CLI counts every occurrence
        warnings.simplefilter("always")
    if outer:
        warnings.showwarning = _showwarning
        for logger, _ in loggers:
            logger.addHandler(ours)
            logger.propagate = False
    try:
        yield
    finally:
        warnings.filters[:] = filters
        if outer:
            warnings.showwarning = previous
            for logger, propagate in loggers:
                logger.removeHandler(ours)
                logger.propagate = propagate
        with _lock:
            _depth -= 1
