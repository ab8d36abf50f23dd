"""ASGI middleware around the whole app: the access log, early size refusal, security headers.

Plain ASGI rather than ``BaseHTTPMiddleware``: the size check must answer before the body is read,
and the access log must see the response without buffering it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

from starlette.datastructures import Headers
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


class ContentLengthLimit:
    """413 from the Content-Length header alone, before a byte of the body is read.

    Bodies without the header (chunked) are counted while read by the routes' own
    ``max_body_size``; this is the cheap early answer for honest clients.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int | None], detail_for: Callable[[str], str]) -> None:
        self.app = app
        self.limit_for = limit_for
        self.detail_for = detail_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            limit = self.limit_for(scope["path"])
            declared = Headers(scope=scope).get("content-length", "")
            if limit is not None and declared.isdigit() and int(declared) > limit:
                body = json.dumps({"error": "request_too_large", "detail": self.detail_for(scope["path"])}).encode()
                await send({"type": "http.response.start", "status": 413, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
