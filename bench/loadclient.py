"""The open-loop HTTP/1.1 engine behind `dinserve loadtest`: schedule, connection pool, timing.

Requests leave at precomputed times (constant or Poisson arrivals), whatever the server does, and
each latency runs from the request's *scheduled* send time to the last byte of its response. A
server that stalls therefore shows the stall in every request that should have been sent during
it, not only in the one that was in flight (Gil Tene's "coordinated omission"; wrk2 measures the
same way). Keep-alive connections come from a pool that grows when every connection is busy, up
to a cap; requests that find the pool at its cap wait in a FIFO and are counted, and their wait
is part of their latency.

The tester shares two cores with the service it measures, so the client is kept cheap: request
bytes are encoded once up front, connections are asyncio Protocols with a hand-written response
parser (no streams, no per-request task, future or timer), and each request only appends to flat
arrays while the load runs; the HDR histograms are filled after each phase.
"""

from __future__ import annotations

import asyncio
import math
import random
import resource
import ssl
from array import array
from collections import Counter, deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, TypeVar

import orjson
from hdrh.histogram import HdrHistogram

from bench import machinecpu
from bench.loadhttp import HttpConnection, Job, Target
from bench.machinecpu import CpuWindow

# Latencies are recorded in microseconds, from 1 µs to 1 h, with 3 significant digits.
HIST_LOWEST_US = 1
HIST_HIGHEST_US = 3_600_000_000
HIST_DIGITS = 3

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9),
)

T = TypeVar("T")

# Parsing every response body would cost as much as the rest of the client; one in N 2xx bodies
# is decoded to report what the service saw (history length, model version).
BODY_SAMPLE_EVERY = 16


def new_histogram() -> HdrHistogram:
    return HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_DIGITS)


def summarize(hist: HdrHistogram, total_us: int) -> dict[str, float | int]:
    """Percentiles, max and mean of a microsecond histogram, in milliseconds.

    One pass over the counts for all percentiles (hdrh's per-percentile query walks the whole
    array each time), and the mean from the recorded total rather than hdrh's slow iterator.
    """
    count = hist.get_total_count()
    out: dict[str, float | int] = {"count": count}
    values = hist.get_percentile_to_value_dict([pct for _, pct in PERCENTILES]) if count else {}
    for name, pct in PERCENTILES:
        out[name] = round(values.get(pct, 0) / 1000.0, 3)
    out["max"] = round(hist.get_max_value() / 1000.0, 3) if count else 0.0
    out["mean"] = round(total_us / count / 1000.0, 3) if count else 0.0
    return out


def arrival_offsets(rate: float, duration: float, max_requests: int | None,
                    arrival: str = "constant", seed: int = 0) -> list[float]:
    """Send times in seconds from the phase start: every 1/rate, or Poisson with mean rate.

    The count is bounded by both the duration and max_requests, so every phase ends by itself.
    """
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    limit = math.ceil(rate * duration)
    if max_requests is not None:
        limit = min(limit, max_requests)
    if arrival == "constant":
        return [i / rate for i in range(limit)]
    if arrival != "poisson":
        raise ValueError(f"arrival must be 'constant' or 'poisson', got {arrival!r}")
    rng = random.Random(seed)
    offsets: list[float] = []
    t = 0.0
    while len(offsets) < limit:
        offsets.append(t)
        t += rng.expovariate(rate)
        if t >= duration:
            break
    return offsets


@dataclass
class PhaseResult:
    """Everything measured during one phase at one offered rate.

    While the phase runs, each finished request only appends to flat arrays (cheap); finalize()
    then fills the HDR histograms, outside the measured window.
    """

    name: str
    offered_rps: float
    scheduled: int
    duration_s: float
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    # Filled by finalize(): latency from scheduled send (2xx), service time from the actual write
    # (2xx; what a closed-loop tester reports), and how late the client dispatched (all).
    latency: HdrHistogram = field(default_factory=new_histogram)
    service_time: HdrHistogram = field(default_factory=new_histogram)
    dispatch_lag: HdrHistogram = field(default_factory=new_histogram)
    start_time: float = 0.0  # perf_counter() of the phase's first scheduled send
    elapsed_s: float = 0.0
    client_cpu_user_s: float = 0.0
    client_cpu_sys_s: float = 0.0
    # The whole machine over the same window: busy and steal shares (bench/machinecpu.py).
    machine: CpuWindow | None = None
    # Requests that found every connection busy with the pool at its cap, and when that began.
    queued_at_cap: int = 0
    first_queued_at_s: float | None = None
    max_waiting: int = 0
    # Requests resent because the server closed their reused keep-alive connection before
    # reading them (an idle-timeout race); their latency still runs from the scheduled time.
    stale_retries: int = 0
    connections_opened: int = 0
    peak_connections: int = 0
    degraded: int = 0
    history_lengths: Counter[int] = field(default_factory=Counter)
    model_versions: Counter[str] = field(default_factory=Counter)
    # One entry per finished request: scheduled offset (s), latency from it (ms), status (0 when
    # there was no HTTP answer), service time (ms; -1 when there was no answer).
    offsets: array[float] = field(default_factory=lambda: array("d"))
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    statuses: array[int] = field(default_factory=lambda: array("H"))
    service_ms: array[float] = field(default_factory=lambda: array("d"))
    # One entry per dispatched request: how long after its scheduled time the client saw it (ms).
    lag_ms: array[float] = field(default_factory=lambda: array("d"))
    # Filled by finalize(): summarize() of latency, service_time and dispatch_lag.
    summary: dict[str, dict[str, float | int]] = field(default_factory=dict)
    # The target's own account of the phase from its /metrics (bench/servermetrics.py), if any.
    server: dict[str, Any] | None = None

    @property
    def finished(self) -> int:
        return self.ok + sum(self.errors.values())

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def client_cpu_s(self) -> float:
        return self.client_cpu_user_s + self.client_cpu_sys_s

    @property
    def achieved_rps(self) -> float:
        """2xx answers per second of the phase (schedule span, or longer if answers lagged)."""
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def finalize(self) -> None:
        totals = {"latency": 0, "service_time": 0, "dispatch_lag": 0}

        def record(hist: HdrHistogram, ms: float, name: str) -> None:
            us = min(max(int(ms * 1000.0), HIST_LOWEST_US), HIST_HIGHEST_US)
            hist.record_value(us)
            totals[name] += us

        for status, latency, service in zip(self.statuses, self.latencies_ms, self.service_ms,
                                            strict=True):
            if 200 <= status < 300:
                record(self.latency, latency, "latency")
                record(self.service_time, service, "service_time")
        for lag in self.lag_ms:
            record(self.dispatch_lag, lag, "dispatch_lag")
        self.summary = {
            "latency": summarize(self.latency, totals["latency"]),
            "service_time": summarize(self.service_time, totals["service_time"]),
            "dispatch_lag": summarize(self.dispatch_lag, totals["dispatch_lag"]),
        }

    def percentile_ms(self, name: str) -> float:
        """A latency percentile of the 2xx answers ("p50", "p99", "max", ...), in ms."""
        return float(self.summary["latency"][name]) if self.summary else 0.0


class OpenLoopClient:
    """A pool of keep-alive connections to one target, driven phase by phase at fixed rates.

    Timeouts are enforced by a sweeper that looks at every connection each `sweep` seconds
    rather than by one timer per request (cheaper; a timeout may fire up to `sweep` late).
    Times come from time.perf_counter(), not loop.time(): uvloop's loop clock is cached once per
    iteration at millisecond resolution. The dispatcher wakes at most once per `tick` (1 ms) and
    sends every request whose time has come, so a request may leave up to about a tick after its
    scheduled time; that lag is part of its latency (the honest direction) and is reported as
    dispatch_lag. tick=0 sends on time but spins the loop between close requests (a CPU core).
    """

    def __init__(self, target: Target, payloads: Sequence[bytes], *, max_connections: int,
                 initial_connections: int, timeout: float, tick: float = 0.001,
                 idle_timeout: float = 4.0) -> None:
        if not payloads:
            raise ValueError("at least one payload is needed")
        if max_connections < 1 or initial_connections < 0 or timeout <= 0:
            raise ValueError("max_connections >= 1, initial_connections >= 0, timeout > 0")
        self.target = target
        self._payloads = [target.encode_post(body) for body in payloads]
        self.max_connections = max_connections
        self.initial_connections = min(initial_connections, max_connections)
        self.timeout = timeout
        self.tick = max(tick, 0.0)
        self.idle_timeout = idle_timeout
        self.sweep = min(0.05, timeout / 4)
        self.loop = asyncio.get_running_loop()
        self._ssl = ssl.create_default_context() if target.scheme == "https" else None
        self._conns: set[HttpConnection] = set()
        self._idle: list[HttpConnection] = []
        self._waiting: deque[Job] = deque()
        self._connecting = 0
        self._phase: PhaseResult | None = None
        self._phase_start = 0.0
        self._remaining = 0
        self._done = asyncio.Event()
        self._last_answer = 0.0
        self._ok_seen = 0

    # -- connections --------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the initial connections (failures are left for the first phase to report)."""
        results = await asyncio.gather(
            *(self._connect() for _ in range(self.initial_connections)), return_exceptions=True)
        for conn in results:
            if isinstance(conn, HttpConnection):
                self._conns.add(conn)
                self._idle.append(conn)

    async def _connect(self) -> HttpConnection:
        async with asyncio.timeout(self.timeout):
            _, conn = await self.loop.create_connection(
                lambda: HttpConnection(self), self.target.host, self.target.port, ssl=self._ssl)
        return conn

    async def _grow(self) -> None:
        try:
            conn = await self._connect()
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self._connecting -= 1
            # The request that asked for this connection cannot be sent: it fails, not the run.
            if self._waiting:
                self.on_failure(self._waiting.popleft(), f"connect: {type(exc).__name__}")
            self._pump()
            return
        self._connecting -= 1
        self._conns.add(conn)
        if self._phase is not None:
            self._phase.connections_opened += 1
            self._phase.peak_connections = max(self._phase.peak_connections, len(self._conns))
        self._release(conn)

    def _release(self, conn: HttpConnection) -> None:
        """Give a free connection the oldest waiting request that is still in time, or park it."""
        if conn.closed:
            return
        waiting = self._waiting
        while waiting:
            if self._send(conn, waiting.popleft()):
                return
        conn.idle_since = perf_counter()
        self._idle.append(conn)

    def on_lost(self, conn: HttpConnection) -> None:
        self._conns.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        self._pump()

    def _pump(self) -> None:
        """Hand waiting requests to idle connections; grow the pool for the rest, up to the cap."""
        waiting, idle = self._waiting, self._idle
        while waiting and idle:
            self._release(idle.pop())
        wanted = min(len(waiting) - self._connecting,
                     self.max_connections - len(self._conns) - self._connecting)
        for _ in range(max(wanted, 0)):
            self._connecting += 1
            self.loop.create_task(self._grow())

    def _send(self, conn: HttpConnection, job: Job) -> bool:
        now = perf_counter()
        deadline = job[1] + self.timeout
        if now >= deadline:
            # It waited for a connection longer than the whole timeout: a timeout, never sent.
            self.on_failure(job, "timeout")
            return False
        conn.send(job, self._payloads[job[0] % len(self._payloads)], now, deadline)
        return True

    async def _sweeper(self) -> None:
        waiting = self._waiting
        while True:
            await asyncio.sleep(self.sweep)
            now = perf_counter()
            for conn in list(self._conns):
                if conn.job is not None and conn.deadline <= now:
                    conn.expire()
            # Close connections idle for longer than the server would keep them (uvicorn: 5 s),
            # before it closes them under us; idle is LIFO, so the oldest sit at the front.
            idle = self._idle
            while idle and now - idle[0].idle_since > self.idle_timeout:
                idle.pop(0).drop()
            while waiting and waiting[0][1] + self.timeout <= now:
                self.on_failure(waiting.popleft(), "timeout")

    # -- outcomes -----------------------------------------------------------------------------

    def on_answer(self, conn: HttpConnection, job: Job, sent_at: float, status: int,
                   body: bytes) -> None:
        now = perf_counter()
        phase = self._phase
        if phase is not None:
            if 200 <= status < 300:
                phase.ok += 1
                self._inspect_body(phase, body)
            else:
                phase.errors[str(status)] += 1
            phase.offsets.append(job[1] - self._phase_start)
            phase.latencies_ms.append((now - job[1]) * 1000.0)
            phase.statuses.append(status)
            phase.service_ms.append((now - sent_at) * 1000.0)
            self._last_answer = now
        self._finish_one()
        self._release(conn)

    def _inspect_body(self, phase: PhaseResult, body: bytes) -> None:
        if b'"degraded":true' in body or b'"degraded": true' in body:
            phase.degraded += 1
        self._ok_seen += 1
        if self._ok_seen % BODY_SAMPLE_EVERY != 1:
            return
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if isinstance(doc, dict):
            if isinstance(doc.get("history_length"), int):
                phase.history_lengths[doc["history_length"]] += 1
            if "model_version" in doc:
                phase.model_versions[str(doc["model_version"])] += 1

    def on_stale(self, job: Job) -> None:
        """Resend a request whose reused connection was closed before it was read (counted)."""
        if self._phase is not None:
            self._phase.stale_retries += 1
        self._waiting.appendleft(job)
        self._pump()

    def on_failure(self, job: Job, reason: str) -> None:
        phase = self._phase
        if phase is not None:
            phase.errors[reason] += 1
            phase.offsets.append(job[1] - self._phase_start)
            phase.latencies_ms.append((perf_counter() - job[1]) * 1000.0)
            phase.statuses.append(0)
            phase.service_ms.append(-1.0)
        self._finish_one()

    def _finish_one(self) -> None:
        self._remaining -= 1
        if self._remaining <= 0:
            self._done.set()

    # -- phases -------------------------------------------------------------------------------

    async def run_phase(self, name: str, offsets: Sequence[float], offered_rps: float,
                        record: bool = True) -> PhaseResult:
        """Send one request at each offset (seconds from now + 50 ms) and wait for all answers.

        Returns when every request has been answered, failed or timed out: at the latest about
        one timeout after the last scheduled send.
        """
        span = len(offsets) / offered_rps if offered_rps > 0 else 0.0
        phase = PhaseResult(name=name, offered_rps=offered_rps, scheduled=len(offsets),
                            duration_s=span)
        phase.peak_connections = len(self._conns)
        self._phase = phase if record else None
        self._remaining = len(offsets)
        self._done = asyncio.Event()
        if not offsets:
            self._done.set()
        loop = self.loop
        start = perf_counter() + 0.05
        self._phase_start = start
        phase.start_time = start
        self._last_answer = start
        sweeper = loop.create_task(self._sweeper())
        cpu_start = resource.getrusage(resource.RUSAGE_SELF)
        machine_start = machinecpu.snapshot()
        waiting, lag = self._waiting, phase.lag_ms
        counted_upto = -1
        i, n = 0, len(offsets)
        try:
            while i < n:
                now = perf_counter()
                while i < n and start + offsets[i] <= now:
                    scheduled = start + offsets[i]
                    lag.append((now - scheduled) * 1000.0)
                    waiting.append((i, scheduled))
                    i += 1
                self._pump()
                if waiting and len(self._conns) + self._connecting >= self.max_connections:
                    # Jobs enter `waiting` in index order, so those past the watermark are new.
                    newest = waiting[-1][0]
                    phase.queued_at_cap += min(len(waiting), newest - counted_upto)
                    counted_upto = newest
                    if phase.first_queued_at_s is None:
                        phase.first_queued_at_s = round(now - start, 3)
                    phase.max_waiting = max(phase.max_waiting, len(waiting))
                if i < n:
                    # Never shorter than a tick: sub-millisecond sleeps make the loop spin.
                    await asyncio.sleep(max(start + offsets[i] - perf_counter(), self.tick))
            last = start + (offsets[-1] if offsets else 0.0)
            try:
                async with asyncio.timeout_at(last + self.timeout + 10 * self.sweep + 1.0):
                    await self._done.wait()
            except TimeoutError:
                # Only a connect stuck past its own timeout could get here; the run still ends.
                phase.errors["unfinished"] += self._remaining
        finally:
            sweeper.cancel()
        cpu_end = resource.getrusage(resource.RUSAGE_SELF)
        phase.machine = machinecpu.window(machine_start, machinecpu.snapshot())
        phase.client_cpu_user_s = cpu_end.ru_utime - cpu_start.ru_utime
        phase.client_cpu_sys_s = cpu_end.ru_stime - cpu_start.ru_stime
        phase.elapsed_s = max(span, self._last_answer - start)
        self._phase = None
        if record:
            phase.finalize()
        return phase

    async def close(self) -> None:
        for conn in list(self._conns):
            conn.drop()
        self._idle.clear()
        await asyncio.sleep(0)


def run_loop(coro: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """Run on uvloop when present (cheaper per request), else on asyncio's own loop."""
    if loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


def event_loop_name(loop: str) -> str:
    if loop == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"
