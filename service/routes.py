"""HTTP routes. Thin: parse, call history / features / model, answer; no logic of their own.

POST /score pins the serving model once (holder.model) and uses that object to the end, which is
what makes hot reload safe for requests in flight. It reads the raw body and validates it with
pydantic's JSON parser in one pass (no json.loads + model walk), and answers with orjson, which
serialises the float32 score array directly.
"""

from __future__ import annotations

import hmac
import time
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from service.bundle import CANDIDATE_ITEMS, HISTORY_ITEMS
from service.config import Settings
from service.errors import (
    HistoryUnavailable,
    NotFound,
    Unauthorized,
    UnsupportedMediaType,
)
from service.features import build_inputs
from service.history import EMPTY, HistoryStore
from service.metrics import CONTENT_TYPE, Metrics
from service.reload import ModelHolder
from service.schemas import ScoreRequest, ScoreResponse, parse_score_request
from service.vocab import OOV_INDEX

router = APIRouter()


# Dependencies are `async def` on purpose: FastAPI runs a plain `def` dependency in the threadpool,
# four thread hops per request for what are attribute reads (measured with cProfile).
async def _settings(request: Request) -> Settings:
    return request.state.settings  # type: ignore[no-any-return]


async def _holder(request: Request) -> ModelHolder:
    return request.state.holder  # type: ignore[no-any-return]


async def _history(request: Request) -> HistoryStore:
    return request.state.history  # type: ignore[no-any-return]


async def _metrics(request: Request) -> Metrics:
    return request.state.metrics  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(_settings)]
HolderDep = Annotated[ModelHolder, Depends(_holder)]
HistoryDep = Annotated[HistoryStore, Depends(_history)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]


def json_response(payload: Any, status_code: int = 200) -> Response:
    return Response(
        orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status_code,
        media_type="application/json",
    )


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its local `$defs` references replaced by the definitions themselves.

    The request body is validated from raw bytes (not through a FastAPI body parameter), so its
    schema is handed to openapi_extra, where a `#/$defs/...` reference would dangle.
    """
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)  # type: ignore[no-any-return]


# Examples shown in /docs and docs/openapi.json (tests/test_docs.py sends each one to the app).
_SCORE_EXAMPLES: dict[str, Any] = {
    "movielens": {
        "summary": "a MovieLens user and five movies, as `make demo` prints it",
        "value": {"user_id": "1", "candidates": [
            {"item_id": "318"}, {"item_id": "589"}, {"item_id": "150"}, {"item_id": "4993"},
            {"item_id": "858"}]},
    },
    "categories_and_context": {
        "summary": "candidates with their own categories, and request-context features",
        "value": {"user_id": "u17", "candidates": [
            {"item_id": "B00X4", "category": ["shoes", "sale"]}, {"item_id": 1042}],
            "context": {"device": "mobile"}},
    },
}
_SCORE_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {
            "schema": _inline_defs(ScoreRequest.model_json_schema()),
            "examples": _SCORE_EXAMPLES,
        }},
    },
    "responses": {"200": {"content": {"application/json": {"example": {
        "model_version": "1", "scores": [0.832, 0.688, 0.690, 0.771, 0.792],
        "history_length": 50, "degraded": False,
    }}}}},
}


@router.post(
    "/score",
    response_model=ScoreResponse,
    openapi_extra=_SCORE_DOC,
    responses={
        413: {"description": "body too large"},
        422: {"description": "invalid request"},
        503: {"description": "Redis unavailable and CTR_REDIS_POLICY=fail"},
    },
)
async def score(request: Request) -> Response:
    """Score N candidates for one user against the user's Redis history; scores in request order."""
    # The lifespan state is read here rather than through Depends(): FastAPI's dependency solving
    # took ~9% of the event loop's samples at capacity (a py-spy profile).
    state = request.state
    settings: Settings = state.settings
    holder: ModelHolder = state.holder
    store: HistoryStore = state.history
    metrics: Metrics = state.metrics
    req = await read_score_request(request, settings)
    model = holder.model  # pinned: a reload during this request does not affect it
    space = model.space

    start = time.perf_counter()
    degraded = False
    try:
        history = await store.fetch(req.user, space.max_history_length, model.has_user_features)
    except HistoryUnavailable as exc:
        metrics.redis_errors.labels(exc.reason).inc()
        if settings.redis_policy == "fail":
            raise
        metrics.degraded.labels(exc.reason).inc()
        history, degraded = EMPTY, True
    fetched = time.perf_counter()
    for reason, n in history.skipped.items():
        metrics.history_skipped.labels(reason).inc(n)

    feeds = build_inputs(req, history, space)
    built = time.perf_counter()
    scores = await model.score(
        feeds, state.inference, settings.inline_inference_pairs,
        cpu_seconds=metrics.inference_cpu_seconds.observe,
    )
    done = time.perf_counter()

    metrics.stage_seconds.labels("history").observe(fetched - start)
    metrics.stage_seconds.labels("features").observe(built - fetched)
    metrics.stage_seconds.labels("inference").observe(done - built)
    history_length = int(feeds[HISTORY_ITEMS].shape[0])
    metrics.candidates.observe(len(req.candidates))
    metrics.history_length.observe(history_length)
    observe_model_inputs_and_scores(metrics, feeds, scores)
    return json_response(
        {
            "model_version": model.version,
            "scores": scores,
            "history_length": history_length,
            "degraded": degraded,
        }
    )


def observe_model_inputs_and_scores(
    metrics: Metrics, feeds: dict[str, np.ndarray], scores: np.ndarray
) -> None:
    """Unknown item ids and the scores' level, for drift dashboards (a few µs a request)."""
    unknown_candidates = int(np.count_nonzero(feeds[CANDIDATE_ITEMS] == OOV_INDEX))
    unknown_history = int(np.count_nonzero(feeds[HISTORY_ITEMS] == OOV_INDEX))
    if unknown_candidates:
        metrics.unknown_items.labels("candidate").inc(unknown_candidates)
    if unknown_history:
        metrics.unknown_items.labels("history").inc(unknown_history)
    if scores.size:
        # sum / size, not mean(): the same number, without ndarray.mean's Python-level
        # wrapper (2.7 against 10.2 µs for 200 scores).
        metrics.mean_score.observe(float(scores.sum()) / scores.size)


async def read_score_request(request: Request, settings: Settings) -> ScoreRequest:
    """The content-type check, the body and its validation: shared by /score and /bench/noop."""
    content_type = request.headers.get("content-type", "application/json")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(
            f"content-type: expected application/json, got {media or 'nothing'}",
            field="content-type",
        )
    body = await request.body()
    return parse_score_request(body, settings.max_candidates, settings.max_user_id_length)


@router.post(
    "/bench/noop",
    include_in_schema=False,  # off in production: not part of the public API (docs/openapi.json)
)
async def bench_noop(request: Request) -> Response:
    """/score without Redis or inference: same parsing and limits, same-shaped answer (zeros).

    The reference for the small-request measurement (docs/performance.md): what a request costs
    the service when only HTTP, validation and the JSON answer remain. Off unless
    CTR_BENCH_ENDPOINTS=true. Reads the state the way /score does, so that the two differ only
    by what /score does beyond parsing.
    """
    settings: Settings = request.state.settings
    holder: ModelHolder = request.state.holder
    if not settings.bench_endpoints:
        raise NotFound("bench endpoints are off: set CTR_BENCH_ENDPOINTS=true to enable them")
    req = await read_score_request(request, settings)
    return json_response(
        {
            "model_version": holder.model.version,
            "scores": np.zeros(len(req.candidates), dtype=np.float32),
            "history_length": 0,
            "degraded": False,
        }
    )


@router.get("/healthz")
async def healthz() -> Response:
    """Liveness: answers while the process runs (KServe's live, not ready)."""
    return json_response({"status": "ok"})


@router.get("/readyz", responses={503: {"description": "model or Redis not ready"}})
async def readyz(holder: HolderDep, store: HistoryDep) -> Response:
    """Readiness: a self-checked model is serving and Redis answers PING."""
    model = holder.model
    model_ok = model.self_check is not None
    redis_ok = await store.ping()
    ready = model_ok and redis_ok
    return json_response(
        {
            "status": "ready" if ready else "not_ready",
            "model": {"ok": model_ok, "name": model.name, "version": model.version},
            "redis": {"ok": redis_ok},
        },
        status_code=200 if ready else 503,
    )


@router.get("/model")
async def model_summary(holder: HolderDep, settings: SettingsDep) -> Response:
    """The serving bundle: name, version, tensor contract, features, metrics, self-check."""
    summary = holder.model.summary()
    summary["redis"] = {
        "url": settings.redis_location,
        "prefix": settings.redis_prefix,
        "deadline_ms": settings.redis_deadline_ms,
        "policy": settings.redis_policy,
    }
    return json_response(summary)


@router.get("/metrics")
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    """Prometheus text exposition of this app's registry."""
    return Response(metrics.exposition(), media_type=CONTENT_TYPE)


@router.post(
    "/admin/reload",
    responses={
        401: {"description": "missing or wrong bearer token"},
        404: {"description": "admin endpoints are off (no CTR_ADMIN_TOKEN)"},
        409: {"description": "the new bundle was refused; the old one keeps serving"},
    },
)
async def admin_reload(
    request: Request,
    settings: SettingsDep,
    holder: HolderDep,
    force: Annotated[bool, Query(description="reload even if the version is unchanged")] = False,
) -> Response:
    """Load the latest bundle under the model dir now (the poller does the same on its own)."""
    check_admin(settings, request.headers.get("authorization"))
    result = await holder.reload(force=force)
    return json_response(
        {"result": result.outcome, "version": result.version, "previous": result.previous}
    )


def check_admin(settings: Settings, authorization: str | None) -> None:
    """Bearer-token check in constant time; the admin API does not exist without a token."""
    if settings.admin_token is None:
        raise NotFound("admin endpoints are off: set CTR_ADMIN_TOKEN to enable them")
    scheme, _, presented = (authorization or "").partition(" ")
    expected = settings.admin_token.get_secret_value().encode()
    # compare_digest on bytes of possibly different lengths still takes time independent of where
    # they differ; comparing on every path keeps a missing header from answering faster.
    valid = hmac.compare_digest(presented.strip().encode(), expected)
    if scheme.lower() != "bearer" or not valid:
        raise Unauthorized(
            "authorization: a valid `Bearer <CTR_ADMIN_TOKEN>` header is required",
            field="authorization",
        )
