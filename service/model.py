"""CTRModel: one verified model bundle and its onnxruntime session.

Loading (docs/bundle.md) refuses a bundle, with BundleRejected naming the path and the reason,
unless every check passes, in this order: the directory resolves to `<name>/<version>/`; the
manifest has the expected format; every file in manifest.files has its sha256 and size; the
vocabularies have the sizes the manifest states; the manifest's tensor contract is the one
features.py builds, and the real session's inputs and outputs match it; the settings agree with
the manifest; the golden cases reproduce within their tolerance (the self-check). Then a few
warm-up runs, so the first request does not pay for onnxruntime's lazy allocations.

onnxruntime failures at request time become InferenceFailed here, where they enter. run() blocks,
so requests go through score(), which runs it on the inference threads (inference_pool()).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from service.bundle import (
    CANDIDATE_CATEGORIES,
    CANDIDATE_ITEMS,
    CHUNK_INPUT,
    CONTEXT_FEATURES,
    HISTORY_CATEGORIES,
    HISTORY_ITEMS,
    MODEL_FILE,
    OUTPUT,
    USER_FEATURES,
    Bundle,
    BundleError,
    FeatureEntry,
    Manifest,
    TensorSpec,
    open_bundle,
    resolve_bundle,
)
from service.config import Settings
from service.errors import BundleRejected, InferenceFailed
from service.features import FeatureSpace, Int64Array
from service.vocab import FIRST_TOKEN_INDEX, Vocabulary

logger = logging.getLogger(__name__)

# The value of the chunked serving graph's optional chunk-size input (CHUNK_INPUT) that makes the
# whole history one chunk. Its default, chunks that stay in one core's L2, is what one intra-op
# thread wants; with more threads the whole history as one chunk is faster (W1, trained model:
# 2.76 against 3.95 ms at 2 threads).
WHOLE_HISTORY = np.array([1 << 62], dtype=np.int64)
WARMUP_CANDIDATES = 200  # DESIGN.md's reference workload W1
GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
ORT_TYPES = {"int64": "tensor(int64)", "float32": "tensor(float)"}


# ----------------------------------------------------------------------------------------------
# Finding the bundle


def locate_bundle(path: Path) -> Path:
    """bundle.resolve_bundle, its BundleError as the service's BundleRejected."""
    try:
        return resolve_bundle(path)
    except BundleError as exc:
        raise BundleRejected(str(exc)) from exc


def bundle_signature(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """(file, size, mtime) of every file: tells a re-written bundle from one already judged."""
    try:
        return tuple(
            sorted(
                (p.name, p.stat().st_size, p.stat().st_mtime_ns)
                for p in directory.iterdir()
                if p.is_file()
            )
        )
    except OSError:
        return ()


# ----------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class SelfCheck:
    cases: int
    max_abs_diff: float
    tolerance: float


class CTRModel:
    """A loaded, verified bundle. Immutable once built, so requests may share it freely."""

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        session: ort.InferenceSession,
        space: FeatureSpace,
        intra_op_threads: int = 1,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.session = session
        self.space = space
        self.input_names = tuple(i.name for i in session.get_inputs())
        # Fed on every run besides the request's feeds: the chunk size, when the graph has one.
        self.fixed_feeds: dict[str, Int64Array] = chunk_feeds(session, intra_op_threads)
        self.self_check: SelfCheck | None = None
        self.loaded_at = time.time()

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        """The version directory's number: what reloads compare and `model_version` reports."""
        return self.directory.name

    @property
    def has_user_features(self) -> bool:
        return bool(self.space.user_features)

    @classmethod
    def load(cls, path: Path, settings: Settings) -> CTRModel:
        """Resolve, verify, open, self-check and warm up; BundleRejected on any failure."""
        directory = locate_bundle(path)
        try:
            model = cls._open(directory, settings)
            model.self_check = model._run_golden()
            model.warm_up(settings.warmup_runs)
        except BundleRejected:
            raise
        except BundleError as exc:
            raise BundleRejected(str(exc)) from exc
        except Exception as exc:  # a bundle is data: any failure to read it is a rejection
            raise BundleRejected(f"{directory}: {type(exc).__name__}: {exc}") from exc
        published = model.manifest.version
        if published != model.version:
            # A bundle copied to a new number (to republish an older model) is served under that
            # number, which reloads compare and callers see; the manifest keeps the exported one.
            logger.warning(
                "%s: manifest says version %s; served as version %s, the directory's name",
                directory, published, model.version,
            )
        return model

    @classmethod
    def _open(cls, directory: Path, settings: Settings) -> CTRModel:
        bundle = open_bundle(directory)
        manifest = bundle.manifest
        space = _feature_space(bundle)
        _check_manifest_contract(directory, manifest, space)
        if (
            settings.history_length is not None
            and settings.history_length != space.max_history_length
        ):
            raise BundleRejected(
                f"{directory}: max_history_length is {space.max_history_length} but the settings "
                f"require {settings.history_length} (CTR_HISTORY_LENGTH)"
            )
        try:
            session = ort.InferenceSession(
                bundle.model_bytes,
                sess_options=session_options(settings),
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:
            raise BundleRejected(
                f"{directory}/{MODEL_FILE}: onnxruntime cannot load it: {exc}"
            ) from exc
        _check_session_contract(directory, manifest, session)
        return cls(directory, manifest, session, space, settings.ort_intra_op_threads)

    def predict(self, feeds: dict[str, Int64Array]) -> NDArray[np.float32]:
        """One blocking run: feeds from features.build_inputs -> ctr (N,)."""
        if self.fixed_feeds:
            feeds = {**feeds, **self.fixed_feeds}
        try:
            (scores,) = self.session.run([OUTPUT], feeds)
        except Exception as exc:
            raise InferenceFailed(f"onnxruntime failed: {type(exc).__name__}") from exc
        n = feeds[CANDIDATE_ITEMS].shape[0]
        result = np.asarray(scores, dtype=np.float32).reshape(-1)
        if result.shape != (n,):
            raise InferenceFailed(
                f"model returned shape {tuple(np.shape(scores))}, expected ({n},)"
            )
        return result

    async def score(
        self,
        feeds: dict[str, Int64Array],
        threads: Executor,
        inline_pairs: int = 0,
        cpu_seconds: Callable[[float], None] | None = None,
    ) -> NDArray[np.float32]:
        """predict() on the inference threads, so the event loop keeps serving meanwhile.

        `threads` is the app's inference pool (inference_pool()): a call beyond its size waits
        in the pool's queue and runs as soon as a thread finishes, without a round trip through
        the event loop. A cancelled request (its deadline) drops its call if it has not started;
        one already running finishes and its result is discarded.

        A call of at most `inline_pairs` candidate x history pairs runs on the event loop
        instead: for such a call the hop to a worker thread and back is a large share of the
        cost (10 x 50 inline took 0.72-0.82 of the time through a thread).

        `cpu_seconds`, when given, is called with the CPU time the call took on the thread that
        ran it (with one intra-op thread, the default, all of the call's CPU). Against the
        call's wall time it tells waiting (for a thread, for a core) from a slow CPU.
        """
        pairs = feeds[CANDIDATE_ITEMS].shape[0] * max(feeds[HISTORY_ITEMS].shape[0], 1)
        run = self.predict if cpu_seconds is None else _thread_timed(self.predict, cpu_seconds)
        if pairs <= inline_pairs:
            return run(feeds)
        return await asyncio.get_running_loop().run_in_executor(threads, run, feeds)

    def _run_golden(self) -> SelfCheck:
        cases = self.manifest.golden.cases
        tolerance = self.manifest.golden.tolerance
        shapes = self.space.input_shapes()
        worst = 0.0
        for i, case in enumerate(cases):
            feeds = {
                name: np.asarray(values, dtype=np.int64).reshape(_concrete(shapes[name]))
                for name, values in case.inputs.items()
            }
            if set(feeds) != set(shapes):
                raise BundleRejected(
                    f"{self.directory}: golden case {i} has inputs {sorted(feeds)}, the graph "
                    f"takes {sorted(shapes)}"
                )
            got = self.predict(feeds).astype(np.float64)
            want = np.asarray(case.ctr, dtype=np.float64)
            if got.shape != want.shape:
                raise BundleRejected(
                    f"{self.directory}: golden case {i}: {got.shape[0]} scores, expected "
                    f"{want.shape[0]}"
                )
            diff = float(np.max(np.abs(got - want))) if got.size else 0.0
            if not diff <= tolerance:  # `not <=` also catches NaN
                raise BundleRejected(
                    f"{self.directory}: self-check failed: golden case {i} differs by {diff:.3g} "
                    f"(tolerance {tolerance:g})"
                )
            worst = max(worst, diff)
        return SelfCheck(len(cases), worst, tolerance)

    def warm_up(self, runs: int) -> None:
        """Full-length history, W1-sized candidate list: onnxruntime allocates on first use."""
        if runs <= 0:
            return
        feeds = sample_feeds(self.space, WARMUP_CANDIDATES, self.space.max_history_length)
        for _ in range(runs):
            self.predict(feeds)

    def summary(self) -> dict[str, Any]:
        """What GET /model shows: identity, contract, features, training metrics, self-check."""
        m = self.manifest
        check = self.self_check
        return {
            "name": self.name,
            "version": self.version,
            "manifest_version": m.version,
            "architecture": m.architecture,
            "path": str(self.directory),
            "created_at": m.created_at,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "preset": m.preset,
            "max_history_length": self.space.max_history_length,
            "max_categories": self.space.max_categories,
            "inputs": [spec.model_dump() for spec in m.inputs],
            "outputs": [spec.model_dump() for spec in m.outputs],
            "features": {
                "user": [name for name, _ in self.space.user_features],
                "context": [name for name, _ in self.space.context_features],
            },
            "vocabularies": {
                "items": self.space.items.size,
                "categories": self.space.categories.size,
            },
            "metrics": m.metrics,
            "self_check": None
            if check is None
            else {
                "cases": check.cases,
                "max_abs_diff": check.max_abs_diff,
                "tolerance": check.tolerance,
            },
            "onnx": m.onnx.model_dump(),
        }


def _thread_timed(
    predict: Callable[[dict[str, Int64Array]], NDArray[np.float32]],
    cpu_seconds: Callable[[float], None],
) -> Callable[[dict[str, Int64Array]], NDArray[np.float32]]:
    """predict, reporting the CPU time of each call on its own thread to cpu_seconds."""

    def run(feeds: dict[str, Int64Array]) -> NDArray[np.float32]:
        start = time.thread_time()
        try:
            return predict(feeds)
        finally:
            cpu_seconds(time.thread_time() - start)

    return run


def sample_feeds(
    space: FeatureSpace, candidates: int, history_length: int, seed: int = 0
) -> dict[str, Int64Array]:
    """One request's feeds of random known items, as features.py builds them for known ids.

    Categories come from the bundle's item table; user and context features are padding. For the
    warm-up and for timing the graph alone (bench/ceiling.py): a call's cost does not depend on
    which items it scores.
    """
    rng = np.random.default_rng(seed)
    high = max(space.items.size, FIRST_TOKEN_INDEX + 1)
    history = rng.integers(FIRST_TOKEN_INDEX, high, size=history_length)
    items = rng.integers(FIRST_TOKEN_INDEX, high, size=candidates)
    feeds: dict[str, Int64Array] = {
        HISTORY_ITEMS: history,
        HISTORY_CATEGORIES: space.item_categories[history],
        CANDIDATE_ITEMS: items,
        CANDIDATE_CATEGORIES: space.item_categories[items],
    }
    if space.user_features:
        feeds[USER_FEATURES] = np.zeros(len(space.user_features), dtype=np.int64)
    if space.context_features:
        feeds[CONTEXT_FEATURES] = np.zeros(len(space.context_features), dtype=np.int64)
    return feeds


def inference_pool(settings: Settings) -> ThreadPoolExecutor:
    """The threads that run graph calls: settings.inference_thread_count of them, FIFO beyond.

    As many calls at once as the cores hold, rather than one thread per request: graph
    concurrency stays bounded whatever CTR_MAX_IN_FLIGHT admits, and a call whose request is
    cancelled while it waits never runs. Throughput at normal load is the same as one thread
    per request within the measurement noise; under overload with 100 ms deadlines the pool
    answered up to 7x more requests in time (a call for an expired request never runs).
    """
    return ThreadPoolExecutor(
        max_workers=settings.inference_thread_count, thread_name_prefix="inference"
    )


def chunk_feeds(session: ort.InferenceSession, intra_op_threads: int) -> dict[str, Int64Array]:
    """{CHUNK_INPUT: whole history} when the graph has the input and runs on several threads.

    intra_op_threads 0 is onnxruntime's default, one thread per core: several on any machine
    this service is meant for.
    """
    overridable = {i.name for i in session.get_overridable_initializers()}
    if CHUNK_INPUT in overridable and intra_op_threads != 1:
        return {CHUNK_INPUT: WHOLE_HISTORY}
    return {}


def session_options(settings: Settings) -> ort.SessionOptions:
    """Explicit threads and optimisation level: onnxruntime's defaults take every core."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.ort_intra_op_threads
    options.inter_op_num_threads = settings.ort_inter_op_threads
    options.graph_optimization_level = GRAPH_LEVELS[settings.ort_graph_optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning workers burn a core between calls; on 2 shared cores that core is the event
    # loop's or a neighbour's (measured in docs/performance.md, "Threads and overload defaults").
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if settings.ort_allow_spinning else "0"
    )
    options.log_severity_level = 3  # errors only; warnings about unused initialisers are noise
    return options


# ----------------------------------------------------------------------------------------------
# Checks


def _feature_space(bundle: Bundle) -> FeatureSpace:
    manifest = bundle.manifest
    table = bundle.item_table()
    categories = bundle.categories()
    _check_size(bundle.directory, "items", table.items, manifest.vocabularies.items.size)
    _check_size(
        bundle.directory, "categories", categories, manifest.vocabularies.categories.size
    )
    c = manifest.max_categories
    matrix = np.array(table.category_matrix(categories, c), dtype=np.int64)

    def load_features(kind: str, entries: list[FeatureEntry]) -> tuple[tuple[str, Vocabulary], ...]:
        loaded = []
        for entry in entries:
            vocab = bundle.feature_vocabulary(entry)
            _check_size(bundle.directory, f"{kind} feature {entry.name}", vocab, entry.size)
            loaded.append((entry.name, vocab))
        return tuple(loaded)

    return FeatureSpace(
        items=table.items,
        categories=categories,
        item_categories=matrix.reshape(table.items.size, c),
        user_features=load_features("user", manifest.features.user),
        context_features=load_features("context", manifest.features.context),
        max_history_length=manifest.max_history_length,
    )


def _check_size(directory: Path, what: str, vocab: Vocabulary, size: int) -> None:
    if size != vocab.size:
        raise BundleRejected(
            f"{directory}: {what} vocabulary has {vocab.size} entries (lines + 2), manifest says "
            f"{size}"
        )


def _check_manifest_contract(
    directory: Path, manifest: Manifest, space: FeatureSpace
) -> None:
    """manifest.inputs/outputs must be exactly what features.py feeds and routes.py reads."""
    expected = space.input_shapes()
    declared = {spec.name: spec for spec in manifest.inputs}
    if set(declared) != set(expected):
        raise BundleRejected(
            f"{directory}: manifest inputs {sorted(declared)}, the features need "
            f"{sorted(expected)}"
        )
    for name, shape in expected.items():
        spec = declared[name]
        if spec.dtype != "int64" or _fixed(spec.shape) != _fixed(shape):
            raise BundleRejected(
                f"{directory}: input {name} is {spec.dtype} {spec.shape}, expected int64 {shape}"
            )
    ctr = manifest.output(OUTPUT)
    if ctr is None or ctr.dtype != "float32" or len(ctr.shape) != 1:
        raise BundleRejected(f"{directory}: manifest must declare output {OUTPUT} float32 [N]")


def _check_session_contract(
    directory: Path, manifest: Manifest, session: ort.InferenceSession
) -> None:
    """The real graph must take exactly the manifest's inputs, with its dtypes and ranks."""
    declared = {spec.name: spec for spec in manifest.inputs}
    actual = {i.name: i for i in session.get_inputs()}
    if set(actual) != set(declared):
        raise BundleRejected(
            f"{directory}/{MODEL_FILE}: graph inputs {sorted(actual)} differ from the manifest's "
            f"{sorted(declared)}"
        )
    for name, arg in actual.items():
        _match_arg(directory, "input", arg, declared[name])
    outputs = {o.name: o for o in session.get_outputs()}
    if OUTPUT not in outputs:
        raise BundleRejected(f"{directory}/{MODEL_FILE}: graph has no output {OUTPUT!r}")
    declared_output = manifest.output(OUTPUT)
    assert declared_output is not None  # _check_manifest_contract ran first
    _match_arg(directory, "output", outputs[OUTPUT], declared_output)


def _match_arg(directory: Path, kind: str, arg: Any, declared: TensorSpec) -> None:
    want_type = ORT_TYPES[declared.dtype]
    shape = declared.shape
    problem = None
    if arg.type != want_type:
        problem = f"type {arg.type}, manifest says {declared.dtype}"
    elif len(arg.shape) != len(shape):
        problem = f"rank {len(arg.shape)}, manifest says {len(shape)}"
    else:
        for got, want in zip(arg.shape, shape, strict=True):
            # A dynamic manifest dim (a letter) must be dynamic in the graph too; a fixed one
            # must be fixed to the same size or left dynamic.
            if isinstance(want, str) and isinstance(got, int):
                problem = f"shape {arg.shape} fixes a dimension the manifest calls {want!r}"
            elif isinstance(want, int) and isinstance(got, int) and got != want:
                problem = f"shape {arg.shape}, manifest says {shape}"
    if problem:
        raise BundleRejected(f"{directory}/{MODEL_FILE}: {kind} {arg.name}: {problem}")


def _fixed(shape: Sequence[int | str]) -> list[int | None]:
    """A manifest shape with symbolic dims as None, for comparison."""
    return [d if isinstance(d, int) else None for d in shape]


def _concrete(shape: list[str | int]) -> tuple[int, ...]:
    """A reshape target: fixed dims kept, the one dynamic dim inferred."""
    return tuple(d if isinstance(d, int) else -1 for d in shape)
