"""ASGI middleware of the gateway: body size limit, API key, metrics.

Written as plain ASGI rather than Starlette's BaseHTTPMiddleware, which adds
a task and a stream per request on the hottest path of the server.
"""

from __future__ import annotations

import hmac
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quanta.serving.api import error_response
from quanta.serving.metrics import Metrics

__all__ = ["BodyLimitMiddleware", "APIKeyMiddleware", "MetricsMiddleware"]


class BodyLimitMiddleware:
    """Answer 413 to a request body over `max_bytes`, without reading past it."""

    def __init__(self, app: ASGIApp, *, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)

        # Read the body here, stopping at the limit; the app gets it replayed.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], then=receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = (
            f"request body is larger than the limit of {self.max_bytes} bytes; send fewer "
            "or shorter inputs, or raise the server's --max-body-mb"
        )
        # Close the connection: the rest of the body is not read.
        response = error_response(413, message, "body_too_large", headers={"connection": "close"})
        await response(scope, receive, send)


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


class APIKeyMiddleware:
    """Require `Authorization: Bearer <key>` on every route under /v1/."""

    def __init__(self, app: ASGIApp, *, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = (
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                    "with the key the server was started with"
                )
                response = error_response(
                    401, message, "invalid_api_key", headers={"www-authenticate": "Bearer"}
                )
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class MetricsMiddleware:
    """Count requests by route and status and time them."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # unknown paths share one label, so scanning clients cannot grow the series
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
