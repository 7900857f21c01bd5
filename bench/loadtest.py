"""`dinserve loadtest`: open-loop load against a scoring URL, at one rate or stepping to saturation.

This module owns the run: it turns the command line into LoadSettings, prepares the payloads
(bench/loadpayload.py), drives phases through the open-loop client (bench/loadclient.py) and hands
the results to bench/loadreport.py. Two modes:

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

import argparse
import asyncio
import math
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
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
from bench.loadhttp import Target, parse_header
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
from service.heap import frozen_heap

if TYPE_CHECKING:  # imported when --graph-ceiling is given: it loads onnxruntime
    from bench.ceiling import CeilingBracket

DEFAULT_URL = "http://127.0.0.1:8000/score"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "ctr"
# A hard ceiling on one phase, whatever rate x duration says: ~1M requests keep the per-request
# samples for the picture under ~20 MB.
MAX_REQUESTS_PER_PHASE = 1_000_000


@dataclass(frozen=True)
class LoadSettings:
    """How to load the target; defaults match `dinserve loadtest --help`."""

    url: str = DEFAULT_URL
    rate: float = 100.0
    duration: float = 10.0
    max_requests: int | None = None
    arrival: str = "constant"
    warmup: float = 1.0
    connections: int = 8
    max_connections: int = 256
    timeout: float = 5.0
    tick_ms: float = 1.0
    idle_timeout: float = 4.0
    seed: int = 0
    find_saturation: bool = False
    start_rate: float = 50.0
    step_factor: float = 1.5
    step_duration: float = 4.0
    max_rate: float = 20_000.0
    max_steps: int = 20
    p99_limit_ms: float = 100.0
    max_error_rate: float = 0.01
    track_ratio: float = 0.9
    refine: int = 2
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    fraction_duration: float = 10.0
    pause: float = 1.0
    headers: tuple[tuple[str, str], ...] = ()  # extra request headers (--header)
    server_metrics: bool = True  # read the target's /metrics around each phase

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.start_rate <= 0 or self.max_rate <= 0:
            raise ValueError("rates must be positive")
        if self.duration <= 0 or self.step_duration <= 0 or self.fraction_duration <= 0:
            raise ValueError("durations must be positive")
        if self.step_factor <= 1.0:
            raise ValueError(f"--step-factor must be > 1, got {self.step_factor}")
        if not 0 < self.track_ratio <= 1:
            raise ValueError(f"--track-ratio must be in (0, 1], got {self.track_ratio}")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"--fractions must be in (0, 1], got {self.fractions}")


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


def settings_from_args(args: argparse.Namespace, url: str) -> LoadSettings:
    fractions = tuple(float(f) for f in args.fractions.split(",") if f.strip())
    return LoadSettings(
        url=url, rate=args.rate, duration=args.duration, max_requests=args.max_requests,
        arrival=args.arrival, warmup=args.warmup, connections=args.connections,
        max_connections=args.max_connections, timeout=args.timeout, tick_ms=args.tick_ms,
        idle_timeout=args.idle_timeout,
        seed=args.seed,
        find_saturation=args.find_saturation, start_rate=args.start_rate,
        step_factor=args.step_factor, step_duration=args.step_duration, max_rate=args.max_rate,
        max_steps=args.max_steps, p99_limit_ms=args.p99_limit_ms,
        max_error_rate=args.max_error_rate, track_ratio=args.track_ratio, refine=args.refine,
        fractions=fractions, fraction_duration=args.fraction_duration, pause=args.pause,
        headers=tuple(parse_header(h) for h in args.header),
        server_metrics=not args.no_server_metrics,
    )


def prepare_payloads(args: argparse.Namespace) -> tuple[list[bytes], dict[str, Any]]:
    """Users, items, optional seeded histories, and the encoded bodies; plus their description."""
    redis_url = args.redis_url or os.environ.get("CTR_REDIS_URL", DEFAULT_REDIS_URL)
    prefix = args.prefix or os.environ.get("CTR_REDIS_PREFIX", DEFAULT_PREFIX)
    if args.users_file:
        users, users_from = read_users_file(args.users_file), f"file {args.users_file}"
    elif args.users_from_redis:
        users = users_from_redis(redis_url, prefix, args.users)
        users_from = f"redis {prefix}:hist:*"
    else:
        users, users_from = [str(i) for i in range(1, args.users + 1)], f"ids 1..{args.users}"
    if args.item_ids_from:
        items, items_from = read_items(args.item_ids_from), str(args.item_ids_from)
    else:
        items, items_from = items_from_range(args.item_range), f"range {args.item_range}"
    seeded = None
    if args.history_length is not None:
        count = seed_histories(redis_url, prefix, users, items, args.history_length,
                               seed=args.seed)
        seeded = {"users": count, "length": args.history_length, "prefix": prefix}
    context = orjson.loads(args.context) if args.context else None
    bodies = build_bodies(users, items, args.candidates, args.distinct_payloads,
                          with_categories=args.with_categories, context=context, seed=args.seed)
    description = {
        "users": len(users), "users_from": users_from,
        "items": len(items), "items_from": items_from,
        "candidates": args.candidates, "distinct_payloads": len(bodies),
        "body_bytes_mean": round(sum(map(len, bodies)) / len(bodies), 1),
        "with_categories": args.with_categories, "context": context,
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


def _ceiling_bracket(args: argparse.Namespace) -> CeilingBracket | None:
    """The bundle of --graph-ceiling, loaded and checked; None, after saying why, if not."""
    from bench.ceiling import CeilingBracket
    from service.errors import BundleRejected

    try:
        return CeilingBracket(Path(args.graph_ceiling), args.candidates, args.history_length,
                              args.ceiling_callers, args.ceiling_seconds)
    except (BundleRejected, ValueError) as exc:
        print(f"dinserve loadtest: error: --graph-ceiling: {exc}", file=sys.stderr)
        return None


def run(args: argparse.Namespace) -> int:
    """The `dinserve loadtest` handler; exit 0 unless no request at all succeeded."""
    started_at = _now()
    noop = None
    try:
        settings = settings_from_args(args, args.url)
    except ValueError as exc:  # a bad option: say which, as argparse would, without a traceback
        print(f"dinserve loadtest: error: {exc}", file=sys.stderr)
        return 2
    bracket = None
    if args.graph_ceiling:
        from bench.ceiling import describe

        bracket = _ceiling_bracket(args)
        if bracket is None:
            return 2
    try:
        bodies, payload = prepare_payloads(args)
        url = args.url
        if args.noop_server:
            noop, url = start_noop_server(_bounded_seconds(settings))
            settings = settings_from_args(args, url)
        print(f"loadtest: {settings.url}, {payload['distinct_payloads']} payloads of "
              f"{payload['candidates']} candidates (~{payload['body_bytes_mean']:.0f} B)",
              flush=True)
        if bracket is not None:
            print(f"graph ceiling before: {describe(bracket.measure())}", flush=True)
        # What setup built (payloads, imports) stays out of the collector's way while requests
        # are timed: a full collection would stall this loop for tens of ms (service/heap.py).
        with frozen_heap():
            result = run_loop(measure(settings, bodies), args.loop)
        if bracket is not None:
            print(f"graph ceiling after: {describe(bracket.measure())}", flush=True)
    finally:
        if noop is not None:
            noop.terminate()
            noop.wait(timeout=10)
    out_dir = Path(args.out or f"reports/loadtest/{started_at.replace(':', '')}")
    config = _jsonable({k: v for k, v in vars(args).items() if k != "handler"})
    config["url"] = settings.url
    config["header"] = [f"{name}: {_shown(name, value)}" for name, value in settings.headers]
    throughput = (result.saturation["saturation_rps"] if result.saturation
                  else max((p.achieved_rps for p in result.phases), default=0.0))
    ceiling = bracket.summary(throughput) if bracket is not None else None
    report = write_outputs(result, settings, payload, out_dir, started_at=started_at,
                           loop=args.loop, picture=not args.no_picture, config=config,
                           graph_ceiling=ceiling)
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
