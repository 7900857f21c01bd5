"""`dinserve ceiling`: how many calls per second a bundle's serving graph sustains on this machine.

The service is measured against "the graph's own ceiling": the same bundle's graph, loaded
as the service loads it (service.model.CTRModel: the same session options from the same CTR_*
settings, the chunk feed, the self-check, the warm-up), called back to back by 1..K threads with
one request shape and nothing else to do. With K = the service's inference threads it is what the
service would serve if HTTP, Redis and the features cost nothing. `dinserve loadtest
--graph-ceiling` measures it right before and after its load and reports the share, because on a
shared VM the ceiling itself drifts by 10 % within minutes (docs/performance.md).

The feeds are random known items with the bundle's own categories, what features.py builds for
known ids; a graph call's cost does not depend on the values. Torch-free, like the service.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import machinecpu
from bench.loadreport import write_json
from dinserve.bench_commands import CeilingOptions
from service.bundle import CANDIDATE_ITEMS, HISTORY_ITEMS
from service.config import Settings
from service.errors import BundleRejected
from service.features import Int64Array
from service.model import CTRModel, sample_feeds


@dataclass(frozen=True)
class CeilingResult:
    """One caller count's measurement: throughput, CPU and latency per graph call."""

    callers: int
    seconds: float
    calls: int
    calls_per_s: float
    cpu_ms_per_call: float  # thread CPU of a call, mean over all calls
    p50_ms: float
    p99_ms: float
    max_ms: float
    # The host's share of the machine's CPU time meanwhile (bench/machinecpu.py); None if unknown.
    steal_pct: float | None = None


def load_model(model_dir: Path) -> CTRModel:
    """The bundle as `dinserve serve` would load it with the current CTR_* environment."""
    return CTRModel.load(model_dir, Settings(model_dir=model_dir))


def graph_feeds(model: CTRModel, candidates: int, history_length: int | None,
                seed: int = 0) -> dict[str, Int64Array]:
    """One request's feeds (service.model.sample_feeds) at a shape the service can feed.

    history_length None means the bundle's max_history_length; more than that is an error, since
    the service never feeds a longer history.
    """
    space = model.space
    length = space.max_history_length if history_length is None else history_length
    if candidates < 1:
        raise ValueError(f"--candidates must be at least 1 (got {candidates})")
    if not 0 <= length <= space.max_history_length:
        raise ValueError(
            f"--history-length must be between 0 and the bundle's max_history_length "
            f"{space.max_history_length} (got {length})"
        )
    return sample_feeds(space, candidates, length, seed)


def measure_ceiling(model: CTRModel, feeds: dict[str, Int64Array], callers: int,
                    seconds: float) -> CeilingResult:
    """`callers` threads call model.predict back to back for `seconds`; calls they completed."""
    if callers < 1 or not seconds > 0:
        raise ValueError("callers must be at least 1 and seconds positive")
    start = threading.Barrier(callers + 1)
    walls: list[list[float]] = [[] for _ in range(callers)]
    cpus = [0.0] * callers
    failures: list[BaseException] = []
    deadline = 0.0

    def call_until_deadline(k: int) -> None:
        start.wait()
        cpu = time.thread_time()
        mine = walls[k]
        try:
            while (t := time.perf_counter()) < deadline:
                model.predict(feeds)
                mine.append(time.perf_counter() - t)
        except BaseException as exc:  # reported to the caller, not lost in a thread
            failures.append(exc)
        cpus[k] = time.thread_time() - cpu

    threads = [threading.Thread(target=call_until_deadline, args=(k,), name=f"ceiling-{k}")
               for k in range(callers)]
    for thread in threads:
        thread.start()
    machine = machinecpu.snapshot()
    began = time.perf_counter()
    deadline = began + seconds  # set before the barrier releases the callers
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    cpu = machinecpu.window(machine, machinecpu.snapshot())
    if failures:
        raise failures[0]
    latencies = np.sort(np.concatenate([np.asarray(w) for w in walls])) * 1e3
    calls = int(latencies.size)
    if calls == 0:
        raise RuntimeError(f"no graph call finished within {seconds:g} s")
    return CeilingResult(
        callers=callers, seconds=round(elapsed, 3), calls=calls,
        calls_per_s=round(calls / elapsed, 2),
        cpu_ms_per_call=round(sum(cpus) / calls * 1e3, 4),
        p50_ms=round(float(np.percentile(latencies, 50)), 4),
        p99_ms=round(float(np.percentile(latencies, 99)), 4),
        max_ms=round(float(latencies[-1]), 4),
        steal_pct=machinecpu.steal_of(cpu),
    )


def describe(result: CeilingResult) -> str:
    noun = "caller" if result.callers == 1 else "callers"
    steal = machinecpu.steal_suffix(result.steal_pct)
    return (f"{result.callers} {noun}: {result.calls_per_s:.1f} calls/s (CPU "
            f"{result.cpu_ms_per_call:.2f} ms per call, p50 {result.p50_ms:.2f} ms, "
            f"p99 {result.p99_ms:.2f} ms, {result.calls} calls{steal})")


def ceiling_report(model_dir: Path, candidates: int, history_length: int | None,
                   callers: Sequence[int], seconds: float, seed: int = 0,
                   model: CTRModel | None = None) -> dict[str, Any]:
    """Measure every caller count on one loaded bundle; the report's JSON form."""
    model = model or load_model(model_dir)
    feeds = graph_feeds(model, candidates, history_length, seed)
    results = [measure_ceiling(model, feeds, k, seconds) for k in callers]
    return {
        "bundle": str(model.directory),
        "candidates": candidates,
        "history_length": int(feeds[HISTORY_ITEMS].shape[0]),
        "results": [asdict(r) for r in results],
    }


def run(options: CeilingOptions) -> int:
    """The `dinserve ceiling` handler: 0, or 2 for a bundle or option that cannot be measured."""
    try:
        report = ceiling_report(options.model_dir, options.candidates, options.history_length,
                                options.callers, options.seconds, options.seed)
    except (BundleRejected, ValueError) as exc:
        print(f"dinserve ceiling: error: {exc}", file=sys.stderr)
        return 2
    print(f"graph ceiling of {report['bundle']} at {report['candidates']} candidates x "
          f"{report['history_length']} history:")
    for row in report["results"]:
        print(f"  {describe(CeilingResult(**row))}")
    if options.out:
        write_json(report, options.out)
        print(f"report: {options.out}")
    return 0


class CeilingBracket:
    """The ceiling measured right before and right after a load test, for `dinserve loadtest`.

    The service and the load tester must be idle while it runs: it takes the cores it measures.
    """

    def __init__(self, model_dir: Path, candidates: int, history_length: int | None,
                 callers: int | None, seconds: float) -> None:
        self.model = load_model(model_dir)
        if history_length is not None:  # the service reads at most the bundle's max length
            history_length = min(history_length, self.model.space.max_history_length)
        self.feeds = graph_feeds(self.model, candidates, history_length)
        settings = Settings(model_dir=model_dir)
        self.callers = callers or settings.inference_thread_count
        self.seconds = seconds
        self.before: CeilingResult | None = None
        self.after: CeilingResult | None = None

    def measure(self) -> CeilingResult:
        """Before on the first call, after on the second."""
        result = measure_ceiling(self.model, self.feeds, self.callers, self.seconds)
        if self.before is None:
            self.before = result
        else:
            self.after = result
        return result

    def summary(self, throughput: float | None) -> dict[str, Any]:
        """The report's `graph_ceiling`: both measurements, and throughput as a share of each."""
        measured = [r for r in (self.before, self.after) if r is not None]
        shares = ([round(throughput / r.calls_per_s, 4) for r in measured]
                  if throughput else [])
        return {
            "bundle": str(self.model.directory),
            "candidates": int(self.feeds[CANDIDATE_ITEMS].shape[0]),
            "history_length": int(self.feeds[HISTORY_ITEMS].shape[0]),
            "callers": self.callers,
            "before": asdict(self.before) if self.before else None,
            "after": asdict(self.after) if self.after else None,
            "throughput_rps": throughput,
            "share_of_ceiling": shares,  # against before, after
        }
