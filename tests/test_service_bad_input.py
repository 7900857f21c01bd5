"""Client mistakes over real HTTP: each gets a 4xx whose JSON names the problem, never a 500.

One uvicorn process takes the whole list, then must still score correctly: a bad request may not
leave anything behind (a stuck connection, a poisoned cache, a half-read body).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from service_helpers import ServiceProcess, item_ids, reference_scores

MAX_CANDIDATES = 50
MAX_USER_ID = 32
MAX_BODY = 16_384
JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class Bad:
    """One malformed request and what its answer must say."""

    name: str
    content: bytes | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    method: str = "POST"
    path: str = "/score"
    status: int = 422
    names: str = ""  # the field (or text) the answer must name
    limit: int | None = None


def candidates(n: int) -> list[dict[str, Any]]:
    return [{"item_id": i} for i in range(n)]


def ok(**changes: Any) -> dict[str, Any]:
    return {"user_id": "u", "candidates": candidates(2), **changes}


def chunked(data: bytes, size: int = 1000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


BAD = [
    Bad("not json", content=b"{user_id: u", names="body"),
    Bad("empty body", content=b"", names="body"),
    Bad("json array", body=[ok()], names="body"),
    Bad("json string", body="hello", names="body"),
    Bad("NaN literal", content=b'{"user_id": "u", "candidates": [{"item_id": NaN}]}',
        names="candidates.0.item_id"),
    Bad("invalid utf-8", content=b'{"user_id": "\xff\xfe", "candidates": [{"item_id": 1}]}',
        names="body"),
    Bad("no user_id", body={"candidates": candidates(1)}, names="user_id"),
    Bad("no candidates", body={"user_id": "u"}, names="candidates"),
    Bad("empty candidates", body=ok(candidates=[]), names="candidates", limit=1),
    Bad("candidates an object", body=ok(candidates={"item_id": 1}), names="candidates"),
    Bad("candidate a number", body=ok(candidates=[5]), names="candidates.0"),
    Bad("candidate without item_id", body=ok(candidates=[{"category": "A"}]),
        names="candidates.0.item_id"),
    Bad("item_id null", body=ok(candidates=[{"item_id": None}]), names="candidates.0.item_id"),
    Bad("item_id boolean", body=ok(candidates=[{"item_id": True}]), names="candidates.0.item_id"),
    Bad("item_id float", body=ok(candidates=[{"item_id": 1.5}]), names="candidates.0.item_id"),
    Bad("item_id empty", body=ok(candidates=[{"item_id": 1}, {"item_id": ""}]),
        names="candidates.1.item_id"),
    Bad("item_id too long", body=ok(candidates=[{"item_id": "x" * 300}]),
        names="candidates.0.item_id"),
    Bad("item_id an object", body=ok(candidates=[{"item_id": {"id": 1}}]),
        names="candidates.0.item_id"),
    Bad("unknown candidate field", body=ok(candidates=[{"item_id": 1, "score": 0.5}]),
        names="candidates.0.score"),
    Bad("unknown top-level field", body=ok(debug=True), names="debug"),
    Bad("user_id boolean", body=ok(user_id=False), names="user_id"),
    Bad("user_id empty", body=ok(user_id=""), names="user_id"),
    Bad("user_id a list", body=ok(user_id=["u"]), names="user_id"),
    Bad("user_id too long", body=ok(user_id="u" * (MAX_USER_ID + 1)), names="user_id",
        limit=MAX_USER_ID),
    Bad("user_id with a newline", body=ok(user_id="u\nINJECTED"), names="user_id"),
    Bad("too many candidates", body=ok(candidates=candidates(MAX_CANDIDATES + 1)),
        names="candidates", limit=MAX_CANDIDATES),
    Bad("category an object", body=ok(candidates=[{"item_id": 1, "category": {"a": 1}}]),
        names="candidates.0.category"),
    Bad("category empty list", body=ok(candidates=[{"item_id": 1, "category": []}]),
        names="candidates.0.category"),
    Bad("category list of lists", body=ok(candidates=[{"item_id": 1, "category": [["A"]]}]),
        names="candidates.0.category"),
    Bad("context a list", body=ok(context=["ios"]), names="context"),
    Bad("context value a list", body=ok(context={"device": ["ios"]}), names="context.device"),
    Bad("context value boolean", body=ok(context={"device": True}), names="context.device"),
    Bad("context value null", body=ok(context={"device": None}), names="context.device"),
    Bad("wrong content type", body=ok(), headers={"content-type": "text/plain"}, status=415,
        names="content-type"),
    Bad("form content type", content=b"user_id=u",
        headers={"content-type": "application/x-www-form-urlencoded"}, status=415,
        names="content-type"),
    Bad("body over the limit", content=b'{"user_id": "' + b"u" * MAX_BODY + b'"}', status=413,
        names="body", limit=MAX_BODY),
    Bad("chunked body over the limit", content=b"CHUNKED", status=413, names="body",
        limit=MAX_BODY),
    Bad("GET on /score", method="GET", status=405, names="GET"),
    Bad("unknown route", path="/scores", status=404, names="/scores"),
    Bad("admin while off", path="/admin/reload", status=404, names="CTR_ADMIN_TOKEN"),
]


@pytest.fixture(scope="module")
def service(
    plain_bundle: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("bad-input") / "service.log"
    with ServiceProcess(
        plain_bundle, redis_url, log, redis_prefix="test-bad-input", reload_poll_seconds="0",
        warmup_runs="1", max_candidates=str(MAX_CANDIDATES),
        max_user_id_length=str(MAX_USER_ID), max_body_bytes=str(MAX_BODY),
        redis_deadline_ms="1000",
    ) as svc:
        yield svc


def send(svc: ServiceProcess, bad: Bad) -> Any:
    kwargs: dict[str, Any] = {"headers": bad.headers}
    if bad.content == b"CHUNKED":  # no Content-Length: the limit must count the bytes
        big = b'{"user_id": "u", "candidates": [' + b'{"item_id": 1},' * 5000 + b"]}"
        kwargs["content"] = chunked(big)
    elif bad.content is not None:
        kwargs["content"] = bad.content
    elif bad.body is not None:
        kwargs["json"] = bad.body
    return svc.http.request(bad.method, bad.path, **kwargs)


def test_there_are_at_least_25_distinct_cases() -> None:
    assert len({bad.name for bad in BAD}) == len(BAD) >= 25


def test_each_malformed_request_gets_a_4xx_naming_the_problem(
    service: ServiceProcess, plain_bundle: Path
) -> None:
    problems = []
    for bad in BAD:
        response = send(service, bad)
        body = response.json() if response.headers.get("content-type", "").startswith(
            "application/json") else {}
        named = " ".join([body.get("field", ""), body.get("message", "")]
                         + [e.get("field", "") for e in body.get("errors", [])])
        if response.status_code != bad.status:
            problems.append(f"{bad.name}: status {response.status_code}, want {bad.status}")
        elif bad.names not in named:
            problems.append(f"{bad.name}: answer does not name {bad.names!r}: {body}")
        elif bad.limit is not None and body.get("limit") != bad.limit:
            problems.append(f"{bad.name}: limit {body.get('limit')}, want {bad.limit}")
    assert problems == []

    # Still serving, and correctly.
    ids = item_ids(plain_bundle)
    good = service.http.post("/score", json={"user_id": "u", "candidates": [
        {"item_id": ids[0]}, {"item_id": ids[1]}]})
    assert good.status_code == 200
    np.testing.assert_allclose(
        good.json()["scores"],
        reference_scores(plain_bundle, [], [(ids[0], None), (ids[1], None)]), atol=1e-6,
    )
    assert "Traceback" not in service.log()


def test_limits_are_inclusive(service: ServiceProcess) -> None:
    """Exactly at each limit is allowed: the limit names the largest valid value."""
    at_limit = service.http.post(
        "/score", json={"user_id": "u" * MAX_USER_ID, "candidates": candidates(MAX_CANDIDATES)}
    )
    assert at_limit.status_code == 200, at_limit.text
    assert len(at_limit.json()["scores"]) == MAX_CANDIDATES
