"""model_export/switch.py: the serving graph switched on N between two first-layer strategies.

Real graphs exported from a real (random) DIN, run in onnxruntime; the reference is the PyTorch
DIN. The switch must be invisible in the scores and visible in the graph and the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from model_export.export import (
    export_onnx,
    make_case,
    reference_scores,
    session,
    switch_plan,
)
from model_export.switch import SMALL_CANDIDATES, switch_on_candidates, taken_branch
from service.bundle import MANIFEST_FILE


def test_auto_export_is_switched_between_product_and_the_large_strategy(
    tiny_checkpoint: Any, tmp_path: Path
) -> None:
    model = tiny_checkpoint.model.eval()
    plan = switch_plan(model)
    assert plan is not None and plan["small_strategy"] == "product"
    limit = plan["max_small_candidates"]
    assert plan["large_strategy"] == "channel"
    assert limit == SMALL_CANDIDATES
    path = tmp_path / "serving.onnx"
    export_onnx(model, path)
    graph = onnx.load(str(path))
    assert [n.op_type for n in graph.graph.node] == ["Shape", "LessOrEqual", "If"]
    small, large = taken_branch(graph, limit), taken_branch(graph, limit + 1)
    assert small is not None and large is not None and small.name != large.name
    # Same scores as the PyTorch DIN right at the limit, one past it, and at N = 1.
    sess = session(path)
    rng = np.random.default_rng(5)
    top = model.config.max_history_length
    for n in (1, limit, limit + 1, 3 * limit):
        for length in (0, top):
            feeds = make_case(model, rng, length=length, n=n)
            (got,) = sess.run(["ctr"], feeds)
            np.testing.assert_allclose(got, reference_scores(model, feeds), atol=1e-5)


def test_a_single_strategy_export_is_not_switched(tiny_checkpoint: Any, tmp_path: Path) -> None:
    path = tmp_path / "operand.onnx"
    export_onnx(tiny_checkpoint.model.eval(), path, strategy="operand")
    model = onnx.load(str(path))
    assert "If" not in {n.op_type for n in model.graph.node}
    assert taken_branch(model, 1) is None


def test_manifest_records_the_switch_and_golden_cases_cover_both_branches(
    tiny_bundle: Path,
) -> None:
    manifest = json.loads((tiny_bundle / MANIFEST_FILE).read_text(encoding="utf-8"))
    plan = manifest["onnx"]["switch"]
    assert plan["small_strategy"] == "product"
    limit = plan["max_small_candidates"]
    sizes = [len(case["inputs"]["candidate_items"]) for case in manifest["golden"]["cases"]]
    assert min(sizes) <= limit < max(sizes)


def test_switch_refuses_graphs_that_do_not_match(tiny_checkpoint: Any, tmp_path: Path,
                                                 make_tiny_checkpoint: Any) -> None:
    model = tiny_checkpoint.model.eval()
    other = make_tiny_checkpoint(seed=3, features=False).model.eval()  # no user/context inputs
    export_onnx(model, tmp_path / "a.onnx", strategy="product")
    export_onnx(other, tmp_path / "b.onnx", strategy="operand")
    a, b = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    with pytest.raises(ValueError, match="different inputs"):
        switch_on_candidates(a, b, 8)
    with pytest.raises(ValueError, match="no input named"):
        switch_on_candidates(a, a, 8, candidates_input="items")
