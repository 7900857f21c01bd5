"""`dinserve loadtest`: open-loop load against a scoring URL, at one rate or stepping to saturation.

This module owns the run: it takes LoadtestOptions (dinserve/bench_commands.py), prepares the
payloads (bench/loadpayload.py), drives phases through the open-loop client (bench/loadclient.py)
and hands the results to bench/loadreport.py. Two modes:

- constant: one phase at --rate for --duration (after an unrecorded --warmup);
- --find-saturation: phases of --step-duration at geometrically rising rates until a step fails
  (throughput below --track-ratio x offered, p99 above --p99-limit-ms, or an error rate above
  --max-error-rate), a few bisection steps between the last pass and the first failure, then
  one phase at each --fractions of the saturation throughput (p50/p99 at 25/50/75% by default).

Saturation throughput is the highest 2xx rate any step achieved: once the server is the
bottleneck, the open-loop client keeps offering more and the server's real capacity is what
comes back. Every phase is bounded by a request count and a timeout, so every run ends by itself.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from bench.loadclient import (
    OpenLoopClient,
    PhaseResult,
    arrival_offsets,
    event_loop_name,
    run_loop,
)
from bench.loadhttp import Target
from bench.loadpayload import (
    build_bodies,
    items_from_range,
    read_items,
    read_users_file,
    seed_histories,
    users_from_redis,
)
from bench.loadreport import build_report, draw_picture, format_table, write_json
from bench.machinecpu import NOISY_STEAL_PCT, steal_of
from bench.servermetrics import metrics_url, phase_summary, scrape
from dinserve.bench_commands import (
    LoadSettings,
    LoadtestOptions,
    PayloadOptions,
    prefix_or_default,
    redis_url_or_default,
)
from dinserve.options import flat
from service.config import redact_url
from service.heap import frozen_heap

if TYPE_CHECKING:  # imported when --graph-ceiling is given: it loads onnxruntime
    from bench.ceiling import CeilingBracket

# A hard ceiling on one phase, whatever rate x duration says: ~1M requests keep the per-request
# samples for the picture under ~20 MB.
MAX_REQUESTS_PER_PHASE = 1_000_000


@dataclass
class LoadRun:
    """What a run measured, before it is written out."""

    target: str
    phases: list[PhaseResult] = field(default_factory=list)
    saturation: dict[str, Any] | None = None


def _offsets(settings: LoadSettings, rate: float, duration: float, salt: int) -> list[float]:
    cap = MAX_REQUESTS_PER_PHASE
    if settings.max_requests is not None:
        cap = min(cap, settings.max_requests)
    return arrival_offsets(rate, duration, cap, settings.arrival, seed=settings.seed + salt)


def step_verdict(phase: PhaseResult, settings: LoadSettings) -> str | None:
    """None when a saturation step kept up with its offered rate, else why it did not."""
    finished = phase.finished
    if phase.ok == 0:
        return "no successful responses"
    error_rate = phase.error_count / finished if finished else 1.0
    if error_rate > settings.max_error_rate:
        return f"error rate {error_rate:.2%} > {settings.max_error_rate:.2%}"
    if phase.achieved_rps < settings.track_ratio * phase.offered_rps:
        return (f"throughput {phase.achieved_rps:.0f}/s < {settings.track_ratio:g} x offered "
                f"{phase.offered_rps:.0f}/s")
    p99 = phase.percentile_ms("p99")
    if p99 > settings.p99_limit_ms:
        return f"p99 {p99:.1f} ms > {settings.p99_limit_ms:g} ms"
    return None


def _ms(phase: PhaseResult, name: str) -> float:
    return phase.percentile_ms(name) if phase.ok else 0.0


async def _saturation(client: OpenLoopClient, settings: LoadSettings,
                      phases: list[PhaseResult],
                      run: Callable[[str, float, float], Awaitable[PhaseResult]]
                      ) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []

    async def step(name: str, rate: float) -> str | None:
        phase = await run(name, rate, settings.step_duration)
        verdict = step_verdict(phase, settings)
        steps.append({"name": name, "offered_rps": round(rate, 3),
                      "achieved_rps": round(phase.achieved_rps, 3),
                      "p50_ms": _ms(phase, "p50"), "p99_ms": _ms(phase, "p99"),
                      "error_rate": round(phase.error_count / max(phase.finished, 1), 6),
                      "passed": verdict is None, "verdict": verdict or "ok",
                      "steal_pct": steal_of(phase.machine)})
        return verdict

    rate = settings.start_rate
    last_pass: float | None = None
    first_fail: float | None = None
    stop_reason = f"--max-steps {settings.max_steps} reached without failing (not saturated)"
    for k in range(settings.max_steps):
        verdict = await step(f"step-{k + 1}", rate)
        if verdict is not None:
            first_fail, stop_reason = rate, verdict
            break
        last_pass = rate
        if rate * settings.step_factor > settings.max_rate:
            stop_reason = f"--max-rate {settings.max_rate:g}/s reached (not saturated)"
            break
        rate *= settings.step_factor
    if first_fail is not None and last_pass is not None:
        lo, hi = last_pass, first_fail
        for k in range(settings.refine):
            mid = math.sqrt(lo * hi)
            if await step(f"refine-{k + 1}", mid) is None:
                lo = mid
            else:
                hi = mid
        last_pass = lo
    saturation_rps = max((p.achieved_rps for p in phases), default=0.0)
    fractions: list[dict[str, Any]] = []
    if saturation_rps > 0:
        for frac in settings.fractions:
            phase = await run(f"at-{frac:.0%}", frac * saturation_rps,
                              settings.fraction_duration)
            fractions.append({
                "fraction": frac, "name": phase.name,
                "offered_rps": round(phase.offered_rps, 3),
                "achieved_rps": round(phase.achieved_rps, 3),
                "p50_ms": _ms(phase, "p50"), "p90_ms": _ms(phase, "p90"),
                "p99_ms": _ms(phase, "p99"), "p99.9_ms": _ms(phase, "p99.9"),
                "errors": dict(phase.errors),
                "steal_pct": steal_of(phase.machine),
            })
    return {
        "saturation_rps": round(saturation_rps, 3),
        "sustainable_rate_rps": round(last_pass, 3) if last_pass is not None else None,
        "stop_reason": stop_reason,
        "criteria": {"track_ratio": settings.track_ratio, "p99_limit_ms": settings.p99_limit_ms,
                     "max_error_rate": settings.max_error_rate},
        "steps": steps,
        "fractions": fractions,
    }


async def measure(settings: LoadSettings, bodies: Sequence[bytes]) -> LoadRun:
    """Drive the target as the settings say; returns every recorded phase."""
    target = Target.parse(settings.url, headers=settings.headers)
    client = OpenLoopClient(target, bodies, max_connections=settings.max_connections,
                            initial_connections=settings.connections, timeout=settings.timeout,
                            tick=settings.tick_ms / 1000.0, idle_timeout=settings.idle_timeout)
    result = LoadRun(target=target.url)
    salt = 0
    scrape_url = metrics_url(target.url) if settings.server_metrics else None
    route = target.path.split("?", 1)[0]

    async def run(name: str, rate: float, duration: float, record: bool = True) -> PhaseResult:
        nonlocal salt
        salt += 1
        # Scraped outside the measured window, on a thread of its own (the sender's loop must
        # not wait on it), and again once the phase has drained: the difference is its requests.
        before = await asyncio.to_thread(scrape, scrape_url) if scrape_url and record else None
        phase = await client.run_phase(name, _offsets(settings, rate, duration, salt), rate,
                                       record=record)
        if record:
            result.phases.append(phase)
        # Let the target drain before the next phase: after an overloaded phase it may still hold
        # up to its slowest answer's worth of queued work (and the requests we timed out), which
        # would otherwise land on the next phase's first seconds.
        slowest = max(phase.latencies_ms, default=0.0) / 1000.0
        drain = max(settings.pause, min(slowest, settings.timeout))
        if drain > 0:
            await asyncio.sleep(drain)
        if before is not None and scrape_url is not None:
            after = await asyncio.to_thread(scrape, scrape_url)
            if after is not None:
                phase.server = phase_summary(before, after, route)
        return phase

    try:
        await client.open()
        first_rate = settings.start_rate if settings.find_saturation else settings.rate
        if settings.warmup > 0:
            await run("warmup", first_rate, settings.warmup, record=False)
        if settings.find_saturation:
            result.saturation = await _saturation(client, settings, result.phases, run)
        else:
            await run("constant", settings.rate, settings.duration)
    finally:
        await client.close()
    return result


def start_noop_server(max_seconds: float) -> tuple[subprocess.Popen[str], str]:
    """Start bench/noopserver.py on a free loopback port; returns the process and its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.noopserver", "--port", "0",
         "--max-seconds", str(max_seconds)],
        stdout=subprocess.PIPE, text=True,
        cwd=str(Path(__file__).resolve().parent.parent))
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "listening":
        proc.kill()
        raise RuntimeError("the no-op server did not start")
    return proc, f"http://127.0.0.1:{line[1]}/score"


def _bounded_seconds(s: LoadSettings) -> float:
    """An upper bound on a run's wall time, for the no-op server's own deadline."""
    per_phase = 2 * s.timeout + 2 + s.pause
    if s.find_saturation:
        phases = s.max_steps + s.refine
        return (s.warmup + phases * (s.step_duration + per_phase)
                + len(s.fractions) * (s.fraction_duration + per_phase) + 60)
    return s.warmup + s.duration + 2 * per_phase + 60


def prepare_payloads(payload: PayloadOptions, seed: int) -> tuple[list[bytes], dict[str, Any]]:
    """Users, items, optional seeded histories, and the encoded bodies; plus their description."""
    redis_url = redis_url_or_default(payload.redis_url)
    prefix = prefix_or_default(payload.prefix)
    if payload.users_file:
        users, users_from = read_users_file(payload.users_file), f"file {payload.users_file}"
    elif payload.users_from_redis:
        users = users_from_redis(redis_url, prefix, payload.users)
        users_from = f"redis {prefix}:hist:*"
    else:
        users, users_from = [str(i) for i in range(1, payload.users + 1)], f"ids 1..{payload.users}"
    if payload.item_ids_from:
        items, items_from = read_items(payload.item_ids_from), str(payload.item_ids_from)
    else:
        items, items_from = items_from_range(payload.item_range), f"range {payload.item_range}"
    seeded = None
    if payload.history_length is not None:
        count = seed_histories(redis_url, prefix, users, items, payload.history_length, seed=seed)
        seeded = {"users": count, "length": payload.history_length, "prefix": prefix}
    context = orjson.loads(payload.context) if payload.context else None
    bodies = build_bodies(users, items, payload.candidates, payload.distinct_payloads,
                          with_categories=payload.with_categories, context=context, seed=seed)
    description = {
        "users": len(users), "users_from": users_from,
        "items": len(items), "items_from": items_from,
        "candidates": payload.candidates, "distinct_payloads": len(bodies),
        "body_bytes_mean": round(sum(map(len, bodies)) / len(bodies), 1),
        "with_categories": payload.with_categories, "context": context,
        "history_seeded": seeded,
    }
    return bodies, description


def write_outputs(run_result: LoadRun, settings: LoadSettings, payload: dict[str, Any],
                  out_dir: Path, *, started_at: str, loop: str, picture: bool,
                  config: dict[str, Any] | None = None,
                  graph_ceiling: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.json (and latency.png) into out_dir; returns the report."""
    mode = "saturation" if settings.find_saturation else "constant"
    png = out_dir / "latency.png"
    report = build_report(
        target=run_result.target, mode=mode,
        config=config if config is not None else _jsonable(asdict(settings)),
        payload=payload, phases=run_result.phases, saturation=run_result.saturation,
        started_at=started_at, finished_at=_now(), event_loop=event_loop_name(loop),
        picture=None)
    if graph_ceiling is not None:
        report["graph_ceiling"] = graph_ceiling
    # The record first, whatever happens to the picture: matplotlib is optional (dev extra) and
    # drawing takes seconds. report.json names the picture only once it exists.
    write_json(report, out_dir / "report.json")
    if picture and run_result.phases and draw_picture(
            run_result.phases, png, saturation=run_result.saturation,
            title=f"dinserve loadtest {mode}: {run_result.target}"):
        report["picture"] = png.name
        write_json(report, out_dir / "report.json")
    return report


def _shown(name: str, value: str) -> str:
    """A header value as the report may keep it: credentials are not written to disk."""
    secret = any(word in name.lower() for word in ("auth", "cookie", "token", "key", "secret"))
    return "<redacted>" if secret else value


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
            for k, v in value.items() if not callable(v)}


def _ceiling_bracket(model_dir: Path, options: LoadtestOptions) -> CeilingBracket | None:
    """The bundle of --graph-ceiling, loaded and checked; None, after saying why, if not."""
    from bench.ceiling import CeilingBracket
    from service.errors import BundleRejected

    try:
        return CeilingBracket(model_dir, options.payload.candidates,
                              options.payload.history_length, options.ceiling_callers,
                              options.ceiling_seconds)
    except (BundleRejected, ValueError) as exc:
        print(f"dinserve loadtest: error: --graph-ceiling: {exc}", file=sys.stderr)
        return None


def report_config(options: LoadtestOptions, settings: LoadSettings) -> dict[str, Any]:
    """The report's `config`: every option, as run (the no-op server's URL), secrets hidden."""
    config = _jsonable(flat(options))
    config["url"] = settings.url
    del config["headers"]  # as given, values and all: credentials stay out of the report
    if config.get("redis_url"):
        config["redis_url"] = redact_url(config["redis_url"])
    config["header"] = [f"{name}: {_shown(name, value)}" for name, value in settings.headers]
    return config


def run(options: LoadtestOptions) -> int:
    """The `dinserve loadtest` handler; exit 0 unless no request at all succeeded."""
    started_at = _now()
    noop = None
    settings = options.load
    bracket = None
    if options.graph_ceiling:
        from bench.ceiling import describe

        bracket = _ceiling_bracket(options.graph_ceiling, options)
        if bracket is None:
            return 2
    try:
        bodies, payload = prepare_payloads(options.payload, settings.seed)
        if options.noop_server:
            noop, url = start_noop_server(_bounded_seconds(settings))
            settings = replace(settings, url=url)
        print(f"loadtest: {settings.url}, {payload['distinct_payloads']} payloads of "
              f"{payload['candidates']} candidates (~{payload['body_bytes_mean']:.0f} B)",
              flush=True)
        if bracket is not None:
            print(f"graph ceiling before: {describe(bracket.measure())}", flush=True)
        # What setup built (payloads, imports) stays out of the collector's way while requests
        # are timed: a full collection would stall this loop for tens of ms (service/heap.py).
        with frozen_heap():
            result = run_loop(measure(settings, bodies), options.loop)
        if bracket is not None:
            print(f"graph ceiling after: {describe(bracket.measure())}", flush=True)
    finally:
        if noop is not None:
            noop.terminate()
            noop.wait(timeout=10)
    out_dir = options.out or Path(f"reports/loadtest/{started_at.replace(':', '')}")
    throughput = (result.saturation["saturation_rps"] if result.saturation
                  else max((p.achieved_rps for p in result.phases), default=0.0))
    ceiling = bracket.summary(throughput) if bracket is not None else None
    report = write_outputs(result, settings, payload, out_dir, started_at=started_at,
                           loop=options.loop, picture=not options.no_picture,
                           config=report_config(options, settings), graph_ceiling=ceiling)
    print(format_table(result.phases))
    if result.saturation:
        sat = result.saturation
        print(f"saturation: {sat['saturation_rps']:.1f}/s (stopped: {sat['stop_reason']})")
        for row in sat["fractions"]:
            steal = "" if row["steal_pct"] is None else f" ({row['steal_pct']:.1f} % steal)"
            print(f"  at {row['fraction']:.0%} ({row['offered_rps']:.1f}/s): "
                  f"p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms{steal}")
    if ceiling is not None and ceiling["share_of_ceiling"]:
        shares = " / ".join(f"{share:.0%}" for share in ceiling["share_of_ceiling"])
        print(f"throughput {throughput:.1f}/s = {shares} of the graph's ceiling (before / after)")
    print(f"client: {report['client']['cpu_us_per_request']} µs CPU per request")
    steal, phase = report["machine"]["steal_pct_max"], report["machine"]["steal_phase"]
    if steal is not None and steal >= NOISY_STEAL_PCT:
        print(f"note: the host took {steal:.1f} % of this machine's CPU time in phase {phase} "
              f"(steal): its throughput and tail latency understate the service there")
    print(f"report: {out_dir / 'report.json'}"
          + (f", picture: {out_dir / report['picture']}" if report["picture"] else ""))
    return 0 if any(p.ok for p in result.phases) else 1
