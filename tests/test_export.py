"""model_export/serving.py and export.py: serving-shaped graphs, parity, bundles, `dinserve export`.

Every graph here is a real ONNX file run in a real onnxruntime session; the reference is the
PyTorch DIN (history tiled per candidate), as in the export's own parity check.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from dinserve.cli import main
from model_export.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from model_export.din import DIN, Dice
from model_export.export import (
    ExportError,
    ParityError,
    category_matrix,
    check_parity,
    export_bundle,
    export_onnx,
    make_case,
    parity_cases,
    reference_scores,
    session,
    tile,
)
from model_export.serving import ServingDIN
from service.bundle import MANIFEST_FILE

TOLERANCE = 1e-5


def manifest_of(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / MANIFEST_FILE).read_text(encoding="utf-8"))


def padded(feeds: dict[str, np.ndarray], extra: int) -> dict[str, np.ndarray]:
    """The same request with `extra` trailing padding behaviours."""
    out = dict(feeds)
    c = feeds["history_categories"].shape[1]
    out["history_items"] = np.concatenate([feeds["history_items"], np.zeros(extra, np.int64)])
    out["history_categories"] = np.concatenate(
        [feeds["history_categories"], np.zeros((extra, c), np.int64)]
    )
    return out


# ----------------------------------------------------------------------------------------------
# The serving module in PyTorch


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"attention_normalization": "softmax"},
        {"use_attention": False},
        {"preset": "deepctr"},
        {"preset": "seed"},  # one Dense(1) score: the decomposed layer is the head itself
        {"attention_activation": "prelu", "mlp_activation": "prelu"},
    ],
    ids=["paper", "softmax", "basemodel", "deepctr", "seed", "prelu"],
)
@pytest.mark.parametrize("strategy", ["channel", "operand", "dual", "product"])
def test_serving_module_matches_din(
    make_tiny_checkpoint: Any, variant: dict[str, Any], strategy: str
) -> None:
    ckpt = make_tiny_checkpoint(seed=3, **variant)
    serving = ServingDIN(ckpt.model, strategy).eval()
    rng = np.random.default_rng(0)
    for length, n in [(0, 1), (0, 6), (1, 1), (7, 5), (20, 9)]:
        feeds = make_case(ckpt.model, rng, length, n, categories=category_matrix(ckpt))
        with torch.inference_mode():
            got = serving(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        assert got.shape == (n,)
        np.testing.assert_allclose(got, reference_scores(ckpt.model, feeds), rtol=0, atol=1e-6)


def test_auto_strategy_is_channel_major_and_dual_needs_a_shifted_dice(
    make_tiny_checkpoint: Any,
) -> None:
    """auto: the channel-major layout at every width; "dual" falls back where Dice cannot split."""
    small = make_tiny_checkpoint(seed=3)  # E = 16
    wide = make_tiny_checkpoint(seed=3, item_dim=32, category_dim=32)  # E = 64
    relu = make_tiny_checkpoint(seed=3, attention_activation="relu")  # no Dice to split
    assert ServingDIN(small.model).attention.strategy == "channel"  # type: ignore[union-attr]
    assert ServingDIN(wide.model).attention.strategy == "channel"  # type: ignore[union-attr]
    assert ServingDIN(small.model, "dual").attention.strategy == "dual"  # type: ignore[union-attr]
    assert ServingDIN(relu.model, "dual").attention.strategy == "operand"  # type: ignore[union-attr]


def test_serving_module_has_no_parameters_of_its_own(tiny_checkpoint: Checkpoint) -> None:
    serving = ServingDIN(tiny_checkpoint.model)
    own = {id(p) for p in serving.parameters()}
    assert own <= {id(p) for p in tiny_checkpoint.model.parameters()}


# ----------------------------------------------------------------------------------------------
# Parity of the exported graphs


def test_parity_cases_cover_the_required_shapes(tiny_checkpoint: Checkpoint) -> None:
    cases = parity_cases(tiny_checkpoint)
    shapes = {(len(c.feeds["history_items"]), len(c.feeds["candidate_items"])) for c in cases}
    top = tiny_checkpoint.config.max_history_length
    lengths = {length for length, _ in shapes}
    counts = {n for _, n in shapes}
    assert {0, 1, top} <= lengths
    assert {1, 500} <= counts
    assert any((c.feeds["history_items"] == 0).any() and c.feeds["history_items"][0] != 0
               for c in cases), "a history with trailing padding"
    assert any((c.feeds["candidate_items"] == 1).any() for c in cases), "out-of-vocabulary ids"


@pytest.mark.parametrize("graph", ["model.onnx", "model_naive.onnx"])
def test_exported_graph_matches_pytorch(
    tiny_bundle: Path, tiny_checkpoint: Checkpoint, graph: str
) -> None:
    results = check_parity(
        tiny_bundle / graph, tiny_checkpoint.model, parity_cases(tiny_checkpoint, seed=7),
        naive=graph == "model_naive.onnx",
    )
    worst = {r.name: r.max_abs_diff for r in results}
    assert all(d <= TOLERANCE for d in worst.values()), worst


@pytest.mark.parametrize("strategy", ["channel", "operand", "dual", "product"])
def test_every_strategy_exports_with_parity(
    tiny_checkpoint: Checkpoint, tmp_path: Path, strategy: str
) -> None:
    path = tmp_path / "model.onnx"
    export_onnx(tiny_checkpoint.model, path, strategy=strategy)
    results = check_parity(path, tiny_checkpoint.model, parity_cases(tiny_checkpoint, seed=8))
    assert max(r.max_abs_diff for r in results) <= TOLERANCE


def test_serving_graph_is_decomposed_and_folded(
    tiny_bundle: Path, tiny_checkpoint: Checkpoint
) -> None:
    """No (H, 4E) first-layer weight and no BatchNormalization: decomposition and Dice folding."""
    graph = onnx.load(str(tiny_bundle / "model.onnx")).graph
    e = tiny_checkpoint.config.embedding_dim
    shapes = [tuple(t.dims) for t in graph.initializer]
    assert not any(4 * e in s for s in shapes), shapes
    assert "BatchNormalization" not in {node.op_type for node in graph.node}
    history_inputs = {i.name: i for i in graph.input if i.name.startswith("history_")}
    # History comes once per request: its first dimension is L, never N.
    for value in history_inputs.values():
        assert value.type.tensor_type.shape.dim[0].dim_param == "L"


@pytest.mark.parametrize("extra", [1, 7])
def test_trailing_padding_does_not_change_scores(
    tiny_bundle: Path, tiny_checkpoint: Checkpoint, extra: int
) -> None:
    sess = session(tiny_bundle / "model.onnx")
    rng = np.random.default_rng(11)
    cats = category_matrix(tiny_checkpoint)
    for length, n in [(1, 1), (5, 40), (12, 500)]:
        feeds = make_case(tiny_checkpoint.model, rng, length, n, categories=cats)
        (plain,) = sess.run(None, feeds)
        (with_padding,) = sess.run(None, padded(feeds, extra))
        np.testing.assert_array_equal(plain, with_padding)


def test_softmax_padding_invariance(make_tiny_checkpoint: Any, tmp_path: Path) -> None:
    """Masked softmax: padding gets weight exactly 0; only the summation order may change."""
    ckpt = make_tiny_checkpoint(seed=4, attention_normalization="softmax")
    sess = session(export_bundle(ckpt, tmp_path) / "model.onnx")
    rng = np.random.default_rng(12)
    for length, n in [(1, 3), (9, 200)]:
        feeds = make_case(ckpt.model, rng, length, n, categories=category_matrix(ckpt))
        (plain,) = sess.run(None, feeds)
        (with_padding,) = sess.run(None, padded(feeds, 20 - length))
        np.testing.assert_allclose(plain, with_padding, rtol=0, atol=1e-7)


def test_empty_history_gives_probabilities(tiny_bundle: Path, tiny_checkpoint: Checkpoint) -> None:
    sess = session(tiny_bundle / "model.onnx")
    feeds = make_case(tiny_checkpoint.model, np.random.default_rng(2), 0, 300)
    (empty,) = sess.run(None, feeds)
    assert empty.shape == (300,) and empty.dtype == np.float32
    assert np.all(np.isfinite(empty)) and np.all((empty > 0) & (empty < 1))
    # An all-padding history is the same as no history.
    (all_padding,) = sess.run(None, padded(feeds, 20))
    np.testing.assert_array_equal(empty, all_padding)


@pytest.mark.parametrize(
    "variant",
    [{"attention_normalization": "softmax"}, {"use_attention": False}, {"preset": "deepctr"}],
    ids=["softmax", "basemodel", "deepctr"],
)
def test_variants_export_with_parity(
    make_tiny_checkpoint: Any, variant: dict[str, Any], tmp_path: Path
) -> None:
    ckpt = make_tiny_checkpoint(seed=5, **variant)
    bundle = export_bundle(ckpt, tmp_path, naive=True)
    assert bundle == tmp_path / f"din-{ckpt.config.preset}" / "1"
    for graph in ("model.onnx", "model_naive.onnx"):
        results = check_parity(bundle / graph, ckpt.model, parity_cases(ckpt, seed=9),
                               naive=graph == "model_naive.onnx")
        assert max(r.max_abs_diff for r in results) <= TOLERANCE


def test_baseline_of_a_checkpoint_exports(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    """The BaseModel that travels in a checkpoint is exportable as a bundle of its own."""
    assert tiny_checkpoint.baseline is not None
    base = copy.copy(tiny_checkpoint)
    base.model = tiny_checkpoint.baseline
    bundle = export_bundle(base, tmp_path, name="base-paper")
    assert manifest_of(bundle)["config"]["use_attention"] is False


# ----------------------------------------------------------------------------------------------
# The manifest


def test_manifest_follows_the_bundle_contract(
    tiny_bundle: Path, tiny_checkpoint: Checkpoint
) -> None:
    m = manifest_of(tiny_bundle)
    config = tiny_checkpoint.config
    assert m["format"] == "dinserve-bundle" and m["format_version"] == 2
    assert m["architecture"] == "din"
    assert m["name"] == "din-paper" == tiny_bundle.parent.name
    assert m["version"] == "1" == tiny_bundle.name
    created = datetime.datetime.strptime(m["created_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs(datetime.datetime.now() - created) < datetime.timedelta(days=1)
    assert m["config"] == json.loads(json.dumps(config.to_dict()))
    assert m["conventions"] == {"padding_index": 0, "oov_index": 1, "first_token_index": 2}
    assert m["max_history_length"] == config.max_history_length
    assert m["max_categories"] == config.max_categories
    assert m["metrics"] == tiny_checkpoint.metrics
    assert m["onnx"]["opset"] >= 17 and m["onnx"]["graph"] == "serving"
    assert m["onnx"]["naive"] == "model_naive.onnx"

    # Tensor contract: exactly the real graph's inputs and outputs, names, dtypes, shapes.
    c = config.max_categories
    assert m["inputs"] == [
        {"name": "history_items", "dtype": "int64", "shape": ["L"]},
        {"name": "history_categories", "dtype": "int64", "shape": ["L", c]},
        {"name": "candidate_items", "dtype": "int64", "shape": ["N"]},
        {"name": "candidate_categories", "dtype": "int64", "shape": ["N", c]},
        {"name": "user_features", "dtype": "int64", "shape": [1]},
        {"name": "context_features", "dtype": "int64", "shape": [1]},
    ]
    assert m["outputs"] == [{"name": "ctr", "dtype": "float32", "shape": ["N"]}]
    sess = session(tiny_bundle / "model.onnx")
    dtypes = {"tensor(int64)": "int64", "tensor(float)": "float32"}
    assert [
        {"name": i.name, "dtype": dtypes[i.type], "shape": i.shape} for i in sess.get_inputs()
    ] == m["inputs"]
    assert [(o.name, o.shape) for o in sess.get_outputs()] == [("ctr", ["N"])]

    # Files: every file but the manifest, with its size and sha256.
    on_disk = {p.name for p in tiny_bundle.iterdir()} - {MANIFEST_FILE}
    assert set(m["files"]) == on_disk == {
        "model.onnx", "model_naive.onnx", "items.tsv", "categories.tsv",
        "feature_age_bucket.tsv", "feature_device.tsv",
    }
    for name, entry in m["files"].items():
        data = (tiny_bundle / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    # Vocabularies and features: size = lines + 2 = embedding rows.
    def lines(name: str) -> int:
        return len((tiny_bundle / name).read_text(encoding="utf-8").splitlines())

    assert m["vocabularies"] == {
        "items": {"file": "items.tsv", "size": lines("items.tsv") + 2},
        "categories": {"file": "categories.tsv", "size": lines("categories.tsv") + 2},
    }
    assert m["vocabularies"]["items"]["size"] == config.n_items
    assert m["features"] == {
        "user": [{"name": "age_bucket", "vocabulary": "feature_age_bucket.tsv",
                  "size": lines("feature_age_bucket.tsv") + 2}],
        "context": [{"name": "device", "vocabulary": "feature_device.tsv",
                     "size": lines("feature_device.tsv") + 2}],
    }
    assert (tiny_bundle / "items.tsv").read_text().startswith("tt0100000\t")


def test_plain_bundle_has_no_feature_inputs(plain_bundle: Path) -> None:
    m = manifest_of(plain_bundle)
    assert [i["name"] for i in m["inputs"]] == [
        "history_items", "history_categories", "candidate_items", "candidate_categories",
    ]
    assert m["features"] == {"user": [], "context": []}
    assert set(m["files"]) == {"model.onnx", "items.tsv", "categories.tsv"}
    assert m["onnx"]["naive"] is None


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "plain_bundle"])
def test_golden_cases_reproduce(bundle_fixture: str, request: pytest.FixtureRequest) -> None:
    bundle: Path = request.getfixturevalue(bundle_fixture)
    m = manifest_of(bundle)
    golden = m["golden"]
    assert golden["tolerance"] == TOLERANCE
    cases = golden["cases"]
    assert len(cases) >= 4
    shapes = [(len(c["inputs"]["history_items"]), len(c["ctr"])) for c in cases]
    assert any(length == 0 for length, _ in shapes) and any(n == 1 for _, n in shapes)
    n_items = m["vocabularies"]["items"]["size"]
    sess = session(bundle / "model.onnx")
    graph_inputs = {i["name"] for i in m["inputs"]}
    for case in cases:
        assert set(case["inputs"]) == graph_inputs
        feeds = {
            name: np.asarray(v, dtype=np.int64).reshape(-1, m["max_categories"])
            if name.endswith("_categories") else np.asarray(v, dtype=np.int64)
            for name, v in case["inputs"].items()
        }
        assert feeds["candidate_items"].max() < n_items  # real indices
        (got,) = sess.run(None, feeds)
        np.testing.assert_allclose(got, case["ctr"], rtol=0, atol=golden["tolerance"])
        assert all(0.0 < s < 1.0 for s in case["ctr"])


# ----------------------------------------------------------------------------------------------
# Refusing a bad export


class ShiftedDIN(DIN):
    """A DIN whose forward does something its weights do not say: the serving rewrite, built from
    the weights alone, cannot reproduce it, and the parity check must notice."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(*inputs) + 0.05


def test_check_parity_reports_a_different_model(
    tiny_bundle: Path, tiny_checkpoint: Checkpoint
) -> None:
    other = copy.deepcopy(tiny_checkpoint.model)
    assert other.attention is not None
    first = other.attention.unit.linears[0]
    assert isinstance(first, torch.nn.Linear)
    with torch.no_grad():
        first.weight.mul_(1.01)
    results = check_parity(tiny_bundle / "model.onnx", other, parity_cases(tiny_checkpoint))
    by_name = {r.name: r.max_abs_diff for r in results}
    assert max(by_name.values()) > TOLERANCE
    # The attention layer only matters when there is a history to attend over.
    assert by_name["L=0 N=1"] <= TOLERANCE


def test_export_refuses_a_model_the_graph_does_not_reproduce(
    tiny_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    shifted = ShiftedDIN(tiny_checkpoint.config)
    shifted.load_state_dict(tiny_checkpoint.model.state_dict())
    ckpt = copy.copy(tiny_checkpoint)
    ckpt.model = shifted.eval()
    with pytest.raises(ParityError) as raised:
        export_bundle(ckpt, tmp_path)
    message = str(raised.value)
    assert message.startswith("parity check failed: model.onnx")
    for case in parity_cases(ckpt):
        assert case.name in message
    assert "FAIL" in message
    assert list(tmp_path.iterdir()) == []  # no version, no staging, no model directory


def test_cli_export_refuses_a_checkpoint_with_nan_statistics(
    tiny_checkpoint: Checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A diverged training run (NaN BatchNorm statistics in a Dice) must not become a bundle."""
    broken = copy.deepcopy(tiny_checkpoint)
    dice = next(m for m in broken.model.mlp.modules() if isinstance(m, Dice))
    assert dice.norm.running_var is not None
    dice.norm.running_var[0] = float("nan")
    save_checkpoint(broken, tmp_path / "run")
    models = tmp_path / "models"
    code = main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(models)])
    err = capsys.readouterr().err
    assert code == 1
    assert "parity check failed" in err and ": nan" in err and "nothing was written" in err
    assert not models.exists()


@pytest.mark.parametrize("version", ["0", "-1", "v2", "1.5"])
def test_export_rejects_bad_versions(
    tiny_checkpoint: Checkpoint, tmp_path: Path, version: str
) -> None:
    with pytest.raises(ExportError, match="positive integer"):
        export_bundle(tiny_checkpoint, tmp_path, version=version)


# ----------------------------------------------------------------------------------------------
# The command line


def test_cli_export_end_to_end(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    """A checkpoint saved as `dinserve train` saves it, exported by a real `dinserve` process."""
    run_dir, models = tmp_path / "run", tmp_path / "models"
    save_checkpoint(tiny_checkpoint, run_dir)
    done = subprocess.run(
        [sys.executable, "-m", "dinserve", "export", "--checkpoint", str(run_dir),
         "--out", str(models), "--naive"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    bundle = models / "din-paper" / "1"
    assert str(bundle) in done.stdout
    m = manifest_of(bundle)
    assert "model_naive.onnx" in m["files"]
    for name in ("items.tsv", "categories.tsv", "feature_age_bucket.tsv", "feature_device.tsv"):
        assert (bundle / name).read_bytes() == (run_dir / name).read_bytes()
    # The bundle reproduces the loaded checkpoint's scores, not just the in-memory one's.
    loaded = load_checkpoint(run_dir)
    results = check_parity(bundle / "model.onnx", loaded.model, parity_cases(loaded, seed=3))
    assert max(r.max_abs_diff for r in results) <= TOLERANCE


def test_cli_export_numbers_versions(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    run_dir, models = tmp_path / "run", tmp_path / "models"
    save_checkpoint(tiny_checkpoint, run_dir)
    args = ["export", "--checkpoint", str(run_dir), "--out", str(models), "--name", "ctr"]
    assert main(args) == 0
    assert main(args) == 0
    assert sorted(p.name for p in (models / "ctr").iterdir()) == ["1", "2"]
    assert main([*args, "--version", "7"]) == 0
    assert main([*args, "--version", "7"]) == 2  # never overwrites a published version
    assert main(args) == 0
    assert sorted((p.name for p in (models / "ctr").iterdir()), key=int) == ["1", "2", "7", "8"]
    assert manifest_of(models / "ctr" / "8")["version"] == "8"


def test_cli_export_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert code == 2
    assert "checkpoint.pt not found" in capsys.readouterr().err


def test_tiled_inputs_match_the_naive_contract(
    tiny_bundle: Path, tiny_checkpoint: Checkpoint
) -> None:
    """model_naive.onnx takes a leading N on every history and feature input (docs/bundle.md)."""
    sess = session(tiny_bundle / "model_naive.onnx")
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert shapes["history_items"] == ["N", "L"]
    assert shapes["history_categories"] == ["N", "L", 3]
    assert shapes["user_features"] == ["N", 1] and shapes["context_features"] == ["N", 1]
    feeds = make_case(tiny_checkpoint.model, np.random.default_rng(0), 4, 6)
    (naive,) = sess.run(None, tile(feeds))
    (serving,) = session(tiny_bundle / "model.onnx").run(None, feeds)
    assert math.isclose(float(np.abs(naive - serving).max()), 0.0, abs_tol=TOLERANCE)
