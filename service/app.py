"""create_app(): settings, lifespan, middleware, routes and error handlers. Wiring only.

The lifespan loads and verifies the model first (a service without a valid model must not start:
problems surface at load time, not on the first request), then opens the Redis client, yields both
as Starlette lifespan state, and on shutdown stops the reload poller and closes Redis, in reverse
order. Redis being down at start is not fatal: /readyz says so and /score follows the degrade or
fail policy until it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import TypedDict

import anyio.to_thread
from fastapi import FastAPI

from service.config import Settings
from service.connections import refusals_counted
from service.errors import BundleRejected, install_error_handlers
from service.heap import frozen_heap
from service.history import HistoryStore, open_client
from service.metrics import Metrics
from service.middleware import BodySizeLimit, RequestTiming
from service.model import CTRModel, inference_pool
from service.overload import GATED_ROUTES, AdmissionControl
from service.reload import ModelHolder
from service.routes import router

logger = logging.getLogger(__name__)


class AppState(TypedDict):
    """Lifespan state; Starlette copies it into every request.state."""

    settings: Settings
    holder: ModelHolder
    history: HistoryStore
    metrics: Metrics
    inference: Executor  # the threads that run graph calls (model.inference_pool)


class StartupError(RuntimeError):
    """The service cannot start; the message says why and what to do."""


async def load_initial_model(settings: Settings) -> CTRModel:
    try:
        return await anyio.to_thread.run_sync(CTRModel.load, settings.model_dir, settings)
    except BundleRejected as exc:
        raise StartupError(f"no valid model to serve: {exc.message}") from exc


def create_app(settings: Settings | None = None, *, model: CTRModel | None = None) -> FastAPI:
    """The ASGI app. `model`, when given, is an already-verified CTRModel to start with."""
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[AppState]:
        first = model if model is not None else await load_initial_model(settings)
        holder = ModelHolder(first, settings, metrics)
        client = open_client(
            settings.redis_url.get_secret_value(),
            deadline_seconds=settings.redis_deadline_seconds,
            max_connections=settings.redis_max_connections,
        )
        poller: asyncio.Task[None] | None = None
        threads = inference_pool(settings)
        try:
            store = HistoryStore(client, settings.redis_prefix, settings.redis_deadline_seconds)
            if settings.reload_poll_seconds > 0:
                poller = asyncio.create_task(holder.poll(settings.reload_poll_seconds))
            logger.info(
                "serving model %s version %s from %s; ONNX inputs %s; %d inference thread(s); "
                "Redis %s (prefix %r, deadline %g ms, policy %s)",
                first.name,
                first.version,
                first.directory,
                ", ".join(first.input_names),
                settings.inference_thread_count,
                settings.redis_location,
                settings.redis_prefix,
                settings.redis_deadline_ms,
                settings.redis_policy,
            )
            # refusals_counted: uvicorn's connection-cap 503s in /metrics (service/connections.py)
            with refusals_counted(metrics), frozen_heap():  # frozen last (service/heap.py)
                yield AppState(
                    settings=settings, holder=holder, history=store, metrics=metrics,
                    inference=threads,
                )
        finally:
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            # By now uvicorn has drained the requests; a call still queued has no one waiting.
            threads.shutdown(wait=False, cancel_futures=True)
            await client.aclose()
            metrics.close()

    app = FastAPI(
        title="dinserve",
        summary="Deep Interest Network CTR scoring over a user's Redis history",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.metrics = metrics  # also read by the error handlers (errors.count_error)
    install_error_handlers(app)
    app.include_router(router)
    # Added last = outermost: timing sees every answer, the size limit counts the body's bytes as
    # they arrive (admission control reads a gated route's body through it), and admission
    # control (service/overload.py) sheds load before a request takes a processing slot.
    app.add_middleware(
        AdmissionControl,
        metrics=metrics,
        max_in_flight=settings.max_in_flight,
        max_queued=settings.max_queued,
        queue_timeout_seconds=settings.queue_timeout_ms / 1000.0,
        lifo_after_seconds=settings.queue_lifo_after_ms / 1000.0,
        body_timeout_seconds=settings.body_timeout_ms / 1000.0,
        # /bench/noop goes through the same gate as /score, so that a comparison of the two
        # differs only by what /score does beyond parsing.
        routes=GATED_ROUTES | {("POST", "/bench/noop")} if settings.bench_endpoints
        else GATED_ROUTES,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, metrics=metrics)
    app.add_middleware(
        RequestTiming,
        metrics=metrics,
        paths=frozenset(
            path
            for route in (*app.routes, *router.routes)  # the included router shows as one entry
            if "{" not in (path := getattr(route, "path", "{"))
        ),
    )
    return app
