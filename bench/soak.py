"""`dinserve soak`: run the real service under steady load for a long time; report drift and growth.

This module owns the soak run. It starts `python -m service` on a free loopback port (its own
process, so its memory is the service's alone), finds the service's saturation throughput with
the load tester's saturation search unless --rate is given, and then offers --fraction of it
(70% by default) for --duration seconds, open loop (bench/loadclient.py), cut into --window
second windows. A sampler thread reads the service's RSS from /proc every --rss-interval seconds.

The report (report.json in --out) has, per window, the achieved rate, p50/p99/max latency,
errors and the RSS at its end; and a summary: errors in total, the p99 drift (last window
against the first), and the RSS growth from the end of the first window (after warm-up and the
allocator's first growth) to the end of the run, in percent and as a least-squares slope in
MiB per hour. The run passes when there was no error and the RSS grew less than
--max-rss-growth percent; the exit status says so (0 pass, 1 fail, 2 the service did not start).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.loadclient import OpenLoopClient, PhaseResult, arrival_offsets, run_loop
from bench.loadhttp import Target
from bench.loadpayload import build_bodies, read_items, seed_histories
from bench.loadreport import write_json
from bench.loadtest import measure
from bench.machinecpu import describe, steal_of
from dinserve import processes
from dinserve.bench_commands import LoadSettings, SoakOptions, SoakSettings
from service.config import redact_url

ROOT = Path(__file__).resolve().parent.parent
EXIT_PASS, EXIT_FAIL, EXIT_NO_SERVICE = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# The service process and its memory


class ServiceUnderTest:
    """`python -m service` on a free loopback port, started and stopped by this run."""

    def __init__(self, settings: SoakSettings, log_path: Path) -> None:
        self.port = processes.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "CTR_ACCESS_LOG": "false", "CTR_RELOAD_POLL_SECONDS": "0",
               "CTR_REDIS_PREFIX": settings.prefix, **settings.service_env}
        self.argv = [sys.executable, "-m", "service", "--model-dir", str(settings.model_dir),
                     "--redis-url", settings.redis_url, "--host", "127.0.0.1",
                     "--port", str(self.port)]
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> bool:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = processes.spawn(self.argv, env=self.env, cwd=ROOT, stdout=log,
                                           stderr=log)
        outcome = processes.wait_until_answering(self.process, f"{self.url}/healthz", timeout)
        return outcome == "ready"

    def stop(self) -> int | None:
        if self.process is None:
            return None
        code = processes.stop(self.process, timeout=30.0)
        self.process = None
        return code

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def rss_mib(pid: int) -> float | None:
    """Resident set size of a process and all its descendants from /proc (Linux), MiB.

    With CTR_WORKERS > 1 the process started is uvicorn's supervisor and the workers, which hold
    the model and serve, are its children: a leak in them must count. None when the process is
    gone. Pages shared between processes count once per process, which overstates the total but
    not its growth.
    """
    own = _process_rss_kib(pid)
    if own is None:
        return None
    return (own + sum(_process_rss_kib(child) or 0 for child in descendants(pid))) / 1024.0


def descendants(pid: int) -> list[int]:
    """Every live process below pid, from the parent ids in /proc/<n>/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after it.
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return found


def _process_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return 0  # a zombie has no VmRSS line


class RssSampler:
    """Reads a process's RSS every interval seconds in a daemon thread."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (monotonic seconds, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_mib(self.pid)
            if value is not None:
                self.samples.append((time.monotonic(), value))
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def latest(self) -> float | None:
        return self.samples[-1][1] if self.samples else None


# ----------------------------------------------------------------------------------------------
# Load


def find_saturation(url: str, bodies: list[bytes], settings: SoakSettings) -> dict[str, Any]:
    """The load tester's saturation search, without its fraction phases."""
    load = LoadSettings(url=url, find_saturation=True, start_rate=settings.start_rate,
                        step_duration=settings.step_duration, p99_limit_ms=settings.p99_limit_ms,
                        fractions=(1.0,), fraction_duration=settings.step_duration, warmup=1.0,
                        timeout=settings.timeout, refine=1, pause=0.5)
    result = run_loop(measure(load, bodies), "asyncio")
    assert result.saturation is not None
    return {k: v for k, v in result.saturation.items() if k != "fractions"}


async def soak_windows(url: str, bodies: list[bytes], rate: float, settings: SoakSettings,
                       sampler: RssSampler
                       ) -> tuple[list[PhaseResult], list[float | None], float]:
    """Unrecorded warm-up, then back-to-back windows at `rate`; RSS read at each window's end.

    Also returns when (time.monotonic) the first window ended: the steady state starts there.
    """
    client = OpenLoopClient(Target.parse(url), bodies, max_connections=256,
                            initial_connections=16, timeout=settings.timeout)
    phases: list[PhaseResult] = []
    rss: list[float | None] = []
    first_end = 0.0
    await client.open()
    try:
        if settings.warmup > 0:
            await client.run_phase("warmup", arrival_offsets(rate, settings.warmup, None), rate,
                                   record=False)
        count = max(1, round(settings.duration / settings.window))
        for k in range(count):
            offsets = arrival_offsets(rate, settings.window, None, seed=k)
            phase = await client.run_phase(f"window-{k + 1}", offsets, rate)
            phases.append(phase)
            rss.append(rss_mib(sampler.pid))
            if k == 0:
                first_end = time.monotonic()
            steal = "" if phase.machine is None else f", {describe(phase.machine)}"
            print(f"soak: window {k + 1}/{count}: {phase.ok} ok, {phase.error_count} errors, "
                  f"p99 {phase.percentile_ms('p99'):.2f} ms, RSS {rss[-1] or 0:.1f} MiB{steal}",
                  flush=True)
    finally:
        await client.close()
    return phases, rss, first_end


# ----------------------------------------------------------------------------------------------
# Summary


def slope_per_hour(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS over time, MiB per hour (0 with fewer than 3 samples)."""
    if len(samples) < 3:
        return 0.0
    t0 = samples[0][0]
    xs = [t - t0 for t, _ in samples]
    ys = [v for _, v in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys,
                                                                         strict=True)) / den * 3600


def summarize(phases: list[PhaseResult], rss: list[float | None],
              samples: list[tuple[float, float]], first_end: float,
              settings: SoakSettings) -> dict[str, Any]:
    errors: dict[str, int] = {}
    for phase in phases:
        for reason, n in phase.errors.items():
            errors[reason] = errors.get(reason, 0) + n
    requests = sum(p.finished for p in phases)
    p99s = [p.percentile_ms("p99") for p in phases]
    known = [r for r in rss if r is not None]
    baseline = known[0] if known else None
    final = known[-1] if known else None
    growth = ((final - baseline) / baseline * 100.0) if baseline and final else None
    # From the end of the first window: before it, the allocator and onnxruntime warm up.
    steady = [s for s in samples if s[0] >= first_end]
    total_errors = sum(errors.values())
    passed = total_errors == 0 and growth is not None and growth < settings.max_rss_growth
    return {
        "requests": requests,
        "errors": errors,
        "error_count": total_errors,
        "error_rate": round(total_errors / requests, 6) if requests else None,
        "p99_ms_first_window": p99s[0] if p99s else None,
        "p99_ms_last_window": p99s[-1] if p99s else None,
        "p99_ms_max_window": max(p99s) if p99s else None,
        "p99_ms_min_window": min(p99s) if p99s else None,
        "p99_drift_pct": round((p99s[-1] - p99s[0]) / p99s[0] * 100.0, 2)
        if p99s and p99s[0] else None,
        "rss_mib_baseline": baseline,
        "rss_mib_final": final,
        "rss_mib_max": max((v for _, v in samples), default=None),
        "rss_growth_pct": round(growth, 3) if growth is not None else None,
        "rss_slope_mib_per_hour": round(slope_per_hour(steady), 3),
        "max_rss_growth_pct": settings.max_rss_growth,
        "passed": passed,
    }


def window_rows(phases: list[PhaseResult], rss: list[float | None]) -> list[dict[str, Any]]:
    return [{
        "name": p.name, "offered_rps": round(p.offered_rps, 3),
        "achieved_rps": round(p.achieved_rps, 3), "ok": p.ok, "errors": dict(p.errors),
        "degraded": p.degraded, "p50_ms": p.percentile_ms("p50"),
        "p99_ms": p.percentile_ms("p99"), "max_ms": p.percentile_ms("max"), "rss_mib": r,
        # A window's p99 moves with the host's steal as much as with the service (machinecpu.py).
        "steal_pct": steal_of(p.machine),
    } for p, r in zip(phases, rss, strict=True)]


# ----------------------------------------------------------------------------------------------
# The command


def soak(settings: SoakSettings, out_dir: Path) -> tuple[int, dict[str, Any]]:
    """Run one soak; returns (exit status, report). The report is also written to out_dir."""
    started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    items = read_items(settings.model_dir)
    users = [f"soak-{i}" for i in range(settings.users)]
    if settings.history_length is not None:
        seed_histories(settings.redis_url, settings.prefix, users, items,
                       settings.history_length)
    bodies = build_bodies(users, items, settings.candidates, 256)
    service = ServiceUnderTest(settings, out_dir / "service.log")
    shown = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
    shown["redis_url"] = redact_url(settings.redis_url)  # a password stays out of the report
    report: dict[str, Any] = {"tool": "dinserve soak", "started_at": started_at,
                              "settings": shown}
    if not service.start():
        service.stop()
        report["error"] = f"the service did not start; see {service.log_path}"
        write_json(report, out_dir / "report.json")
        return EXIT_NO_SERVICE, report
    sampler = RssSampler(service.pid, settings.rss_interval).start()
    try:
        url = f"{service.url}/score"
        saturation = None
        rate = settings.rate
        if rate is None:
            saturation = find_saturation(url, bodies, settings)
            rate = settings.fraction * float(saturation["saturation_rps"])
            print(f"soak: saturation {saturation['saturation_rps']:.1f}/s, soaking at "
                  f"{settings.fraction:.0%}: {rate:.1f}/s", flush=True)
        phases, rss, first_end = asyncio.run(soak_windows(url, bodies, rate, settings,
                                                          sampler))
        alive = service.process is not None and service.process.poll() is None
    finally:
        sampler.stop()
        exit_code = service.stop()
    summary = summarize(phases, rss, sampler.samples, first_end, settings)
    summary["service_alive_at_end"] = alive
    summary["service_exit_code"] = exit_code
    summary["passed"] = summary["passed"] and alive and exit_code == 0
    report.update({
        "finished_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rate_rps": round(rate, 3),
        "saturation": saturation,
        "windows": window_rows(phases, rss),
        "rss_samples": [{"t_s": round(t - sampler.samples[0][0], 2), "mib": v}
                        for t, v in sampler.samples],
        "summary": summary,
    })
    write_json(report, out_dir / "report.json")
    return (EXIT_PASS if summary["passed"] else EXIT_FAIL), report


def run(options: SoakOptions) -> int:
    """The `dinserve soak` handler."""
    settings = options.settings
    out_dir = options.out or Path(
        f"reports/soak/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    code, report = soak(settings, out_dir)
    summary = report.get("summary")
    if summary is None:
        print(f"soak: {report.get('error')}", file=sys.stderr)
        return code
    print(f"soak: {summary['requests']} requests at {report['rate_rps']:.1f}/s, "
          f"{summary['error_count']} errors; p99 first/last window "
          f"{summary['p99_ms_first_window']:.2f}/{summary['p99_ms_last_window']:.2f} ms "
          f"(drift {summary['p99_drift_pct']}%); RSS {summary['rss_mib_baseline']:.1f} -> "
          f"{summary['rss_mib_final']:.1f} MiB ({summary['rss_growth_pct']}%, "
          f"{summary['rss_slope_mib_per_hour']} MiB/h); "
          f"{'PASS' if summary['passed'] else 'FAIL'}")
    print(f"report: {out_dir / 'report.json'}")
    return code
