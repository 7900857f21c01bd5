"""The two ASGI middlewares: the request-body size limit and per-route request latency.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: no extra task per request and no buffering
of the body, which matters both for latency and for enforcing the size limit as bytes arrive.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import RequestTooLarge, error_response
from service.metrics import Metrics


class BodySizeLimit:
    """413 for a body over max_bytes, before it is parsed.

    A declared Content-Length over the limit is refused without reading a byte. A chunked body (no
    Content-Length) or a body longer than declared is counted as it arrives, and the receive call
    that crosses the limit raises RequestTooLarge, which the app's error handler answers.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > limit:
                    refused = _too_large(limit)
                    if self.metrics is not None:  # the app's handler counts the other 413s
                        self.metrics.errors.labels(refused.code).inc()
                    await error_response(refused)(scope, receive, send)
                    return
                break
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"body: at most {limit} bytes allowed", field="body", limit=limit)


class RequestTiming:
    """Observes ctr_request_duration_seconds{route, method, status} for every HTTP request.

    With workers it also brings the worker's CPU counter up to date (Metrics.count_worker_cpu).

    The route label is the matched route's template (`/score`), never the raw path, so a scan of
    random URLs cannot blow up the label set: unmatched paths share the label `unmatched`. An
    answer given before the router ran (the body limit's 413, admission control's 503) is labelled
    with its path when that path is one of `paths`, the app's routes without parameters.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees when the app raises before answering

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or (
                scope["path"] if scope["path"] in self.paths else "unmatched"
            )
            self.metrics.request_seconds.labels(template, scope["method"], str(status)).observe(
                time.perf_counter() - start
            )
            self.metrics.count_worker_cpu()
