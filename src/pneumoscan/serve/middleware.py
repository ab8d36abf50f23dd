"""ASGI middleware around the whole app: the access log and security headers (the early refusals
are ``serve.guard``).

Plain ASGI rather than ``BaseHTTPMiddleware``: the access log must see the response without
buffering it.
"""

from __future__ import annotations

import logging
import time
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("pneumoscan.serve.access")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class AccessLog:
    """One line per request: method, path, status, latency, bytes in and out.

    Deliberately nothing else: no query string, headers, client address, body or file name, so a
    log shipped off the machine carries no patient data.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status, received, sent = 500, 0, 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            access_log.info("%s %s %d %.1fms in=%dB out=%dB", scope["method"], scope["path"], status,
                            1000 * (time.perf_counter() - started), received, sent)


class SecurityHeaders:
    """Headers every answer carries: no MIME sniffing, no referrer, no framing by other sites."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, with_headers)
