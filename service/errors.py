"""The service's exception tree and the one handler that turns any of them into a JSON answer.

    ServiceError (500)
    ├── InvalidRequest (422)          a client mistake; names the field and, when any, the limit
    │   ├── RequestTooLarge (413)     body over max_body_bytes (checked before parsing)
    │   ├── UnsupportedMediaType (415)
    │   └── RequestTimeout (408)      body not received within body_timeout_ms (slow client)
    ├── Unauthorized (401)            admin call without the right bearer token
    ├── NotFound (404)                unknown route, or the admin endpoint while it is off
    ├── MethodNotAllowed (405)
    ├── BundleRejected (409)          a model bundle failed its checks (load or reload)
    ├── HistoryUnavailable (503)      Redis missed the deadline or is down (fail policy)
    ├── Overloaded (503)              admission queue full or waited too long (service/overload.py)
    ├── DeadlineExceeded (504)        the caller's X-Request-Deadline-Ms passed before the answer
    └── InferenceFailed (500)         onnxruntime raised

A client that hangs up before its body has arrived (Starlette's ClientDisconnect) is not an error
of ours and gets no answer: it is counted as `client_disconnected` and timed with status 499
(nginx's "client closed request"), without a log line.

Each class carries its status and a stable `code`; service_error_handler reads them, so adding an
error never means adding a handler. Foreign exceptions are translated where they enter (history.py
for Redis, model.py for onnxruntime) and pydantic / Starlette errors are translated here, so every
4xx has the same body:

    {"error": "invalid_request", "message": "candidates: at most 1000 allowed (got 1001)",
     "field": "candidates", "limit": 1000, "errors": [{"field": ..., "message": ..., ...}]}
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

logger = logging.getLogger(__name__)

MAX_LISTED_ERRORS = 20  # a 10^4-candidate garbage body must not produce a 10^4-entry answer


class ServiceError(Exception):
    """Base of every error the service answers with; status and code are per class."""

    status: int = 500
    code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        limit: int | float | None = None,
        errors: Sequence[Mapping[str, Any]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.limit = limit
        self.errors = list(errors)
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field is not None:
            payload["field"] = self.field
        if self.limit is not None:
            payload["limit"] = self.limit
        if self.errors:
            payload["errors"] = self.errors
        return payload


class InvalidRequest(ServiceError):
    status = 422
    code = "invalid_request"


class RequestTooLarge(InvalidRequest):
    status = 413
    code = "body_too_large"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ServiceError):
    status = 405
    code = "method_not_allowed"


class BundleRejected(ServiceError):
    """A bundle failed a check: missing file, checksum, tensor contract, self-check, settings."""

    status = 409
    code = "bundle_rejected"


class HistoryUnavailable(ServiceError):
    """Redis missed the deadline (reason "timeout") or failed (reason "connection")."""

    status = 503
    code = "history_unavailable"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})
        self.reason = reason


class RequestTimeout(InvalidRequest):
    """The client sent its body too slowly (slow-loris); the connection is closed after this."""

    status = 408
    code = "request_timeout"


class Overloaded(ServiceError):
    """Admission control refused the request: too many in flight and the queue full or too slow."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str, *, reason: str, retry_after_seconds: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_seconds)})
        self.reason = reason


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed while the request waited or ran; its work was dropped."""

    status = 504
    code = "deadline_exceeded"


class InferenceFailed(ServiceError):
    status = 500
    code = "inference_failed"


def error_response(exc: ServiceError) -> Response:
    headers = dict(exc.headers)
    if exc.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return Response(
        orjson.dumps(exc.body()),
        status_code=exc.status,
        headers=headers,
        media_type="application/json",
    )


async def service_error_handler(request: Request, exc: Exception) -> Response:
    """The one handler: every ServiceError answers with its own status and body."""
    assert isinstance(exc, ServiceError)
    count_error(request, exc)
    if exc.status >= 500:
        # Logged here, where it is handled, once. 503s are expected under the fail policy and are
        # counted in metrics; a traceback per request would flood the log during an outage.
        if exc.status == 500:
            logger.error(
                "%s %s: %s",
                request.method,
                request.url.path,
                exc.message,
                exc_info=exc.__cause__ or exc,
            )
    return error_response(exc)


def count_error(request: Request, exc: ServiceError) -> None:
    """ctr_errors_total{code}; the app keeps its Metrics on app.state (see app.py)."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(exc.code).inc()


def invalid_from_validation(
    errors: Iterable[Mapping[str, Any]], drop_prefix: tuple[str, ...] = ()
) -> InvalidRequest:
    """A pydantic error list -> one InvalidRequest naming the first field and listing the rest."""
    listed: list[dict[str, Any]] = []
    total = 0
    for error in errors:
        total += 1
        if len(listed) >= MAX_LISTED_ERRORS:
            continue
        loc = tuple(error.get("loc", ()))
        if loc[: len(drop_prefix)] == drop_prefix:
            loc = loc[len(drop_prefix) :]
        entry: dict[str, Any] = {
            "field": ".".join(str(part) for part in loc) or "body",
            "message": str(error.get("msg", "invalid value")),
            "type": str(error.get("type", "value_error")),
        }
        limit = _limit_of(error.get("ctx") or {})
        if limit is not None:
            entry["limit"] = limit
        listed.append(entry)
    if not listed:
        return InvalidRequest("invalid request", field="body")
    first = listed[0]
    more = f" (and {total - 1} more)" if total > 1 else ""
    return InvalidRequest(
        f"{first['field']}: {first['message']}{more}",
        field=first["field"],
        limit=first.get("limit"),
        errors=listed,
    )


def _limit_of(ctx: Mapping[str, Any]) -> int | float | None:
    for key in ("max_length", "min_length", "le", "lt", "ge", "gt"):
        value = ctx.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    return None


async def _validation_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # FastAPI prefixes body fields with "body"; query and header fields keep their own prefix.
    error = invalid_from_validation(exc.errors(), drop_prefix=("body",))
    count_error(request, error)
    return error_response(error)


async def _http_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: ServiceError
    if exc.status_code == 404:
        error = NotFound(f"no route {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(
            f"{request.method} is not allowed on {request.url.path}", headers=exc.headers
        )
    else:
        error = ServiceError(str(exc.detail), headers=exc.headers)
        error.status = exc.status_code
    count_error(request, error)
    return error_response(error)


CLIENT_CLOSED_REQUEST = 499


async def _disconnect_handler(request: Request, exc: Exception) -> Response:
    # The caller gave up (its own timeout, typically, while the service is loaded): there is no
    # one to answer. Left to the catch-all below, each hang-up logged two tracebacks (ours and
    # uvicorn's): 1.4 ms of the event loop per hang-up against 67 µs now (in-process, measured),
    # just when the loop is the scarcest thing.
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels("client_disconnected").inc()
    return Response(status_code=CLIENT_CLOSED_REQUEST)  # uvicorn drops it: the peer is gone


async def _unexpected_handler(request: Request, exc: Exception) -> Response:
    # Starlette's ServerErrorMiddleware calls this for anything not handled above; the log line
    # is the one place a bug shows up, so it carries the traceback.
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    error = ServiceError("internal error")
    count_error(request, error)
    return error_response(error)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, service_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(HTTPException, _http_handler)
    app.add_exception_handler(ClientDisconnect, _disconnect_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
