"""The app in-process (TestClient as a context manager: the lifespan runs), real bundles + Redis."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from service_helpers import item_ids, metric, reference_scores

from dinserve import processes
from service.app import create_app
from service.config import Settings
from service.errors import ServiceError
from service.history import keys


def settings(bundle: Path, redis_url: str, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        model_dir=bundle, redis_url=redis_url, redis_prefix=prefix, reload_poll_seconds=0,
        warmup_runs=1, redis_deadline_ms=500,  # generous: this machine is shared and noisy
    )
    return Settings(**{**values, **overrides})


@pytest.fixture
def client(tiny_bundle: Path, redis_url: str, redis_prefix: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings(tiny_bundle, redis_url, redis_prefix))) as c:
        yield c


def test_scores_equal_the_bundle_run_directly(
    client: TestClient, tiny_bundle: Path, redis_url: str, redis_prefix: str
) -> None:
    ids = item_ids(tiny_bundle)
    history = [ids[5], "unknown-item", ids[1], ids[40]]
    hist_key, user_key = keys(redis_prefix, "u1")
    with redis.Redis.from_url(redis_url) as r:
        r.rpush(hist_key, *history)
        r.hset(user_key, mapping={"age_bucket": "35-44"})
    candidates = [ids[3], "never-seen", ids[0], ids[59], ids[3]]
    response = client.post(
        "/score",
        json={"user_id": "u1", "candidates": [{"item_id": i} for i in candidates],
              "context": {"device": "android"}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "1"
    assert body["history_length"] == len(history)
    assert body["degraded"] is False
    want = reference_scores(tiny_bundle, history, [(i, None) for i in candidates],
                            profile={"age_bucket": "35-44"}, context={"device": "android"})
    np.testing.assert_allclose(body["scores"], want, atol=1e-6, rtol=0)
    assert body["scores"][0] == body["scores"][4]  # same candidate, same score, own position


def test_features_change_the_scores(client: TestClient, tiny_bundle: Path) -> None:
    """Profile and context must reach the model: scores move when they change."""
    ids = item_ids(tiny_bundle)
    base = {"user_id": "nobody", "candidates": [{"item_id": i} for i in ids[:6]]}
    plain = client.post("/score", json=base).json()["scores"]
    with_context = client.post("/score", json={**base, "context": {"device": "web"}}).json()
    assert not np.allclose(plain, with_context["scores"], atol=1e-7)
    np.testing.assert_allclose(
        with_context["scores"],
        reference_scores(tiny_bundle, [], [(i, None) for i in ids[:6]], context={"device": "web"}),
        atol=1e-6,
    )
    overridden = client.post(
        "/score", json={"user_id": "nobody",
                        "candidates": [{"item_id": ids[0], "category": ["War", "Drama"]}]},
    ).json()["scores"]
    np.testing.assert_allclose(
        overridden, reference_scores(tiny_bundle, [], [(ids[0], ["War", "Drama"])]), atol=1e-6
    )


def test_empty_history_and_integer_ids(
    plain_bundle: Path, redis_url: str, redis_prefix: str
) -> None:
    with TestClient(create_app(settings(plain_bundle, redis_url, redis_prefix))) as c:
        body = c.post("/score", json={"user_id": 42, "candidates": [{"item_id": 7},
                                                                     {"item_id": "7"}]}).json()
    assert body["history_length"] == 0 and body["degraded"] is False
    assert body["scores"][0] == body["scores"][1]
    np.testing.assert_allclose(
        body["scores"], reference_scores(plain_bundle, [], [("7", None), ("7", None)]), atol=1e-6
    )


def test_health_readiness_and_model_summary(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    summary = client.get("/model").json()
    assert summary["name"] == "din-paper" and summary["version"] == "1"
    assert summary["features"] == {"user": ["age_bucket"], "context": ["device"]}
    assert summary["self_check"]["max_abs_diff"] <= summary["self_check"]["tolerance"]
    assert "password" not in json.dumps(summary)


def test_not_ready_without_redis_but_alive(tiny_bundle: Path) -> None:
    closed = f"redis://:secret-pw@127.0.0.1:{processes.free_port()}/0"
    with TestClient(create_app(settings(tiny_bundle, closed, "p", redis_deadline_ms=50))) as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["redis"] == {"ok": False}
        model = c.get("/model").text
        assert "secret-pw" not in model and f"127.0.0.1:{closed.rsplit(':', 1)[1]}" in model


def test_metrics_parse_and_move(client: TestClient, tiny_bundle: Path) -> None:
    before = client.get("/metrics").text
    ids = item_ids(tiny_bundle)
    for _ in range(3):
        assert client.post("/score", json={"user_id": "m", "candidates": [{"item_id": ids[0]}]}
                           ).status_code == 200
    assert client.post("/score", json={"user_id": "m"}).status_code == 422
    after = client.get("/metrics").text
    count = "ctr_request_duration_seconds_count"
    assert metric(after, count, route="/score", method="POST", status="200") - metric(
        before, count, route="/score", method="POST", status="200") == 3
    assert metric(after, count, route="/score", method="POST", status="422") == 1
    for stage in ("history", "features", "inference"):
        assert metric(after, "ctr_stage_duration_seconds_count", stage=stage) >= 3
    cpu, wall = "ctr_inference_cpu_seconds", "ctr_stage_duration_seconds"
    assert metric(after, f"{cpu}_count") - metric(before, f"{cpu}_count") == 3
    cpu_spent = metric(after, f"{cpu}_sum") - metric(before, f"{cpu}_sum")
    wall_spent = metric(after, f"{wall}_sum", stage="inference") - metric(
        before, f"{wall}_sum", stage="inference")
    assert 0 < cpu_spent <= wall_spent  # the CPU of the calls, inside their wall time
    assert metric(after, "ctr_errors_total", code="invalid_request") == 1
    assert metric(after, "ctr_model_info", name="din-paper", version="1") == 1
    assert metric(after, "ctr_candidates_per_request_count") >= 3


def test_unknown_item_ids_and_the_score_level_are_counted(
    client: TestClient, tiny_bundle: Path, redis_url: str, redis_prefix: str
) -> None:
    ids = item_ids(tiny_bundle)
    hist_key, _ = keys(redis_prefix, "drift")
    with redis.Redis.from_url(redis_url) as r:
        r.rpush(hist_key, ids[2], "retired-item", ids[7])
    before = client.get("/metrics").text
    candidates = [ids[1], "new-1", ids[9], "new-2", "new-3"]
    response = client.post(
        "/score", json={"user_id": "drift", "candidates": [{"item_id": i} for i in candidates]})
    assert response.status_code == 200, response.text
    after = client.get("/metrics").text

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("ctr_unknown_items_total", input="candidate") == 3
    assert moved("ctr_unknown_items_total", input="history") == 1
    assert moved("ctr_request_mean_score_count") == 1
    scores = response.json()["scores"]
    assert moved("ctr_request_mean_score_sum") == pytest.approx(float(np.mean(scores)), abs=1e-6)


def test_startup_objects_are_frozen_out_of_garbage_collection_while_serving(
    tiny_bundle: Path, redis_url: str, redis_prefix: str
) -> None:
    app = create_app(settings(tiny_bundle, redis_url, redis_prefix))

    def walked_by_collections(obj: object) -> bool:
        # gc.get_objects() lists the three generations, which a collection walks; frozen
        # objects sit in the permanent generation and are not listed.
        return any(o is obj for o in gc.get_objects())

    assert walked_by_collections(app.router)
    with TestClient(app) as c:
        assert not walked_by_collections(app.router)
        assert c.post("/score", json={"user_id": "gc", "candidates": [
            {"item_id": item_ids(tiny_bundle)[0]}]}).status_code == 200
        before = c.get("/metrics").text
        gc.collect()
        after = c.get("/metrics").text
        assert not walked_by_collections(app.router)  # a full collection leaves it frozen
        full = "python_gc_collections_total"
        assert metric(after, full, generation="2") - metric(before, full, generation="2") >= 1
    assert walked_by_collections(app.router)  # unfrozen at shutdown: collectable again


def test_admin_reload_is_off_without_a_token_and_checks_it_when_set(
    tiny_bundle: Path, redis_url: str, redis_prefix: str, client: TestClient
) -> None:
    off = client.post("/admin/reload", headers={"Authorization": "Bearer anything"})
    assert off.status_code == 404 and "CTR_ADMIN_TOKEN" in off.json()["message"]
    app = create_app(settings(tiny_bundle, redis_url, redis_prefix, admin_token="s3cret"))
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            denied = c.post("/admin/reload", headers=headers)
            assert denied.status_code == 401, headers
            assert denied.json()["field"] == "authorization"
        ok = c.post("/admin/reload", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["result"] == "unchanged"


def test_body_limit_applies_before_parsing_chunked_included(
    tiny_bundle: Path, redis_url: str, redis_prefix: str
) -> None:
    app = create_app(settings(tiny_bundle, redis_url, redis_prefix, max_body_bytes=1000))
    body = json.dumps({"user_id": "u", "candidates": [{"item_id": i} for i in range(200)]})
    with TestClient(app) as c:
        declared = c.post("/score", content=body, headers={"content-type": "application/json"})
        assert declared.status_code == 413
        assert declared.json()["limit"] == 1000 and declared.json()["field"] == "body"

        def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
            for i in range(0, len(body), 100):
                yield body[i:i + 100].encode()

        chunked = c.post("/score", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413 and chunked.json()["limit"] == 1000
        small = c.post("/score", json={"user_id": "u", "candidates": [{"item_id": 1}]})
        assert small.status_code == 200


def test_every_service_error_has_a_status_and_a_distinct_code() -> None:
    """Meta-test: the one handler can answer every error class correctly."""
    seen: dict[str, type[ServiceError]] = {}

    def walk(cls: type[ServiceError]) -> None:
        for sub in cls.__subclasses__():
            assert 400 <= sub.status < 600, sub
            assert sub.code not in seen, (sub, seen.get(sub.code))
            seen[sub.code] = sub
            walk(sub)

    walk(ServiceError)
    assert len(seen) >= 10


def test_answers_given_before_routing_are_timed_under_their_route(
    tiny_bundle: Path, redis_url: str, redis_prefix: str
) -> None:
    # The body limit and admission control answer before the router has matched a route; their
    # 413s and 503s belong to /score's latency and error rate on a dashboard, not to `unmatched`.
    # Unknown paths still share one label, so random URLs cannot grow the label set.
    app = create_app(settings(tiny_bundle, redis_url, redis_prefix, max_body_bytes=1000))
    body = json.dumps({"user_id": "u", "candidates": [{"item_id": i} for i in range(200)]})
    with TestClient(app) as c:
        assert c.post("/score", content=body,
                      headers={"content-type": "application/json"}).status_code == 413
        for path in ("/no-such-thing", "/score/x", "/wp-login.php"):
            assert c.get(path).status_code == 404
        text = c.get("/metrics").text
    count = "ctr_request_duration_seconds_count"
    assert metric(text, count, route="/score", method="POST", status="413") == 1
    assert metric(text, count, route="unmatched", method="POST", status="413") == 0
    assert metric(text, "ctr_errors_total", code="body_too_large") == 1  # counted like any error
    assert metric(text, count, route="unmatched", method="GET", status="404") == 3
