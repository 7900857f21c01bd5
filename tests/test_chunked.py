"""model_export/chunked.py: the "channel" pair block as a Scan over chunks of the history.

Real graphs exported from a real (random) DIN, run in onnxruntime; the reference is the PyTorch
DIN. The chunk length is computed in the graph from N and CHUNK_FLOATS: a small CHUNK_FLOATS
makes the chunking arithmetic (padding, one behaviour per chunk, more chunks than behaviours
would allow) happen at the tiny model's sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from model_export import chunked
from model_export.export import export_onnx, make_case, reference_scores, session
from service.bundle import CHUNK_INPUT, OUTPUT


def _run(path: Path, feeds: dict[str, Any]) -> Any:
    (got,) = session(path).run([OUTPUT], feeds)
    return got


def test_the_channel_graph_scans_the_history_and_leaves_no_marker(
    tiny_checkpoint: Any, tmp_path: Path
) -> None:
    path = tmp_path / "channel.onnx"
    export_onnx(tiny_checkpoint.model.eval(), path, strategy="channel")
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node].count("Scan") == 1
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    # chunked=False: the same block inline, no Scan.
    flat = tmp_path / "flat.onnx"
    export_onnx(tiny_checkpoint.model.eval(), flat, strategy="channel", chunked=False)
    assert "Scan" not in {n.op_type for n in onnx.load(str(flat)).graph.node}


@pytest.mark.parametrize("chunk_floats", [1, 16 * 7 * 3, chunked.CHUNK_FLOATS])
def test_any_chunking_gives_the_models_scores(
    tiny_checkpoint: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_floats: int
) -> None:
    """H = 16 for the tiny model: with 1 float per chunk every chunk is one behaviour; with
    16·7·3 floats, N = 7 gives chunks of 3 behaviours, so L = 20 needs padding (7 chunks, 21)."""
    monkeypatch.setattr(chunked, "CHUNK_FLOATS", chunk_floats)
    model = tiny_checkpoint.model.eval()
    path = tmp_path / "channel.onnx"
    export_onnx(model, path, strategy="channel")
    rng = np.random.default_rng(11)
    top = model.config.max_history_length
    for length, n, padding in [(0, 7, 0), (1, 7, 0), (top, 7, 0), (top, 1, 0), (3, 7, 4),
                               (top - 1, 300, 1), (top, 300, 0)]:
        feeds = make_case(model, rng, length=length, n=n, padding=padding)
        got = _run(path, feeds)
        assert got.shape == (n,)
        np.testing.assert_allclose(got, reference_scores(model, feeds), rtol=0, atol=1e-5)


def test_the_switched_graph_nests_the_scan_in_its_large_branch(
    tiny_checkpoint: Any, tmp_path: Path
) -> None:
    """switch.py copies the Scan body into the If branch with every name prefixed, and the
    body's reference to a value of the branch (query_t) follows that value's new name."""
    path = tmp_path / "serving.onnx"
    export_onnx(tiny_checkpoint.model.eval(), path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    (switch,) = [n for n in model.graph.node if n.op_type == "If"]
    large = next(a.g for a in switch.attribute if a.name == "else_branch")
    (scan,) = [n for n in large.node if n.op_type == "Scan"]
    body = scan.attribute[0].g
    produced_in_branch = {o for n in large.node for o in n.output}
    local = ({i.name for i in body.input} | {t.name for t in body.initializer}
             | {o for n in body.node for o in n.output})
    outer = {i for n in body.node for i in n.input if i and i not in local}
    assert outer and outer <= produced_in_branch
    assert all(name.startswith("large/") for name in local | outer)


def test_the_chunk_size_is_an_optional_input_that_changes_no_score(
    tiny_checkpoint: Any, tmp_path: Path
) -> None:
    """CHUNK_INPUT is a graph input with CHUNK_FLOATS as its default, at the top of the switched
    graph too (switch.py hoists it out of the large branch): onnxruntime lists it apart from the
    required inputs, and any value fed gives the model's scores, on both sides of the switch."""
    model = tiny_checkpoint.model.eval()
    path = tmp_path / "serving.onnx"
    export_onnx(model, path)
    graph = onnx.load(str(path)).graph
    defaults = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    assert CHUNK_INPUT in {i.name for i in graph.input}
    assert defaults[CHUNK_INPUT].tolist() == [chunked.CHUNK_FLOATS]
    sess = session(path)
    assert CHUNK_INPUT not in {i.name for i in sess.get_inputs()}
    assert [i.name for i in sess.get_overridable_initializers()] == [CHUNK_INPUT]
    rng = np.random.default_rng(5)
    top = model.config.max_history_length
    for length, n in [(top, 3), (top, 120), (top - 3, 300), (0, 60)]:
        feeds = make_case(model, rng, length=length, n=n, padding=0)
        want = reference_scores(model, feeds)
        for chunk_floats in (1, 16 * 5, 1 << 62):
            (got,) = sess.run([OUTPUT], {**feeds, CHUNK_INPUT: np.array(
                [chunk_floats], dtype=np.int64)})
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
