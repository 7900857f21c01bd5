"""`dinserve bench`: the serving graph against the tiled graph and PyTorch, side by side.

Owns the graph-level benchmark of issues 2 and 5: for each reference workload (DESIGN.md: W1
paper-scale, W2 DeepCTR-default) it builds ONE random DIN, exports from the same weights the
serving graph (as `dinserve export` writes it), the naive tiled graph, and the serving graph with
each single first-layer strategy of serving.ServingAttention (serving_channel / _operand / _dual
/ _product), and times them round-robin in one process with identical onnxruntime settings
(model_export.export.session: ORT_ENABLE_ALL, sequential), next to PyTorch eager
(torch.inference_mode) on the DIN itself and on the serving module. Scores are compared too. A
roofline reference, a plain square MatMul with the serving graph's useful FLOP count timed in the
same loop, says what fraction of the machine's matrix throughput the graph reaches.

Machines here are shared and noisy: variants are interleaved call by call, so a busy neighbour
slows them all alike, and the report leads with ratios of medians.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# PyTorch's OpenMP workers spin for a while after each eager call; with 2 intra-op threads that
# spinning took the second core from the onnxruntime call timed next (the 2-thread roofline MatMul
# measured 2x its 1-thread time). Passive waits, as in model_export/train.py; only effective when
# torch is not imported yet, which is the case under `dinserve bench`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from numpy.typing import NDArray  # noqa: E402

from bench import machinecpu  # noqa: E402
from bench.machinecpu import CpuWindow  # noqa: E402
from dinserve.bench_commands import BenchOptions  # noqa: E402
from model_export.din import DIN, Dice, preset_config  # noqa: E402
from model_export.export import (  # noqa: E402
    Feeds,
    export_onnx,
    input_names,
    reference_scores,
    session,
    switch_plan,
    tile,
)
from model_export.serving import ServingAttention, ServingDIN  # noqa: E402
from model_export.switch import taken_branch  # noqa: E402
from service.bundle import (  # noqa: E402
    CANDIDATE_CATEGORIES,
    CANDIDATE_ITEMS,
    HISTORY_CATEGORIES,
    HISTORY_ITEMS,
)
from service.model import chunk_feeds  # noqa: E402

# Embedding rows of the twin whose graphs count the FLOPs (count_flops). matmul_flops reads only
# the feeds' shapes, so ids beyond the twin's tables do not matter.
TWIN_ROWS = 64


@dataclass(frozen=True)
class Workload:
    """A reference workload: network sizes, vocabulary sizes, request shape, target ratio."""

    name: str
    preset: str
    sizes: dict[str, Any]
    candidates: int
    history: int
    target_ratio: float  # naive graph time / serving graph time this workload must reach


WORKLOADS = {
    # DESIGN.md W1, paper-scale: item ‖ cate 64 ‖ 64, attention 80 -> 40, MLP 200 -> 80, Dice.
    "W1": Workload(
        "W1", "paper",
        dict(item_dim=64, category_dim=64, attention_units=(80, 40), mlp_units=(200, 80),
             attention_activation="dice", mlp_activation="dice"),
        candidates=200, history=100, target_ratio=4.0,
    ),
    # DESIGN.md W2, DeepCTR-Torch defaults: 8 ‖ 8, attention 64 -> 16 Dice, DNN 256 -> 128 ReLU.
    "W2": Workload(
        "W2", "deepctr",
        dict(item_dim=8, category_dim=8, attention_units=(64, 16), mlp_units=(256, 128),
             attention_activation="dice", mlp_activation="relu"),
        candidates=500, history=50, target_ratio=3.0,
    ),
}


def random_din(workload: Workload, n_items: int, n_categories: int, categories_per_item: int,
               seed: int) -> DIN:
    """Random weights, and random Dice running statistics so folding does real work."""
    torch.manual_seed(seed)
    config = preset_config(
        workload.preset, n_items=n_items, n_categories=n_categories,
        max_categories=categories_per_item, max_history_length=workload.history,
        **workload.sizes,
    )
    model = DIN(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Dice):
                mean, var = module.norm.running_mean, module.norm.running_var
                assert mean is not None and var is not None
                mean.uniform_(-0.5, 0.5)
                var.uniform_(0.5, 2.0)
                module.alpha.uniform_(-0.5, 0.5)
    return model


def request(model: DIN, n: int, length: int, seed: int) -> Feeds:
    """One request of the workload's shape: a full history (no padding), n candidates."""
    rng = np.random.default_rng(seed)
    config = model.config
    c = config.max_categories
    history = rng.integers(2, config.n_items, size=length, dtype=np.int64)
    candidates = rng.integers(2, config.n_items, size=n, dtype=np.int64)
    return {
        HISTORY_ITEMS: history,
        HISTORY_CATEGORIES: rng.integers(2, config.n_categories, size=(length, c)),
        CANDIDATE_ITEMS: candidates,
        CANDIDATE_CATEGORIES: rng.integers(2, config.n_categories, size=(n, c)),
    }


def matmul_flops(path: Path, feeds: Feeds) -> int:
    """2·M·K·N summed over the MatMul/Gemm nodes of the graph, at these feeds' shapes, plus
    2·(output size)·(input channels / groups)·(kernel size) over its Conv nodes.

    Shapes come from onnx shape inference with the inputs fixed to the feeds' shapes, so this
    counts what the exported graph really multiplies, not what we meant it to.
    """
    model = onnx.load(str(path))
    for value in model.graph.input:
        if value.name in feeds:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, feeds[value.name].shape, strict=True):
                dim.Clear()
                dim.dim_value = int(size)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    # A switched serving graph (model_export/switch.py): count the branch these feeds take.
    graph = taken_branch(inferred, len(feeds[CANDIDATE_ITEMS])) or inferred.graph
    shapes: dict[str, list[int]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output,
                  *graph.value_info, *graph.output]:
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    for init in [*inferred.graph.initializer, *graph.initializer]:
        shapes[init.name] = list(init.dims)
    total = 0
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        out = shapes.get(node.output[0])
        a = shapes.get(node.input[0])
        if not out or not a or 0 in out:
            continue
        if node.op_type == "Conv":  # weight (out channels, in channels / groups, *kernel)
            weight = shapes.get(node.input[1])
            if weight:
                total += 2 * int(np.prod(out)) * int(np.prod(weight[1:]))
            continue
        trans_a = any(att.name == "transA" and att.i for att in node.attribute)
        k = a[-2] if (node.op_type == "Gemm" and trans_a) else a[-1]
        total += 2 * int(np.prod(out)) * k
    return total


def roofline_graph(path: Path, flops: int) -> tuple[Feeds, list[int]]:
    """A single-MatMul ONNX graph [M, K] @ [K, M] with about `flops` FLOPs; returns its feeds."""
    side = max(16, round((flops / 2) ** (1 / 3)))
    m = k = n = side
    a = onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [m, k])
    b = onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [k, n])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [m, n])
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["a", "b"], ["y"])],
                                   "roofline", [a, b], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((m, k), dtype=np.float32),
             "b": rng.standard_normal((k, n), dtype=np.float32)}
    return feeds, [m, k, n]  # type: ignore[return-value]


@dataclass
class Variant:
    name: str
    call: Callable[[], NDArray[np.float32] | None]
    flops: int | None = None
    samples: list[float] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        ms = np.asarray(self.samples) * 1e3
        median = float(np.median(ms))
        out = {
            "median_ms": round(median, 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3),
            "min_ms": round(float(ms.min()), 3),
            "calls": len(self.samples),
        }
        if self.flops:
            out["mflops"] = round(self.flops / 1e6, 1)
            out["gflops_per_s_at_median"] = round(self.flops / (median / 1e3) / 1e9, 1)
        return out


def time_round_robin(variants: list[Variant], repeats: int, warmup: int) -> None:
    """Call each variant `repeats` times, interleaved, rotating the order every round."""
    for _ in range(warmup):
        for v in variants:
            v.call()
    for r in range(repeats):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            start = time.perf_counter()
            v.call()
            v.samples.append(time.perf_counter() - start)


def ort_call(
    sess: ort.InferenceSession, feeds: Feeds, intra_op_threads: int = 1
) -> Callable[[], NDArray[np.float32]]:
    names = [i.name for i in sess.get_inputs()]
    # What the service feeds besides the request: the chunked graph's chunk size, by threads.
    bound = {**{name: feeds[name] for name in names}, **chunk_feeds(sess, intra_op_threads)}
    outputs = [sess.get_outputs()[0].name]

    def call() -> NDArray[np.float32]:
        result: NDArray[np.float32] = sess.run(outputs, bound)[0]
        return result

    return call


def count_flops(
    workload: Workload, options: BenchOptions, alternatives: Sequence[str], feeds: Feeds,
    tiled: Feeds, workdir: Path,
) -> dict[str, int]:
    """matmul_flops of every timed graph, counted on the graphs of a small-vocabulary twin.

    A graph's products depend on the network's sizes and the feeds' shapes, not on its weights
    or on how many rows its embedding tables have: the twin is the same workload with TWIN_ROWS
    items and categories, whose graphs export and load in a fraction of a second, where the
    1M-item graphs take seconds each to load and shape-infer again (a fifth of the bench's time
    went to such copies). Graphs with a Scan over history chunks (model_export/chunked.py) are
    counted as written without it: the same products, but matmul_flops does not look into a
    Scan; the other strategies have none, and chunked=False leaves them as they are.
    """
    twin = random_din(workload, TWIN_ROWS, TWIN_ROWS, options.categories_per_item, options.seed)
    folder = workdir / f"{workload.name}_flops"
    folder.mkdir(exist_ok=True)
    graphs = {"serving": "auto", "naive": None, **{f"serving_{alt}": alt for alt in alternatives}}
    flops = {}
    for name, strategy in graphs.items():
        path = folder / f"{name}.onnx"
        if strategy is None:
            export_onnx(twin, path, naive=True)
        else:
            export_onnx(twin, path, strategy=strategy, chunked=False)
        flops[name] = matmul_flops(path, tiled if name == "naive" else feeds)
    return flops


def bench_workload(
    workload: Workload, options: BenchOptions, workdir: Path
) -> list[dict[str, Any]]:
    """All variants of one workload, once per thread count; one result dict per thread count."""
    n, length = workload.candidates, workload.history
    model = random_din(workload, options.items + 2, options.categories + 2,
                       options.categories_per_item, options.seed)
    feeds = request(model, n, length, options.seed + 1)
    tiled = tile(feeds)
    # The serving graph as export writes it ("auto": switched on N between "product" and the
    # large-N strategy, model_export/switch.py), and each single strategy it could have used,
    # the one its branch for this N runs included (so the report shows what the switch costs).
    chosen = ServingDIN(model).attention
    plan = switch_plan(model)
    strategy = chosen.strategy if chosen is not None else "operand"
    if plan is not None and n <= plan["max_small_candidates"]:
        strategy = plan["small_strategy"]
    alternatives = [
        s for s in ("channel", "operand", "dual", "product")
        if chosen is not None and ServingAttention(model, s).strategy == s
    ]
    paths = {"serving": workdir / f"{workload.name}_serving.onnx",
             "naive": workdir / f"{workload.name}_naive.onnx"}
    started = time.perf_counter()
    export_onnx(model, paths["serving"])
    export_onnx(model, paths["naive"], naive=True)
    for alt in alternatives:
        paths[f"serving_{alt}"] = workdir / f"{workload.name}_serving_{alt}.onnx"
        export_onnx(model, paths[f"serving_{alt}"], strategy=alt)
    export_seconds = time.perf_counter() - started
    flops = count_flops(workload, options, alternatives, feeds, tiled, workdir)
    # Useful work: the decomposed layer computed once ("dual" repeats a GEMM to save memory
    # passes, and the roofline should not credit it for that).
    useful = min(f for name, f in flops.items() if name != "naive")
    paths["roofline"] = workdir / f"{workload.name}_roofline.onnx"
    roofline_feeds, roofline_shape = roofline_graph(paths["roofline"], useful)
    reference = reference_scores(model, feeds)
    serving_module = ServingDIN(model).eval()
    torch_inputs = tuple(torch.from_numpy(np.array(feeds[k])) for k in input_names(model))
    torch_tiled = tuple(torch.from_numpy(np.array(tiled[k])) for k in input_names(model))

    def torch_din() -> NDArray[np.float32]:
        with torch.inference_mode():
            scores: NDArray[np.float32] = torch.sigmoid(model(*torch_tiled)).numpy()
        return scores

    def torch_serving() -> NDArray[np.float32]:
        with torch.inference_mode():
            scores: NDArray[np.float32] = serving_module(*torch_inputs).numpy()
        return scores

    results = []
    for threads in options.threads:
        torch.set_num_threads(threads)
        sessions = {name: session(path, threads) for name, path in paths.items()}
        variants = [
            Variant(name, ort_call(sessions[name], tiled if name == "naive" else feeds, threads),
                    flops[name])
            for name in paths if name != "roofline"
        ]
        variants.append(Variant("roofline_matmul", ort_call(sessions["roofline"], roofline_feeds),
                                int(2 * np.prod(roofline_shape))))
        if not options.no_torch:
            variants += [Variant("torch_eager_din", torch_din, flops["naive"]),
                         Variant("torch_eager_serving", torch_serving, flops["serving"])]
        diffs = {}
        for v in variants:
            if v.name == "roofline_matmul":
                continue
            got = v.call()
            assert got is not None
            diffs[v.name] = float(np.max(np.abs(got.astype(np.float64) - reference)))
        before = machinecpu.snapshot()
        time_round_robin(variants, options.repeats, options.warmup)
        cpu = machinecpu.window(before, machinecpu.snapshot())
        stats = {v.name: v.stats() for v in variants}
        median = {name: s["median_ms"] for name, s in stats.items()}
        p99 = {name: s["p99_ms"] for name, s in stats.items()}
        ratios = {
            f"{name}/serving": round(median[name] / median["serving"], 2)
            for name in median if name != "serving"
        }
        ratios_p99 = {
            f"{name}/serving": round(p99[name] / p99["serving"], 2)
            for name in p99 if name != "serving"
        }
        results.append({
            "workload": workload.name,
            "preset": workload.preset,
            "config": model.config.to_dict(),
            "candidates": n,
            "history_length": length,
            "intra_op_threads": threads,
            "variants": stats,
            "ratios_of_medians": ratios,
            "ratios_of_p99": ratios_p99,
            "serving_strategy": strategy,
            "useful_mflops": round(useful / 1e6, 1),
            "roofline": {
                "matmul_shape": roofline_shape,
                # Time a MatMul of the graph's useful FLOPs takes / time the serving graph takes.
                "fraction_of_matmul_throughput": round(
                    median["roofline_matmul"] / median["serving"], 3),
            },
            "max_abs_diff_vs_pytorch_din": diffs,
            "target": {
                "naive/serving": workload.target_ratio,
                "met": ratios["naive/serving"] >= workload.target_ratio
                and diffs["serving"] <= 1e-5 and diffs["naive"] <= 1e-5,
            },
            "export_seconds": round(export_seconds, 1),
            # The whole machine while the variants were timed (bench/machinecpu.py): a ratio
            # measured while the host took CPU time is noisier than one measured without.
            "machine": asdict(cpu) if cpu else None,
        })
        print_result(results[-1])
    return results


def print_result(r: dict[str, Any]) -> None:
    print(f"\n{r['workload']} ({r['preset']}): N = {r['candidates']} candidates, "
          f"L = {r['history_length']}, intra_op_threads = {r['intra_op_threads']}, serving "
          f"strategy {r['serving_strategy']}, {r['useful_mflops']:.0f} useful MFLOP")
    print(f"  {'variant':<22}{'median ms':>10}{'p99 ms':>10}{'MFLOP':>9}{'GFLOP/s':>9}"
          f"{'max|diff|':>11}")
    diffs = r["max_abs_diff_vs_pytorch_din"]
    for name, s in r["variants"].items():
        diff = f"{diffs[name]:.1e}" if name in diffs else "-"
        print(f"  {name:<22}{s['median_ms']:>10.2f}{s['p99_ms']:>10.2f}"
              f"{s.get('mflops', 0):>9.0f}{s.get('gflops_per_s_at_median', 0):>9.1f}{diff:>11}")
    ratios = ", ".join(f"{k} {v}x" for k, v in r["ratios_of_medians"].items())
    print(f"  ratios of medians: {ratios}")
    target = r["target"]
    print(f"  naive/serving {r['ratios_of_medians']['naive/serving']}x "
          f"(target >= {target['naive/serving']}x, scores within 1e-5: "
          f"{'met' if target['met'] else 'NOT met'}); serving graph reaches "
          f"{r['roofline']['fraction_of_matmul_throughput']:.0%} of a plain MatMul's throughput")
    if r["machine"]:
        print(f"  {machinecpu.describe(CpuWindow(**r['machine']))} while timed")


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def run(options: BenchOptions) -> int:
    """`dinserve bench`: time every workload; write --out JSON when asked; 0 unless it crashed."""
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "graph_optimization": "ORT_ENABLE_ALL",
            "execution_mode": "ORT_SEQUENTIAL",
            "inter_op_threads": 1,
            "repeats": options.repeats,
            "warmup": options.warmup,
            "items": options.items,
            "categories": options.categories,
            "categories_per_item": options.categories_per_item,
            "seed": options.seed,
        },
        "command": " ".join(sys.argv),
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="dinserve-bench-") as tmp:
        for name in options.workload:
            report["results"] += bench_workload(WORKLOADS[name], options, Path(tmp))
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {options.out}")
    return 0

