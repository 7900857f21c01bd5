"""How busy the whole machine was during a measurement, and how much of its time the host took.

On a shared VM the host runs other work on the physical cores behind the vCPUs; the time a vCPU
was ready to run but not running is *steal* (Linux /proc/stat, read here through psutil). It is
the one sign of a noisy neighbour a guest can read: on a 2-vCPU VM of docs/performance.md the
W1 graph ceiling read 219-242 calls/s at 0-2 % steal and 204-206 at 6-9 %. `dinserve loadtest`
(per phase), `dinserve soak` (per window), `dinserve ceiling` and `dinserve bench` record it, so
a report says when the machine, not the service, moved a figure. The counters are machine-wide:
everything running counts, the load tester included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil

# At 6-9 % steal the graph ceiling read 10-15 % below its quiet value (docs/performance.md): from
# 5 % on, a run's figures say as much about the host as about the service.
NOISY_STEAL_PCT = 5.0


@dataclass(frozen=True)
class CpuWindow:
    """Shares of all CPUs' time over one window, in percent."""

    busy_pct: float  # running anything: user, system, interrupts
    steal_pct: float | None  # taken by the host; None where the OS does not report it


def snapshot() -> Any:
    """The machine's cumulative CPU times (all CPUs summed), for window()."""
    return psutil.cpu_times()


def window(before: Any, after: Any) -> CpuWindow | None:
    """Busy and steal shares between two snapshots; None if no time was counted between them.

    The kernel counts in ticks (10 ms on most Linux builds), so a window shorter than a few
    ticks per CPU reads coarsely.
    """
    fields = before._fields

    def spent(name: str) -> float:
        return getattr(after, name) - getattr(before, name) if name in fields else 0.0

    # Linux counts guest time inside user (and guest_nice inside nice) too: subtract it once.
    total = sum(spent(name) for name in fields) - spent("guest") - spent("guest_nice")
    if total <= 0:
        return None
    idle = spent("idle") + spent("iowait")
    steal = spent("steal") if "steal" in fields else None
    busy = total - idle - (steal or 0.0)
    return CpuWindow(
        busy_pct=round(100.0 * busy / total, 2),
        steal_pct=round(100.0 * steal / total, 2) if steal is not None else None,
    )


def steal_of(cpu: CpuWindow | None) -> float | None:
    """The steal share of a window that may not have been read."""
    return cpu.steal_pct if cpu is not None else None


def steal_suffix(steal_pct: float | None) -> str:
    """", 4.1 % steal" for a console line, or nothing where steal is not reported."""
    return "" if steal_pct is None else f", {steal_pct:.1f} % steal"


def describe(cpu: CpuWindow) -> str:
    return f"machine {cpu.busy_pct:.0f} % busy{steal_suffix(cpu.steal_pct)}"
