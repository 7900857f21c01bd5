"""Export a trained checkpoint to a self-checking bundle: `dinserve export` (docs/bundle.md).

Owns the ONNX export of the serving graph (and, with --naive, of the tiled graph), the parity
check of those graphs in onnxruntime against the PyTorch DIN, the golden cases, manifest.json
and the atomic publication of models/<name>/<version>/.

Nothing is published unless parity holds: the bundle is written into a hidden temporary directory
inside models/<name>/, checked there, and renamed to its version number only when complete, so a
watcher polling models/<name>/ never sees a half-written version.

Exporter: the TorchScript-based torch.onnx.export (dynamo=False). Measured on this repo's graphs
(torch 2.13, onnxruntime 1.23): the same onnxruntime latency as the dynamo exporter's graph
(W1: 27.8 vs 27.0 ms, 1 thread), correct at L = 0 and N = 1, and ~0.5 s to export a small model
against 6-14 s for dynamo, which keeps the test suite's bundle fixtures fast. torch is pinned, so
its deprecation is a known, contained cost.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from numpy.typing import NDArray

from dinserve.commands import ExportOptions
from model_export.checkpoint import Checkpoint, feature_file, load_checkpoint
from model_export.chunked import chunk_pair_scores
from model_export.din import DIN, SparseFeature
from model_export.serving import NaiveDIN, PairScores, ServingAttention, ServingDIN
from model_export.switch import SMALL_CANDIDATES, switch_on_candidates
from service.bundle import (
    CANDIDATE_CATEGORIES,
    CANDIDATE_ITEMS,
    CATEGORIES_FILE,
    CONTEXT_FEATURES,
    HISTORY_CATEGORIES,
    HISTORY_ITEMS,
    ITEMS_FILE,
    MODEL_FILE,
    NAIVE_FILE,
    OUTPUT,
    USER_FEATURES,
    Conventions,
    FeatureEntry,
    Features,
    Golden,
    GoldenCase,
    Manifest,
    OnnxInfo,
    TensorSpec,
    Vocabularies,
    VocabularyEntry,
    file_entries,
    read_manifest,
    write_manifest,
)
from service.vocab import FIRST_TOKEN_INDEX, OOV_INDEX, PADDING_INDEX

logger = logging.getLogger(__name__)

OPSET = 17
DEFAULT_TOLERANCE = 1e-5
HISTORY_INPUTS = (HISTORY_ITEMS, HISTORY_CATEGORIES)
CANDIDATE_INPUTS = (CANDIDATE_ITEMS, CANDIDATE_CATEGORIES)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# The largest candidate list the parity check runs: W2's 500, the largest reference workload.
PARITY_MAX_CANDIDATES = 500

Int64Array = NDArray[np.int64]
Feeds = dict[str, Int64Array]


class ExportError(Exception):
    """The checkpoint cannot be exported as asked (bad name/version, existing version)."""


class ParityError(ExportError):
    """The exported graph's scores differ from the PyTorch model's beyond the tolerance."""


# ----------------------------------------------------------------------------------------------
# Exporting graphs


def input_names(model: DIN) -> list[str]:
    """The graph's inputs in positional order; feature inputs only when the model has them."""
    names = [*HISTORY_INPUTS, *CANDIDATE_INPUTS]
    if model.config.user_features:
        names.append(USER_FEATURES)
    if model.config.context_features:
        names.append(CONTEXT_FEATURES)
    return names


def _torch_feeds(feeds: Feeds, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.array(feeds[name], dtype=np.int64)) for name in names)


def export_onnx(
    model: DIN, path: Path, naive: bool = False, strategy: str = "auto", chunked: bool = True
) -> None:
    """Write the serving graph (or, naive=True, the tiled graph) of model to path.

    strategy: see serving.ServingAttention. "auto" on a model with attention writes the switched
    graph (switch.py, switch_plan()): "product" for small candidate lists, the strategy "auto"
    picks for large ones. Any other strategy writes that strategy alone. chunked=False writes the
    "channel" strategy's pair block inline instead of as a Scan over history chunks (chunked.py):
    the same products, for bench/graph.py's FLOP count, which does not look inside a Scan.
    """
    plan = switch_plan(model) if strategy == "auto" and not naive else None
    if naive:
        _trace(model, NaiveDIN(model), path, naive=True)
    elif plan is None:
        _trace(model, ServingDIN(model, strategy, chunked), path)
    else:
        with tempfile.TemporaryDirectory(prefix="dinserve-export-") as tmp:
            small, large = Path(tmp, "small.onnx"), Path(tmp, "large.onnx")
            _trace(model, ServingDIN(model, plan["small_strategy"], chunked), small)
            _trace(model, ServingDIN(model, plan["large_strategy"], chunked), large)
            switched = switch_on_candidates(
                onnx.load(small), onnx.load(large), plan["max_small_candidates"]
            )
            onnx.save(switched, path)


def switch_plan(model: DIN) -> dict[str, Any] | None:
    """How "auto" splits the serving graph by N (switch.py), None for a model without attention."""
    if model.attention is None:
        return None
    large = ServingAttention(model, "auto").strategy
    return {"small_strategy": "product", "large_strategy": large,
            "max_small_candidates": SMALL_CANDIDATES}


def _trace(model: DIN, module: torch.nn.Module, path: Path, naive: bool = False) -> None:
    """torch.onnx.export of one serving-shaped module of model.

    N and L are dynamic; C, U and X are fixed by the config. The sample used for tracing has
    N = 3 and L = 2 so that no dynamic size is 0 or 1 (the tracer would not specialise on them,
    but a size of 1 hides broadcasting mistakes).
    """
    names = input_names(model)
    sample = make_case(model, np.random.default_rng(0), length=2, n=3)
    if naive:
        sample = tile(sample)
    # The "channel" strategy's pair block, traced as one marker node, becomes a Scan (chunked.py).
    attention = getattr(module, "attention", None)
    pairs = None
    if isinstance(attention, ServingAttention) and attention.strategy == "channel":
        pairs = attention.pairs if attention.pairs.chunked else None
    if naive:
        axes: dict[str, dict[int, str]] = {
            HISTORY_ITEMS: {0: "N", 1: "L"},
            HISTORY_CATEGORIES: {0: "N", 1: "L"},
            USER_FEATURES: {0: "N"},
            CONTEXT_FEATURES: {0: "N"},
        }
    else:
        axes = {HISTORY_ITEMS: {0: "L"}, HISTORY_CATEGORIES: {0: "L"}}
    axes.update({CANDIDATE_ITEMS: {0: "N"}, CANDIDATE_CATEGORIES: {0: "N"}, OUTPUT: {0: "N"}})
    axes = {name: dims for name, dims in axes.items() if name in names or name == OUTPUT}
    with torch.inference_mode(), warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation (module docstring: chosen on
        # purpose); pytest runs with filterwarnings=error and attributes the warning to us.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # din.sparse_embeddings asserts one column per feature table: a shape check the tracer
        # records as a constant, which is right here (U and X are fixed by the config).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
        torch.onnx.export(
            module.eval(),
            _torch_feeds(sample, names),
            str(path),
            input_names=names,
            output_names=[OUTPUT],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
            custom_opsets={PairScores.DOMAIN: 1} if pairs is not None else None,
        )
    if pairs is not None:
        onnx.save(chunk_pair_scores(onnx.load(str(path)), pairs, OPSET), str(path))


# ----------------------------------------------------------------------------------------------
# Cases: index-level inputs as the serving graph takes them


@dataclass(frozen=True)
class Case:
    """One request: a history of length L (trailing padding allowed) and N candidates."""

    name: str
    feeds: Feeds  # serving-graph inputs


def category_matrix(ckpt: Checkpoint) -> Int64Array:
    """(n_items, C) category indices of every item index, from the checkpoint's item table."""
    rows = ckpt.item_table.category_matrix(ckpt.categories, ckpt.config.max_categories)
    matrix = np.array(rows, dtype=np.int64).reshape(len(rows), ckpt.config.max_categories)
    # The item table may be smaller than the embedding (sizes rounded up); unseen rows: padding.
    if matrix.shape[0] < ckpt.config.n_items:
        pad = np.zeros((ckpt.config.n_items - matrix.shape[0], matrix.shape[1]), dtype=np.int64)
        matrix = np.concatenate([matrix, pad])
    return matrix[: ckpt.config.n_items]


def make_case(
    model: DIN,
    rng: np.random.Generator,
    length: int,
    n: int,
    padding: int = 0,
    categories: Int64Array | None = None,
    oov: bool = False,
) -> Feeds:
    """Random serving-graph inputs: `length` real behaviours then `padding` zeros, n candidates.

    With `categories` (the item table's matrix), categories are the items' real ones, as the
    service builds them; otherwise random indices with some 0-padding. oov=True makes about one
    item in eight out-of-vocabulary (index 1), whose categories are all padding.
    """
    config = model.config
    c = config.max_categories
    low = FIRST_TOKEN_INDEX if config.n_items > FIRST_TOKEN_INDEX else OOV_INDEX

    def items(count: int) -> Int64Array:
        drawn = rng.integers(low, config.n_items, size=count, dtype=np.int64)
        if oov:
            drawn[rng.random(count) < 0.125] = OOV_INDEX
        return drawn

    def cats(item_ids: Int64Array) -> Int64Array:
        if categories is not None:
            return categories[item_ids]
        drawn = rng.integers(PADDING_INDEX, config.n_categories, size=(len(item_ids), c))
        return drawn.astype(np.int64)

    history = items(length)
    history_cats = cats(history)
    history = np.concatenate([history, np.zeros(padding, dtype=np.int64)])
    history_cats = np.concatenate([history_cats, np.zeros((padding, c), dtype=np.int64)])
    candidates = items(n)
    feeds: Feeds = {
        HISTORY_ITEMS: history,
        HISTORY_CATEGORIES: history_cats,
        CANDIDATE_ITEMS: candidates,
        CANDIDATE_CATEGORIES: cats(candidates),
    }
    if config.user_features:
        feeds[USER_FEATURES] = np.array(
            [rng.integers(0, f.vocab_size) for f in config.user_features], dtype=np.int64
        )
    if config.context_features:
        feeds[CONTEXT_FEATURES] = np.array(
            [rng.integers(0, f.vocab_size) for f in config.context_features], dtype=np.int64
        )
    return feeds


def parity_cases(ckpt: Checkpoint, seed: int = 0) -> list[Case]:
    """The cases export checks: L = 0, 1, max; N = 1 and 500; trailing padding; OOV ids.

    Indices are real: items drawn from the vocabulary with their own categories from the item
    table, as features.py builds them, plus one case of random category indices.
    """
    model = ckpt.model
    rng = np.random.default_rng(seed)
    cats = category_matrix(ckpt)
    top = ckpt.config.max_history_length
    half = max(1, top // 2)
    many = PARITY_MAX_CANDIDATES
    limit = SMALL_CANDIDATES
    specs: list[tuple[str, dict[str, Any]]] = [
        ("L=0 N=1", dict(length=0, n=1)),
        ("L=0 N=500", dict(length=0, n=many)),
        ("L=1 N=1", dict(length=1, n=1)),
        ("L=1 N=500", dict(length=1, n=many)),
        (f"L={top} N=1", dict(length=top, n=1)),
        (f"L={top} N=500", dict(length=top, n=many)),
        (f"L={half}+{top - half} padding N=37", dict(length=half, n=37, padding=top - half)),
        ("all padding L=3 N=5", dict(length=0, n=5, padding=3)),
        (f"L={half} N=64 with OOV ids", dict(length=half, n=64, oov=True)),
        # Either side of the serving graph's switch on N (switch.py).
        (f"L={top} N={limit}", dict(length=top, n=limit)),
        (f"L={top} N={limit + 1}", dict(length=top, n=limit + 1)),
    ]
    cases = [Case(name, make_case(model, rng, categories=cats, **kw)) for name, kw in specs]
    cases.append(Case(f"L={top} N=20 random categories", make_case(model, rng, top, 20)))
    return cases


def golden_cases(ckpt: Checkpoint, seed: int = 1) -> list[Case]:
    """A few small cases for manifest.json (the service re-runs them at load)."""
    model = ckpt.model
    rng = np.random.default_rng(seed)
    cats = category_matrix(ckpt)
    top = ckpt.config.max_history_length
    short = min(top, 5)
    large = SMALL_CANDIDATES + 1
    return [
        Case("empty history, one candidate", make_case(model, rng, 0, 1, categories=cats)),
        Case("one behaviour, 3 candidates", make_case(model, rng, 1, 3, categories=cats)),
        Case(
            f"{short} behaviours + {top - short} padding, 4 candidates",
            make_case(model, rng, short, 4, padding=top - short, categories=cats),
        ),
        Case("full history, 2 candidates", make_case(model, rng, top, 2, categories=cats)),
        Case("OOV ids, one candidate", make_case(model, rng, short, 1, categories=cats, oov=True)),
        # Above the switched serving graph's small-N limit: the self-check runs both branches.
        Case(
            f"full history, {large} candidates",
            make_case(model, rng, top, large, categories=cats),
        ),
    ]


def tile(feeds: Feeds) -> Feeds:
    """Serving-graph inputs -> the naive graph's: history and features repeated per candidate."""
    n = feeds[CANDIDATE_ITEMS].shape[0]
    tiled: Feeds = {}
    for name, value in feeds.items():
        if name in CANDIDATE_INPUTS:
            tiled[name] = value
        else:
            tiled[name] = np.ascontiguousarray(np.broadcast_to(value, (n, *value.shape)))
    return tiled


def reference_scores(model: DIN, feeds: Feeds) -> NDArray[np.float32]:
    """The PyTorch DIN's probabilities for a serving-shaped case (history tiled per candidate)."""
    tiled = tile(feeds)
    with torch.inference_mode():
        logits = model.eval()(*_torch_feeds(tiled, input_names(model)))
        return torch.sigmoid(logits).numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Parity


def session(path: Path, intra_op_threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime session with the options the service uses by default
    (service.model.session_options): every graph optimisation, sequential execution, explicit
    thread counts, no spinning workers. The last matters when several sessions take turns, as in
    bench/graph.py: a session's idle workers spinning after its call took the second core from
    the next session's call (2-thread figures 2x their 1-thread ones)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class CaseResult:
    name: str
    candidates: int
    history_length: int
    max_abs_diff: float  # NaN when either side produced a non-finite score

    def passes(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance  # False for NaN


def check_parity(
    onnx_path: Path,
    reference: DIN,
    cases: Sequence[Case],
    naive: bool = False,
    intra_op_threads: int = 1,
    expected: Sequence[NDArray[np.float32]] | None = None,
) -> list[CaseResult]:
    """Run every case through the ONNX graph and the PyTorch model; max |diff| per case.

    naive=True feeds the graph the tiled inputs (model_naive.onnx). `expected` may carry the
    reference's scores, computed once for several graphs. Raises nothing: the caller decides what
    tolerance fails (export_bundle raises ParityError).
    """
    sess = session(onnx_path, intra_op_threads)
    graph_inputs = [i.name for i in sess.get_inputs()]
    results = []
    for i, case in enumerate(cases):
        feeds = tile(case.feeds) if naive else case.feeds
        (got,) = sess.run([OUTPUT], {name: feeds[name] for name in graph_inputs})
        want = expected[i] if expected is not None else reference_scores(reference, case.feeds)
        got = np.asarray(got, dtype=np.float64)
        if got.shape != want.shape:
            diff = float("nan")
        elif got.size == 0:
            diff = 0.0
        else:
            diff = float(np.max(np.abs(got - want.astype(np.float64))))
        results.append(
            CaseResult(case.name, len(case.feeds[CANDIDATE_ITEMS]),
                       len(case.feeds[HISTORY_ITEMS]), diff)
        )
    return results


def parity_message(graph: str, results: Sequence[CaseResult], tolerance: float) -> str:
    """The one error message: every case's max |diff|, the failing ones marked."""
    lines = [
        f"parity check failed: {graph} scores differ from the PyTorch model by more than "
        f"{tolerance:g} (max |diff| per case; nan = a non-finite score, e.g. NaN weights or "
        f"running statistics):"
    ]
    for r in results:
        mark = "FAIL" if not r.passes(tolerance) else "ok"
        lines.append(f"  {mark:4} {r.name}: {r.max_abs_diff:.3g}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The bundle


ONNX_DTYPES: dict[int, Literal["int64", "float32"]] = {
    int(onnx.TensorProto.INT64): "int64", int(onnx.TensorProto.FLOAT): "float32"
}


def tensor_contract(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) as manifest.json lists them, read from the ONNX graph itself."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}

    def describe(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        shape: list[int | str] = [
            d.dim_param if d.dim_param else int(d.dim_value) for d in tensor.shape.dim
        ]
        dtype = ONNX_DTYPES[int(tensor.elem_type)]
        return TensorSpec(name=value.name, dtype=dtype, shape=shape)

    inputs = [describe(v) for v in graph.input if v.name not in initializers]
    return inputs, [describe(v) for v in graph.output]


def next_version(model_dir: Path) -> str:
    """1 + the largest positive-integer version already in models/<name>/ (1 when none)."""
    existing = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and int(p.name) > 0] \
        if model_dir.is_dir() else []
    return str(max(existing, default=0) + 1)


def _golden_case(case: Case, scores: NDArray[np.float32]) -> GoldenCase:
    return GoldenCase(
        name=case.name,
        inputs={name: value.tolist() for name, value in case.feeds.items()},
        ctr=[float(s) for s in scores],
    )


def build_manifest(
    bundle: Path, ckpt: Checkpoint, name: str, version: str, tolerance: float, naive: bool
) -> Manifest:
    """The manifest of the files already in `bundle` (docs/bundle.md, field by field)."""
    config = ckpt.config
    inputs, outputs = tensor_contract(bundle / MODEL_FILE)
    golden = [_golden_case(c, reference_scores(ckpt.model, c.feeds)) for c in golden_cases(ckpt)]

    def features(specs: Sequence[SparseFeature]) -> list[FeatureEntry]:
        return [
            FeatureEntry(name=f.name, vocabulary=feature_file(f.name), size=f.vocab_size)
            for f in specs
        ]

    return Manifest(
        architecture="din",
        name=name,
        version=version,
        created_at=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        config=config.to_dict(),
        conventions=Conventions(
            padding_index=PADDING_INDEX, oov_index=OOV_INDEX, first_token_index=FIRST_TOKEN_INDEX
        ),
        max_history_length=config.max_history_length,
        max_categories=config.max_categories,
        inputs=inputs,
        outputs=outputs,
        features=Features(
            user=features(config.user_features), context=features(config.context_features)
        ),
        vocabularies=Vocabularies(
            items=VocabularyEntry(file=ITEMS_FILE, size=ckpt.item_table.items.size),
            categories=VocabularyEntry(file=CATEGORIES_FILE, size=ckpt.categories.size),
        ),
        files=file_entries(bundle),
        metrics=ckpt.metrics,
        golden=Golden(tolerance=tolerance, cases=golden),
        onnx=OnnxInfo(
            opset=OPSET,
            graph="serving",
            naive=NAIVE_FILE if naive else None,
            switch=switch_plan(ckpt.model),
            producer=f"torch {torch.__version__}",
        ),
    )


def _check_vocabularies(ckpt: Checkpoint) -> None:
    """The vocabulary files must fit the embedding tables they index (docs/bundle.md: size)."""
    config = ckpt.config
    problems = []
    if ckpt.item_table.items.size > config.n_items:
        problems.append(f"items: {ckpt.item_table.items.size} > n_items {config.n_items}")
    if ckpt.categories.size > config.n_categories:
        problems.append(f"categories: {ckpt.categories.size} > n_categories {config.n_categories}")
    for f in (*config.user_features, *config.context_features):
        vocab = ckpt.features.get(f.name)
        if vocab is None:
            problems.append(f"feature {f.name}: no vocabulary")
        elif vocab.size != f.vocab_size:
            problems.append(f"feature {f.name}: vocabulary size {vocab.size} != {f.vocab_size}")
    if problems:
        raise ExportError("checkpoint vocabularies do not fit the model: " + "; ".join(problems))


def export_bundle(
    ckpt: Checkpoint,
    models_dir: Path,
    name: str | None = None,
    version: str | None = None,
    naive: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    intra_op_threads: int = 1,
) -> Path:
    """Export, check parity, publish models_dir/<name>/<version>/ atomically; returns its path.

    Raises ParityError (nothing written) when any case differs by more than `tolerance`, and
    ExportError for a bad name or version or a version that already exists.
    """
    name = name or f"din-{ckpt.config.preset}"
    if not NAME_PATTERN.match(name):
        raise ExportError(f"bundle name {name!r}: use letters, digits, '.', '_' and '-'")
    if version is not None and not (version.isdigit() and int(version) > 0):
        raise ExportError(f"bundle version {version!r} must be a positive integer")
    _check_vocabularies(ckpt)
    model_dir = Path(models_dir) / name
    if version is not None and (model_dir / version).exists():
        raise ExportError(f"{model_dir / version} already exists; pick another --version")
    # Directories this call creates, removed again if it fails: a refused export writes nothing.
    created = [d for d in (model_dir, *model_dir.parents) if not d.exists()]
    model_dir.mkdir(parents=True, exist_ok=True)
    # A hidden, non-numeric name inside model_dir: same filesystem (the final rename is atomic)
    # and invisible to readers, which only consider positive-integer directories.
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=model_dir))
    try:
        model = ckpt.model.eval()
        export_onnx(model, staging / MODEL_FILE)
        graphs = [("model.onnx (serving graph)", staging / MODEL_FILE, False)]
        if naive:
            export_onnx(model, staging / NAIVE_FILE, naive=True)
            graphs.append(("model_naive.onnx (tiled graph)", staging / NAIVE_FILE, True))
        cases = parity_cases(ckpt)
        expected = [reference_scores(model, case.feeds) for case in cases]
        for label, path, tiled in graphs:
            results = check_parity(path, model, cases, naive=tiled,
                                   intra_op_threads=intra_op_threads, expected=expected)
            for r in results:
                logger.info("parity %s %s: max |diff| %.3g", label, r.name, r.max_abs_diff)
            if not all(r.passes(tolerance) for r in results):
                raise ParityError(parity_message(label, results, tolerance))
        ckpt.item_table.save(staging / ITEMS_FILE)
        ckpt.categories.save(staging / CATEGORIES_FILE)
        for feature_name, vocab in ckpt.features.items():
            vocab.save(staging / feature_file(feature_name))
        version = version or next_version(model_dir)
        write_manifest(staging, build_manifest(staging, ckpt, name, version, tolerance, naive))
        target = model_dir / version
        if target.exists():
            raise ExportError(f"{target} already exists; pick another --version")
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a bundle is for others to read
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in created:  # deepest first
            try:
                directory.rmdir()
            except OSError:
                break
        raise
    return target


# ----------------------------------------------------------------------------------------------
# `dinserve export`


def run(options: ExportOptions) -> int:
    """`dinserve export`: 0 on success; 1 when parity fails; 2 for unusable arguments."""
    try:
        ckpt = load_checkpoint(options.checkpoint)
        bundle = export_bundle(
            ckpt,
            options.out,
            name=options.name,
            version=options.version,
            naive=options.naive,
            tolerance=options.tolerance,
        )
    except ParityError as exc:
        print(f"dinserve export: {exc}\nnothing was written to {options.out}", file=sys.stderr)
        return 1
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"dinserve export: {exc}", file=sys.stderr)
        return 2
    manifest = read_manifest(bundle)
    files = ", ".join(manifest.files)
    print(f"exported {manifest.name} version {manifest.version} to {bundle} ({files})")
    print(f"parity within {options.tolerance:g} on {len(parity_cases(ckpt))} cases")
    return 0
