"""POST /bench/noop: off by default; when on, /score's parsing and limits without Redis or a model.

The endpoint is the reference of the small-request measurement (docs/performance.md), so it
must refuse exactly what /score refuses and accept what /score accepts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings

BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("not json", b"{user_id: u", "body"),
    ("no candidates", b'{"user_id": "u", "candidates": []}', "candidates"),
    ("too many candidates", b'{"user_id": "u", "candidates": [' + b",".join(
        b'{"item_id": %d}' % i for i in range(6)) + b"]}", "candidates"),
    ("float item id", b'{"user_id": "u", "candidates": [{"item_id": 1.5}]}',
     "candidates.0.item_id"),
    ("unknown field", b'{"user_id": "u", "candidates": [{"item_id": 1}], "x": 1}', "x"),
    ("user id too long", b'{"user_id": "uuuuuuuuuuu", "candidates": [{"item_id": 1}]}', "user_id"),
]


def settings(bundle: Path, redis_url: str, prefix: str, **changes: Any) -> Settings:
    return Settings(
        model_dir=bundle,
        redis_url=redis_url,
        redis_prefix=prefix,
        reload_poll_seconds=0,
        warmup_runs=0,
        max_candidates=5,
        max_user_id_length=10,
        **changes,
    )


def test_off_by_default(tiny_bundle: Path, redis_url: str, redis_prefix: str) -> None:
    assert Settings().bench_endpoints is False
    with TestClient(create_app(settings(tiny_bundle, redis_url, redis_prefix))) as client:
        answer = client.post("/bench/noop", json={"user_id": "u", "candidates": [{"item_id": 1}]})
    assert answer.status_code == 404
    assert "CTR_BENCH_ENDPOINTS" in answer.text


@pytest.fixture
def client(tiny_bundle: Path, redis_url: str, redis_prefix: str) -> Iterator[TestClient]:
    app = create_app(settings(tiny_bundle, redis_url, redis_prefix, bench_endpoints=True))
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize(("name", "body", "field"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_refuses_what_score_refuses(client: TestClient, name: str, body: bytes, field: str) -> None:
    headers = {"content-type": "application/json"}
    noop = client.post("/bench/noop", content=body, headers=headers)
    score = client.post("/score", content=body, headers=headers)
    assert noop.status_code == score.status_code == 422
    assert noop.json() == score.json()
    assert field in noop.text


def test_refuses_a_wrong_content_type_like_score(client: TestClient) -> None:
    body = b'{"user_id": "u", "candidates": [{"item_id": 1}]}'
    headers = {"content-type": "text/plain"}
    noop = client.post("/bench/noop", content=body, headers=headers)
    score = client.post("/score", content=body, headers=headers)
    assert noop.status_code == score.status_code == 415
    assert noop.json() == score.json()


def test_answers_a_score_shaped_response(client: TestClient) -> None:
    request = {"user_id": 7, "candidates": [{"item_id": 1}, {"item_id": "2", "category": ["a"]}]}
    noop = client.post("/bench/noop", json=request)
    score = client.post("/score", json=request)
    assert noop.status_code == score.status_code == 200
    body = noop.json()
    assert set(body) == set(score.json())
    assert body["scores"] == [0.0, 0.0]
    assert body["model_version"] == score.json()["model_version"]
    assert body["history_length"] == 0 and body["degraded"] is False
