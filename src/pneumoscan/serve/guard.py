"""The door of the service: what is decided from the request line and headers, before a body byte.

One pure ASGI middleware (``Guard``), because ``BaseHTTPMiddleware`` reads nothing lazily enough:

- the API key is checked first, so an unauthenticated upload costs its headers, not its body
  (an attacker could otherwise make the server spool gigabytes it would then refuse);
- Content-Length over the route's limit is refused from the header; a body without one (chunked)
  is counted while it streams and cut at the limit;
- requests in flight are capped (503 + Retry-After beyond), and while the server drains after
  SIGTERM new requests get the same 503;
- the body must arrive within a deadline (a slow client gets 408): uvicorn has no such knob.

Every early answer carries ``Connection: close``: with an unread body left on the socket the only
safe thing is to drop the connection, or the server would go on reading what it refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

OPEN_PATHS = ("/v1/health",)  # liveness stays open: load balancers call it without a key
KEY_DETAIL = "missing or wrong API key (send it in the X-API-Key header)"


@dataclass
class GuardState:
    """Settings and counters shared by the middleware and the server (which starts a drain)."""

    api_key: str | None
    body_limit: Callable[[str], int]
    body_detail: Callable[[str], str]
    max_in_flight: int = 64
    body_timeout_s: float = 60.0
    retry_after_s: int = 1
    in_flight: int = 0
    draining: bool = False
    released: bool = False  # the drain's grace is over: what still runs is answered 503
    _waiters: set = field(default_factory=set, repr=False)

    def drain(self, grace_s: float) -> None:
        """From now on refuse new requests; in-flight ones get ``grace_s`` to finish."""
        self.draining = True
        asyncio.get_running_loop().call_later(grace_s, self._release)

    def _release(self) -> None:
        self.released = True
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_result(None)

    def grace_over(self) -> asyncio.Future:
        """A future of the running loop that completes when the drain's grace is over."""
        waiter = asyncio.get_running_loop().create_future()
        if self.released:
            waiter.set_result(None)
        else:
            self._waiters.add(waiter)
            waiter.add_done_callback(self._waiters.discard)
        return waiter


class _Cut(Exception):
    """Raised from ``receive`` when the body broke a rule; the middleware answers for the app."""


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def answer(send: Send, status: int, error: str, detail: str, extra: list | None = None) -> None:
    """A JSON error that closes the connection (the body, if any, stays unread)."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app: ASGIApp, state: GuardState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st = self.state
        retry = [(b"retry-after", str(st.retry_after_s).encode())]
        if st.draining:
            return await answer(send, 503, "busy", "the server is shutting down; retry shortly", retry)
        if st.api_key and _needs_key(scope) and not _key_ok(_header(scope, b"x-api-key"), st.api_key):
            return await answer(send, 401, "unauthorized", KEY_DETAIL)
        limit = st.body_limit(scope["path"])
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await answer(send, 413, "request_too_large", st.body_detail(scope["path"]))
        if st.in_flight >= st.max_in_flight and scope["path"] not in OPEN_PATHS:  # liveness stays answerable
            return await answer(send, 503, "busy", f"{st.max_in_flight} requests are in progress; retry later", retry)
        st.in_flight += 1
        try:
            await _Request(self.app, st, scope, receive, send, limit).run()
        finally:
            st.in_flight -= 1


def _needs_key(scope: Scope) -> bool:
    path = scope["path"]
    return path.startswith("/v1/") and path not in OPEN_PATHS and scope["method"] != "OPTIONS"


def _key_ok(given: str | None, expected: str) -> bool:
    return bool(given) and secrets.compare_digest(given.encode(), expected.encode())


class _Request:
    """One admitted request: its body counted and timed, its answer replaced when a rule broke."""

    def __init__(self, app: ASGIApp, st: GuardState, scope: Scope, receive: Receive, send: Send, limit: int):
        self.app, self.st, self.scope, self._receive, self._send = app, st, scope, receive, send
        self.limit = limit
        self.received = 0
        self.body_done = False
        self.started = False  # the app's response has begun
        self.verdict: tuple[int, str, str] | None = None
        self.deadline = asyncio.get_running_loop().time() + st.body_timeout_s

    async def receive(self) -> Message:
        if self.verdict is not None:
            raise _Cut()
        if self.body_done:
            return await self._receive()
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self._receive(), max(remaining, 0.001))
        except TimeoutError:
            self.verdict = (408, "timeout", f"the request body did not arrive within {self.st.body_timeout_s:g} s")
            raise _Cut() from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.verdict = (413, "request_too_large", self.st.body_detail(self.scope["path"]))
                raise _Cut()
            self.body_done = not message.get("more_body", False)
        return message

    async def send(self, message: Message) -> None:
        if self.verdict is not None and not self.started:
            return  # the app answers a cut body (often 400): ours replaces it
        if message["type"] == "http.response.start":
            self.started = True
            if not self.body_done:  # answered before the body was read (400, 422...): do not read it
                message = message | {"headers": [*message.get("headers", []), (b"connection", b"close")]}
        await self._send(message)

    async def run(self) -> None:
        task = asyncio.ensure_future(self.app(self.scope, self.receive, self.send))
        drained = self.st.grace_over()
        try:
            await asyncio.wait({task, drained}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():  # the drain's grace is over
                task.cancel()
                if not self.started:
                    self.verdict = (503, "busy", "the server is shutting down; retry shortly")
            try:
                await task
            except (_Cut, asyncio.CancelledError):
                pass
            except Exception:
                if self.verdict is None:
                    raise
        finally:
            drained.cancel()
            if not task.done():  # this request itself was cancelled: take the app with it
                task.cancel()
        if self.verdict is not None and not self.started:
            status, error, detail = self.verdict
            extra = [(b"retry-after", str(self.st.retry_after_s).encode())] if status == 503 else []
            log.info("request refused: %d %s", status, error)
            self.started = True
            await answer(self._send, status, error, detail, extra)
