"""bench/graph.py: the FLOP counter and `dinserve bench` end to end (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.graph import Workload, matmul_flops, random_din, request
from dinserve.cli import main
from model_export.checkpoint import Checkpoint
from model_export.export import export_onnx, make_case, tile


def test_matmul_flops_counts_what_the_graph_multiplies(
    tiny_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    """E = 16, attention 16 -> 8, MLP 32 -> 16, 4 + 4 feature dims; N = 7, L = 5, one GEMM."""
    import numpy as np

    path = tmp_path / "operand.onnx"
    export_onnx(tiny_checkpoint.model, path, strategy="operand")
    feeds = make_case(tiny_checkpoint.model, np.random.default_rng(0), length=5, n=7)
    n, length, e = 7, 5, 16
    expected = (
        2 * e * length * 2 * 16  # building K: [k[:, e] ‖ 1] @ [W4 ; W1 + W3] per e
        + 2 * n * (e + 1) * length * 16  # [q ‖ 1] @ K: the decomposed first attention layer
        + 2 * length * e * 16  # the key term, once per behaviour
        + 2 * n * length * 16 * 8  # attention 16 -> 8
        + 2 * n * length * 8  # attention head
        + 2 * n * length * e  # weights @ keys
        + 2 * n * 2 * e * 32  # MLP first layer, candidate columns
        + 2 * 1 * 8 * 32  # MLP first layer, user/context columns once per request
        + 2 * n * 32 * 16  # MLP 32 -> 16
        + 2 * n * 16  # MLP head
    )
    assert matmul_flops(path, feeds) == expected

    # "channel", written without its Scan over history chunks as the benchmark counts it: the
    # same products, the later attention layers as 1x1 Convs (counted like the Gemms they
    # replace), and K built element-wise (no MatMul of its own).
    path = tmp_path / "channel.onnx"
    export_onnx(tiny_checkpoint.model, path, strategy="channel", chunked=False)
    assert matmul_flops(path, feeds) == expected - 2 * e * length * 2 * 16


def test_bench_command_reports_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code = main([
        "bench", "--workload", "W2", "--threads", "1", "--repeats", "2", "--warmup", "0",
        "--items", "500", "--categories", "50", "--no-torch", "--out", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["machine"]["onnxruntime"] and report["settings"]["repeats"] == 2
    (result,) = report["results"]
    assert result["workload"] == "W2" and result["candidates"] == 500
    assert result["history_length"] == 50 and result["intra_op_threads"] == 1
    assert result["serving_strategy"] == "channel"
    # Each single strategy, the one the switched serving graph runs at N = 500 (channel) included.
    assert set(result["variants"]) == {
        "serving", "naive", "serving_channel", "serving_operand", "serving_dual", "serving_product",
        "roofline_matmul",
    }
    for stats in result["variants"].values():
        assert stats["calls"] == 2 and 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p99_ms"]
    assert set(result["max_abs_diff_vs_pytorch_din"]) == {
        "serving", "naive", "serving_channel", "serving_operand", "serving_dual", "serving_product",
    }
    assert max(result["max_abs_diff_vs_pytorch_din"].values()) <= 1e-5
    assert result["ratios_of_medians"]["naive/serving"] > 0
    # Useful work: the cheapest serving variant's MatMul FLOPs ("dual" repeats a GEMM on purpose).
    serving_mflops = [v["mflops"] for k, v in result["variants"].items() if k.startswith("serving")]
    assert result["useful_mflops"] == min(serving_mflops) < result["variants"]["serving"]["mflops"]
    # The switched graph's FLOPs are those of the branch it takes: channel at N = 500.
    variants = result["variants"]
    assert variants["serving"]["mflops"] == variants["serving_channel"]["mflops"]
    assert 0 < result["roofline"]["fraction_of_matmul_throughput"]
    # The machine while the variants were timed: busy with them; Linux reports the host's steal.
    assert 0 < result["machine"]["busy_pct"] <= 100 and 0 <= result["machine"]["steal_pct"] <= 100


def test_the_flop_count_does_not_depend_on_the_vocabulary(tmp_path: Path) -> None:
    """bench.graph.count_flops counts on a twin with small embedding tables. That is sound only
    if the rows of a table change no product of the graph: the same network with 64 and with
    20,000 items must count the same, in every layout the benchmark times."""
    workload = Workload(
        "tiny", "paper",
        dict(item_dim=8, category_dim=8, attention_units=(16, 8), mlp_units=(32, 16),
             attention_activation="dice", mlp_activation="dice"),
        candidates=60, history=7, target_ratio=1.0,
    )
    small = random_din(workload, 64, 64, 2, seed=0)
    large = random_din(workload, 20_000, 3_000, 2, seed=0)
    feeds = request(large, workload.candidates, workload.history, seed=1)
    layouts: dict[str, dict[str, Any]] = {
        "switched": dict(strategy="auto", chunked=False),
        "channel": dict(strategy="channel", chunked=False),
        "product": dict(strategy="product"),
        "naive": dict(naive=True),
    }
    for name, options in layouts.items():
        counts = []
        for size, model in (("small", small), ("large", large)):
            path = tmp_path / f"{name}_{size}.onnx"
            export_onnx(model, path, **options)
            counts.append(matmul_flops(path, tile(feeds) if name == "naive" else feeds))
        assert counts[0] == counts[1] > 0, name
