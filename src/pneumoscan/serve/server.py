"""Running the app under uvicorn with the limits a hostile network needs (``pneumoscan serve``).

uvicorn covers the keep-alive idle timeout (``timeout_keep_alive``) and header size
(``h11_max_incomplete_event_size``), but a connection that sends nothing, or half a request line,
is kept forever, and nothing caps open connections until ``accept`` fails with "Too many open
files" (every later connection then fails and asyncio logs a traceback per try). So:

- ``guarded_protocol`` (uvicorn's h11 protocol, subclassed): the request head must arrive within
  ``header_timeout_s`` of the connection opening or of the previous answer (half a head gets 408,
  nothing at all a silent close), and at ``max_connections`` a new connection evicts the longest
  idle one (no request under way) or, when none is idle, is closed at once;
- ``raise_fd_limit``: the soft open-file limit raised to the hard one, with the connection cap kept
  below it, so accept never runs out of descriptors;
- ``GracefulServer``: SIGTERM / SIGINT stop accepting and start the Guard's drain (in-flight
  requests get ``grace_s``, then 503), and the process exits 0 instead of re-raising the signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import threading
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pneumoscan.serve.guard import GuardState

log = logging.getLogger(__name__)

FD_RESERVE = 64  # descriptors kept free for the model, logs, temp files
MAX_HEAD_BYTES = 16 * 1024  # request line + headers; more is answered 400 by h11 (uvicorn's default, made explicit)


@dataclass(frozen=True)
class ServerSettings:
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    max_connections: int = 1000
    grace_s: float = 10.0


def _timeout_response() -> bytes:
    body = b'{"error": "timeout", "detail": "the request head did not arrive in time"}'
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request-head deadline and a connection cap."""

    class Guarded(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _idle_since: float | None = None  # loop time since which no request is under way

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                idle = [c for c in self.connections if c is not self and getattr(c, "_idle_since", None) is not None]
                if not idle:
                    transport.abort()
                    return
                min(idle, key=lambda c: c._idle_since)._close_quietly()
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._idle_since = self.loop.time()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is not None and self.conn.their_state is not h11.IDLE:
                self._disarm()  # the head is complete: the Guard's body deadline takes over
                self._idle_since = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.trailing_data[0]:  # half a head: say why before closing
                self.transport.write(_timeout_response())
            self._close_quietly()

        def _close_quietly(self) -> None:
            self._disarm()
            self._idle_since = None
            self.transport.close()

    return Guarded


def raise_fd_limit(wanted_connections: int) -> int:
    """Raise the soft open-file limit as far as allowed; the connection cap that fits under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted_connections + 4 * FD_RESERVE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    fits = max(1, soft - FD_RESERVE)
    if fits < wanted_connections:
        log.warning("open-file limit %d allows %d connections, fewer than the %d asked for", soft, fits,
                    wanted_connections)
    return min(wanted_connections, fits)


class GracefulServer(uvicorn.Server):
    """A SIGTERM/SIGINT starts the Guard's drain and ends in exit 0 rather than a re-raised signal."""

    def __init__(self, config: uvicorn.Config, guard: GuardState, grace_s: float) -> None:
        super().__init__(config)
        self.guard = guard
        self.grace_s = grace_s
        self.stopped_by_signal = False

    def handle_exit(self, sig, frame) -> None:
        self.stopped_by_signal = True
        if not self.should_exit:
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(self.guard.drain, self.grace_s)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(app, host: str, port: int, settings: ServerSettings) -> GracefulServer:
    """Run ``app`` until a signal; the caller exits 0 afterwards."""
    connections = raise_fd_limit(settings.max_connections)
    config = uvicorn.Config(
        app, host=host, port=port, access_log=False, log_config=None, server_header=False,
        http=guarded_protocol(settings.header_timeout_s, connections), timeout_keep_alive=settings.keep_alive_s,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        # uvicorn cancels what is still running a second after the Guard has answered it 503
        timeout_graceful_shutdown=settings.grace_s + 1, backlog=min(2048, connections))
    server = GracefulServer(config, app.state.guard, settings.grace_s)
    server.run()
    return server
