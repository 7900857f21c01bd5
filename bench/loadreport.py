"""The outputs of `dinserve loadtest`: the JSON report, the latency picture and the console table.

The JSON report is the record a person or a script compares across runs (schema below, version
in "schema_version"); the PNG is for looking at: latency of every request against the time it
was scheduled (a stall shows as a ramp of late requests, the signature of an open-loop
measurement), the latency percentile curve of each phase, and, in saturation mode, offered
against achieved throughput with p99 beside it.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from bench.loadclient import PhaseResult
from bench.machinecpu import describe as describe_machine
from bench.servermetrics import format_summary

SCHEMA_VERSION = 1
# A scatter of more points than this says nothing more and takes seconds to draw.
MAX_SCATTER_POINTS = 60_000


def phase_to_dict(phase: PhaseResult) -> dict[str, Any]:
    finished = phase.finished
    lengths = phase.history_lengths
    sampled = sum(lengths.values())
    return {
        "name": phase.name,
        "offered_rps": round(phase.offered_rps, 3),
        "scheduled": phase.scheduled,
        "finished": finished,
        "ok": phase.ok,
        "achieved_rps": round(phase.achieved_rps, 3),
        "elapsed_s": round(phase.elapsed_s, 3),
        "errors": dict(sorted(phase.errors.items())),
        "error_rate": round(phase.error_count / finished, 6) if finished else 0.0,
        # Latency from each request's scheduled send time to its last response byte, 2xx only.
        "latency_ms": phase.summary["latency"],
        # From the moment the bytes were written: what a closed-loop tester would report.
        "service_time_ms": phase.summary["service_time"],
        # The target's own account from its /metrics, when it has one (bench/servermetrics.py).
        "server": phase.server,
        # The whole machine over the phase: busy and host-steal shares (bench/machinecpu.py).
        "machine": asdict(phase.machine) if phase.machine else None,
        "client": {
            "cpu_s": round(phase.client_cpu_s, 4),
            "cpu_user_s": round(phase.client_cpu_user_s, 4),
            "cpu_sys_s": round(phase.client_cpu_sys_s, 4),
            "cpu_us_per_request": (round(phase.client_cpu_s / finished * 1e6, 2)
                                   if finished else None),
            "dispatch_lag_ms": phase.summary["dispatch_lag"],
            "connections_opened": phase.connections_opened,
            "peak_connections": phase.peak_connections,
            "queued_at_cap": phase.queued_at_cap,
            "first_queued_at_s": phase.first_queued_at_s,
            "max_waiting": phase.max_waiting,
            "stale_retries": phase.stale_retries,
        },
        "responses": {
            "degraded": phase.degraded,
            "history_length": ({
                "sampled": sampled,
                "min": min(lengths),
                "max": max(lengths),
                "mean": round(sum(k * v for k, v in lengths.items()) / sampled, 2),
            } if sampled else None),
            "model_versions": dict(phase.model_versions),
        },
    }


def noisiest_phase(phases: Sequence[PhaseResult]) -> tuple[str, float] | None:
    """The phase in which the host took the largest share of CPU time, and that share (%)."""
    measured = [(p.name, p.machine.steal_pct) for p in phases
                if p.machine is not None and p.machine.steal_pct is not None]
    return max(measured, key=lambda named: named[1], default=None)


def build_report(*, target: str, mode: str, config: dict[str, Any], payload: dict[str, Any],
                 phases: Sequence[PhaseResult], saturation: dict[str, Any] | None,
                 started_at: str, finished_at: str, event_loop: str,
                 picture: str | None) -> dict[str, Any]:
    cpu = sum(p.client_cpu_s for p in phases)
    user = sum(p.client_cpu_user_s for p in phases)
    finished = sum(p.finished for p in phases)
    noisiest = noisiest_phase(phases)
    return {
        "tool": "dinserve loadtest",
        "schema_version": SCHEMA_VERSION,
        "started_at": started_at,
        "finished_at": finished_at,
        "target": target,
        "mode": mode,
        "config": config,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "event_loop": event_loop,
            # The largest share of CPU time the host took in any phase, and where.
            "steal_pct_max": noisiest[1] if noisiest else None,
            "steal_phase": noisiest[0] if noisiest else None,
        },
        "payload": payload,
        "phases": [phase_to_dict(p) for p in phases],
        "saturation": saturation,
        "client": {
            # Process CPU of the tester over all recorded phases: what it took from the machine.
            "cpu_s": round(cpu, 4),
            "cpu_us_per_request": round(cpu / finished * 1e6, 2) if finished else None,
            # User time is the tester's Python; system time is mostly the loopback TCP stack.
            "user_us_per_request": round(user / finished * 1e6, 2) if finished else None,
        },
        "picture": picture,
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")


def _curve(phase: PhaseResult, service: bool = False) -> tuple[list[float], list[float]]:
    """(x, latency ms) points of the percentile curve, x = 1 / (1 - percentile)."""
    hist = phase.service_time if service else phase.latency
    total = hist.get_total_count()
    if total == 0:
        return [], []
    # Percentiles from 0 up to what the sample count can resolve (1 - 1/n), in one pass.
    top = math.log10(max(total, 2))
    steps = 120
    nines = [top * k / steps for k in range(steps + 1)]
    pcts = [100.0 * (1.0 - 10.0 ** -n) for n in nines]
    values = hist.get_percentile_to_value_dict(pcts)
    return [10.0 ** n for n in nines], [values.get(p, 0) / 1000.0 for p in pcts]


def draw_picture(phases: Sequence[PhaseResult], path: Path, *, title: str,
                 saturation: dict[str, Any] | None = None) -> bool:
    """Write the PNG: latency over time, percentile curves, and the saturation panel if any.

    Returns False, after saying so in one line, when matplotlib (the dev extra) is missing.
    """
    try:
        import matplotlib
    except ImportError:
        print(f"picture: skipped {path.name}: matplotlib is not installed "
              "(pip install matplotlib, or the project's dev extra)", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 3 if saturation else 2
    fig, axes = plt.subplots(rows, 1, figsize=(11, 4.2 * rows), constrained_layout=True)
    palette = 10 if len(phases) <= 10 else 20
    cmap = plt.get_cmap(f"tab{palette}")

    def colors(i: int) -> Any:
        return cmap(i % palette)

    ax = axes[0]
    t0 = min((p.start_time for p in phases), default=0.0)
    total = sum(len(p.offsets) for p in phases)
    stride = max(1, math.ceil(total / MAX_SCATTER_POINTS))
    error_labelled = False
    for i, phase in enumerate(phases):
        base = phase.start_time - t0
        ok_x, ok_y, bad_x, bad_y = [], [], [], []
        for j in range(0, len(phase.offsets), stride):
            x = base + phase.offsets[j]
            y = max(phase.latencies_ms[j], 1e-3)
            if 200 <= phase.statuses[j] < 300:
                ok_x.append(x)
                ok_y.append(y)
            else:
                bad_x.append(x)
                bad_y.append(y)
        ax.scatter(ok_x, ok_y, s=3, color=colors(i), alpha=0.6, linewidths=0,
                   label=f"{phase.name} ({phase.offered_rps:.0f}/s)" if len(phases) <= 12 else None)
        if bad_x:
            ax.scatter(bad_x, bad_y, s=10, marker="x", color="red", linewidths=0.8,
                       label=None if error_labelled else "error / timeout")
            error_labelled = True
        ax.axvline(base, color="grey", linewidth=0.5, alpha=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("scheduled send time since start (s)")
    ax.set_ylabel("latency from scheduled send (ms)")
    ax.set_title(title + (f"  (every {stride}th request)" if stride > 1 else ""))
    ax.grid(True, which="both", alpha=0.3)
    if len(phases) <= 12:
        ax.legend(loc="upper left", fontsize=7, ncol=2)

    ax = axes[1]
    curve_phases = [p for p in phases if p.latency.get_total_count()]
    for i, phase in enumerate(phases):
        if phase not in curve_phases:
            continue
        xs, ys = _curve(phase)
        ax.plot(xs, ys, color=colors(i), linewidth=1.4,
                label=f"{phase.name} ({phase.offered_rps:.0f}/s)")
        if len(curve_phases) <= 2:
            xs, ys = _curve(phase, service=True)
            ax.plot(xs, ys, color=colors(i), linewidth=1.0, linestyle="--",
                    label=f"{phase.name}: from actual send (closed-loop view)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000, 100000]
    ax.set_xticks(ticks, ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    ax.set_xlim(1, max(10.0, max((p.latency.get_total_count() for p in curve_phases),
                                 default=10)))
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title("latency percentiles (HDR histogram)")
    ax.grid(True, which="both", alpha=0.3)
    if curve_phases:
        ax.legend(loc="upper left", fontsize=7)

    if saturation:
        ax = axes[2]
        steps = [p for p in phases if p.name.startswith(("step", "refine"))]
        steps.sort(key=lambda p: p.offered_rps)
        offered = [p.offered_rps for p in steps]
        achieved = [p.achieved_rps for p in steps]
        ax.plot(offered, achieved, "o-", color="tab:blue", label="achieved (2xx/s)")
        if offered:
            ax.plot([0, max(offered)], [0, max(offered)], ":", color="grey",
                    label="achieved = offered")
        sat = saturation.get("saturation_rps")
        if sat:
            ax.axhline(sat, color="tab:green", linestyle="--", linewidth=1,
                       label=f"saturation {sat:.0f}/s")
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_ylabel("throughput (requests/s)")
        ax.grid(True, alpha=0.3)
        twin = ax.twinx()
        p99 = [p.percentile_ms("p99") if p.ok else math.nan for p in steps]
        twin.plot(offered, p99, "s--", color="tab:red", label="p99 latency (ms)")
        twin.set_yscale("log")
        twin.set_ylabel("p99 (ms)", color="tab:red")
        lines = ax.get_legend_handles_labels()
        lines2 = twin.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
        ax.set_title(f"saturation search: stopped because {saturation.get('stop_reason')}")

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def format_table(phases: Sequence[PhaseResult]) -> str:
    """A fixed-width console summary, one line per phase."""
    head = (f"{'phase':<14}{'offered/s':>10}{'achieved/s':>11}{'ok':>8}{'errors':>8}"
            f"{'p50':>9}{'p90':>9}{'p99':>9}{'p99.9':>9}{'max':>9}  ms   cpu µs/req")
    lines = [head]
    for p in phases:
        s = p.summary["latency"]
        cpu = p.client_cpu_s / p.finished * 1e6 if p.finished else 0.0
        lines.append(
            f"{p.name:<14}{p.offered_rps:>10.1f}{p.achieved_rps:>11.1f}{p.ok:>8}"
            f"{p.error_count:>8}{s['p50']:>9.2f}{s['p90']:>9.2f}{s['p99']:>9.2f}"
            f"{s['p99.9']:>9.2f}{s['max']:>9.2f}{cpu:>14.1f}")
        if p.errors:
            errors = ", ".join(f"{k}={v}" for k, v in sorted(p.errors.items()))
            lines.append(f"    errors: {errors}")
        if p.degraded:
            lines.append(f"    {p.degraded} answers said degraded: true (scored without history)")
        if p.queued_at_cap:
            lines.append(f"    {p.queued_at_cap} requests queued with the pool at its cap "
                         f"(first at {p.first_queued_at_s} s)")
        if p.server:
            lines.append(f"    {format_summary(p.server)}")
        if p.machine:
            lines.append(f"    {describe_machine(p.machine)}")
    return "\n".join(lines)
