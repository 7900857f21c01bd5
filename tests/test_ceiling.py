"""The graph's own ceiling (bench/ceiling.py): `dinserve ceiling`, and `dinserve loadtest
--graph-ceiling` against a real service, both on a real exported bundle and onnxruntime session.

Nothing here asserts how fast a call is: the counts, the report's arithmetic and the feeds the
graph is called with are what can be wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pytest
from service_helpers import ServiceProcess

from bench.ceiling import graph_feeds, load_model, measure_ceiling
from dinserve.cli import main as cli_main
from service.bundle import (
    CANDIDATE_CATEGORIES,
    CANDIDATE_ITEMS,
    HISTORY_CATEGORIES,
    HISTORY_ITEMS,
)
from service.vocab import FIRST_TOKEN_INDEX


def test_feeds_are_known_items_with_the_bundles_own_categories(plain_bundle: Path) -> None:
    model = load_model(plain_bundle)
    space = model.space
    feeds = graph_feeds(model, candidates=30, history_length=None, seed=3)
    assert feeds[CANDIDATE_ITEMS].shape == (30,)
    assert feeds[HISTORY_ITEMS].shape == (space.max_history_length,)  # the bundle's maximum
    for items, categories in ((CANDIDATE_ITEMS, CANDIDATE_CATEGORIES),
                              (HISTORY_ITEMS, HISTORY_CATEGORIES)):
        assert feeds[items].min() >= FIRST_TOKEN_INDEX and feeds[items].max() < space.items.size
        np.testing.assert_array_equal(feeds[categories], space.item_categories[feeds[items]])
    assert model.predict(feeds).shape == (30,)
    shorter = graph_feeds(model, candidates=5, history_length=3)
    assert shorter[HISTORY_ITEMS].shape == (3,)


def test_each_caller_count_reports_consistent_counts(plain_bundle: Path) -> None:
    model = load_model(plain_bundle)
    feeds = graph_feeds(model, candidates=20, history_length=None)
    for callers in (1, 3):
        result = measure_ceiling(model, feeds, callers, seconds=0.3)
        assert result.callers == callers and result.calls > callers
        assert result.seconds >= 0.3
        assert result.calls_per_s == pytest.approx(result.calls / result.seconds, rel=5e-3)
        assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms
        # Each call's CPU is spent inside its own wall time (one intra-op thread per call).
        assert 0 < result.cpu_ms_per_call <= result.max_ms
        # The host's share of the machine meanwhile, which Linux reports.
        assert result.steal_pct is not None and 0 <= result.steal_pct <= 100


def test_the_command_writes_its_report(plain_bundle: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ceiling.json"
    assert cli_main(["ceiling", "--model-dir", str(plain_bundle), "--candidates", "12",
                     "--history-length", "4", "--callers", "1", "2", "--seconds", "0.2",
                     "--out", str(out)]) == 0
    report = orjson.loads(out.read_bytes())
    assert report["bundle"] == str(plain_bundle)
    assert (report["candidates"], report["history_length"]) == (12, 4)
    assert [row["callers"] for row in report["results"]] == [1, 2]
    assert all(row["calls"] > 0 for row in report["results"])
    printed = capsys.readouterr().out
    assert "1 caller:" in printed and "2 callers:" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--history-length", "500"], "--history-length must be between 0 and the bundle's "
                                      "max_history_length 20 (got 500)"),
        (["--candidates", "0"], "--candidates must be at least 1 (got 0)"),
    ],
)
def test_a_shape_the_service_never_feeds_is_refused_by_name(
    plain_bundle: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["ceiling", "--model-dir", str(plain_bundle), "--seconds", "0.1",
                     *args]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_bundle_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["ceiling", "--model-dir", str(tmp_path / "nothing")]) == 2
    assert "dinserve ceiling: error:" in capsys.readouterr().err


def test_loadtest_brackets_its_load_with_the_ceiling(
    plain_bundle: Path, redis_url: str, redis_prefix: str, tmp_path: Path,
    serve: Callable[..., ServiceProcess], capsys: pytest.CaptureFixture[str],
) -> None:
    service = serve(plain_bundle, redis_url, redis_prefix=redis_prefix)
    assert cli_main([
        "loadtest", "--url", f"{service.url}/score", "--rate", "40", "--duration", "1",
        "--warmup", "0", "--candidates", "10", "--item-ids-from", str(plain_bundle),
        "--users", "5", "--history-length", "50", "--redis-url", redis_url,
        "--prefix", redis_prefix, "--pause", "0.2", "--no-picture",
        "--graph-ceiling", str(plain_bundle), "--ceiling-callers", "1",
        "--ceiling-seconds", "0.3", "--out", str(tmp_path / "run"),
    ]) == 0
    report = orjson.loads((tmp_path / "run" / "report.json").read_bytes())
    ceiling = report["graph_ceiling"]
    (phase,) = report["phases"]
    # The histories seeded at 50 are longer than the bundle reads: the ceiling uses its maximum.
    assert (ceiling["candidates"], ceiling["history_length"], ceiling["callers"]) == (10, 20, 1)
    before, after = ceiling["before"], ceiling["after"]
    assert before["calls"] > 0 and after["calls"] > 0
    assert ceiling["throughput_rps"] == phase["achieved_rps"]
    assert ceiling["share_of_ceiling"] == [
        round(phase["achieved_rps"] / before["calls_per_s"], 4),
        round(phase["achieved_rps"] / after["calls_per_s"], 4),
    ]
    printed = capsys.readouterr().out
    assert "graph ceiling before: 1 caller:" in printed
    assert "of the graph's ceiling (before / after)" in printed


def test_loadtest_refuses_a_bad_ceiling_bundle_before_sending_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["loadtest", "--url", "http://127.0.0.1:9/score", "--duration", "1",
                     "--graph-ceiling", str(tmp_path / "nothing"),
                     "--out", str(tmp_path / "run")]) == 2
    assert "--graph-ceiling:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
