"""Logging that never blocks the service: records go to a queue, a thread writes them out.

The access log is written from the event loop, once per request. Written straight to stderr, a
slow or full consumer (a pipe nobody reads, a stalled terminal, a log shipper) blocks the loop
and with it every request. ``queued_logging`` puts a ``QueueHandler`` on the root logger in
place of its handlers and lets a ``QueueListener`` thread feed them; at exit the listener
drains the queue and the handlers are put back.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import queue
from typing import Iterator


@contextlib.contextmanager
def queued_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers = list(root.handlers)
    records: queue.SimpleQueue = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
    for handler in handlers:
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(records))
    listener.start()
    try:
        yield
    finally:
        listener.stop()  # writes out what is queued
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
