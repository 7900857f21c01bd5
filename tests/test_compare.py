"""`dinserve compare` (bench/compare.py) against a real service: /score beside /bench/noop.

Counts, error accounting and the ratio arithmetic are asserted; how fast anything is, never.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from service_helpers import ServiceProcess, metric

from dinserve.cli import main as cli_main


def _args(service: ServiceProcess, bundle: Path, redis_url: str, prefix: str,
          *paths: str) -> list[str]:
    return ["compare", *(f"{service.url}{p}" for p in paths), "--rounds", "25",
            "--warmup-rounds", "5", "--candidates", "10", "--item-ids-from", str(bundle),
            "--users", "5", "--history-length", "6", "--redis-url", redis_url,
            "--prefix", prefix, "--distinct-payloads", "4"]


def test_score_and_noop_side_by_side(
    plain_bundle: Path, redis_url: str, redis_prefix: str, tmp_path: Path,
    serve: Callable[..., ServiceProcess], capsys: pytest.CaptureFixture[str],
) -> None:
    service = serve(plain_bundle, redis_url, redis_prefix=redis_prefix, bench_endpoints="true")
    out = tmp_path / "compare.json"
    args = _args(service, plain_bundle, redis_url, redis_prefix, "/score", "/bench/noop")
    assert cli_main([*args, "--out", str(out)]) == 0
    with service.client() as client:
        exposition = client.get("/metrics").text
    scored = metric(exposition, "ctr_request_duration_seconds_count", route="/score",
                    method="POST", status="200")
    report = orjson.loads(out.read_bytes())
    score, noop = report["results"]
    assert report["reference"] == noop["url"] and noop["url"].endswith("/bench/noop")
    assert score["ok"] == noop["ok"] == 25 and score["errors"] == noop["errors"] == {}
    assert scored == 30  # warm-up rounds are sent, only not recorded
    assert noop["p50_ratio"] == 1.0
    assert score["p50_ratio"] == pytest.approx(score["p50_ms"] / noop["p50_ms"], abs=1e-3)
    for row in (score, noop):
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert report["payload"]["history_seeded"]["length"] == 6
    assert "ratios of p50 against" in capsys.readouterr().out


def test_an_endpoint_that_never_answers_2xx_is_counted_and_fails_the_run(
    plain_bundle: Path, redis_url: str, redis_prefix: str, tmp_path: Path,
    serve: Callable[..., ServiceProcess],
) -> None:
    # Bench endpoints off: /bench/noop answers 404, every one of them counted by status.
    service = serve(plain_bundle, redis_url, redis_prefix=redis_prefix)
    out = tmp_path / "compare.json"
    args = _args(service, plain_bundle, redis_url, redis_prefix, "/score", "/bench/noop")
    assert cli_main([*args, "--out", str(out)]) == 1
    score, noop = orjson.loads(out.read_bytes())["results"]
    assert noop["ok"] == 0 and noop["errors"] == {"404": 25}
    assert score["ok"] == 25 and score["p50_ratio"] is None  # no reference to divide by


def test_a_refused_connection_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["compare", "http://127.0.0.1:9/score", "--rounds", "3",
                     "--warmup-rounds", "0", "--candidates", "2", "--out",
                     str(tmp_path / "c.json")]) == 1
    (row,) = orjson.loads((tmp_path / "c.json").read_bytes())["results"]
    assert row["errors"] == {"connection": 3}
    assert "no 2xx answer" in capsys.readouterr().out


def test_bad_options_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["compare", "http://127.0.0.1:9/score", "--rounds", "0"]) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err
    assert cli_main(["compare", "http://127.0.0.1:9/score", "--header", "Host: x"]) == 2
    assert "--header Host" in capsys.readouterr().err
