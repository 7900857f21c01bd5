"""Fault suite: the real service (uvicorn subprocess) under open-loop load while something breaks.

Each scenario runs the load tester (bench/loadtest.py: open loop, latency from the scheduled send)
at a steady rate well under saturation, injects one fault for a few seconds, ends it, and reads
every request's outcome by its scheduled time: before, during, after the fault. A probe then
measures recovery: the time from the end of the fault to the first answer scored with a real
history again. Redis is always a redis-server of the test's own on a free loopback port (killed,
paused, put to sleep, capped): never the shared server.

Asserted for every fault, in the default degrade mode: every request answered 200 (no 5xx, no
timeout, no dropped connection), the fault was real (some answers degraded), the process is
alive, p99 during the fault stays under the Redis deadline plus MARGIN_MS, and recovery comes
within RECOVERY_S. MARGIN_MS and RECOVERY_S are generous on purpose (2 shared cores in CI); the
real figures are printed (pytest -s) and summarised in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from service_helpers import ServiceProcess, item_ids, metric
from tcp_proxy import TcpProxy

from bench.loadclient import PhaseResult, run_loop
from bench.loadtest import LoadSettings, measure
from dinserve.redis_server import LocalRedis
from service.history import keys

DEADLINE_MS = 100
MARGIN_MS = 1000  # asserted bound: p99 during a fault < DEADLINE_MS + MARGIN_MS
RECOVERY_S = 10.0  # asserted bound on recovery after the fault ends
RATE = 40.0  # requests/s: well under the ~120/s this service scores on CI's 2 shared cores
BEFORE, DURING, AFTER = 1.5, 2.5, 2.5  # seconds of load around the fault
CANDIDATES = 50
FIGURES = os.environ.get("FAULT_FIGURES")  # a JSON-lines file to append each scenario's figures to


class FaultRedis(LocalRedis):
    """A redis-server owned by one test, restartable on its port, with DEBUG enabled."""

    def __init__(self) -> None:
        super().__init__(debug=True)

    def client(self, **options: Any) -> redis.Redis:
        """A client that waits out DEBUG SLEEP and CLIENT PAUSE (10 s socket timeout)."""
        return super().client(**{"socket_timeout": 10, **options})


@pytest.fixture
def fault_redis() -> Iterator[FaultRedis]:
    server = FaultRedis()
    if server.binary is None:
        pytest.skip("no redis-server binary to start a private server")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def serve(serve: Callable[..., ServiceProcess]) -> Callable[..., ServiceProcess]:
    """The shared `serve` (conftest.py), with this module's Redis deadline and key prefix."""

    def start(model_dir: Path, redis_url: str, **overrides: Any) -> ServiceProcess:
        settings = {"redis_deadline_ms": str(DEADLINE_MS), "redis_prefix": "f", **overrides}
        return serve(model_dir, redis_url, **settings)

    return start


def seed(url: str, bundle: Path, users: int = 20) -> list[bytes]:
    """Histories for users u0..u19 and one request body per user."""
    ids = item_ids(bundle)
    with redis.Redis.from_url(url) as r:
        for u in range(users):
            r.rpush(keys("f", f"u{u}")[0], *[ids[(u * 7 + k) % len(ids)] for k in range(10)])
    return [orjson.dumps({"user_id": f"u{u}", "candidates": [
        {"item_id": ids[(u + k) % len(ids)]} for k in range(CANDIDATES)]}) for u in range(users)]


# ----------------------------------------------------------------------------------------------
# The harness


@dataclass
class FaultRun:
    name: str
    phase: PhaseResult
    fault_at: float  # seconds from the phase start
    cleared_at: float
    recovery_s: float

    def window(self, lo: float, hi: float) -> list[tuple[float, int]]:
        """(latency ms, status) of the requests scheduled in [lo, hi) seconds from the start."""
        p = self.phase
        return [(ms, s) for off, ms, s in zip(p.offsets, p.latencies_ms, p.statuses, strict=True)
                if lo <= off < hi]

    def p99_ms(self, lo: float, hi: float) -> float:
        latencies = sorted(ms for ms, _ in self.window(lo, hi))
        return latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0

    def figures(self) -> dict[str, Any]:
        end = self.phase.duration_s
        return {
            "fault": self.name, "requests": self.phase.finished, "rate": RATE,
            "deadline_ms": DEADLINE_MS,
            "errors": dict(self.phase.errors), "degraded": self.phase.degraded,
            "p99_before_ms": round(self.p99_ms(0, self.fault_at), 1),
            "p99_during_ms": round(self.p99_ms(self.fault_at, self.cleared_at), 1),
            "max_during_ms": round(max((ms for ms, _ in self.window(
                self.fault_at, self.cleared_at)), default=0.0), 1),
            "p99_after_ms": round(self.p99_ms(self.cleared_at + self.recovery_s, end), 1),
            "recovery_s": round(self.recovery_s, 3),
        }


def wait_recovered(svc: ServiceProcess, body: bytes, timeout: float = 30.0) -> float:
    """Seconds until /score answers with a real (non-degraded) history again."""
    start = time.perf_counter()
    with svc.client() as http:
        while time.perf_counter() - start < timeout:
            try:
                response = http.post("/score", content=body,
                                     headers={"content-type": "application/json"})
                if response.status_code == 200 and not response.json()["degraded"]:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
    return float("inf")


def under_fault(name: str, svc: ServiceProcess, bodies: list[bytes],
                inject: Callable[[], object], clear: Callable[[], object]) -> FaultRun:
    """Load at RATE for BEFORE + DURING + AFTER seconds; the fault spans DURING."""
    settings = LoadSettings(url=f"{svc.url}/score", rate=RATE, duration=BEFORE + DURING + AFTER,
                            warmup=0.0, connections=8, max_connections=64, timeout=10.0,
                            pause=0.0)
    out: dict[str, Any] = {}

    def load() -> None:
        out["run"] = run_loop(measure(settings, bodies), "asyncio")

    thread = threading.Thread(target=load)
    started = time.perf_counter()
    thread.start()
    time.sleep(BEFORE + 0.05)  # the phase starts 50 ms after measure() opens its connections
    fault_wall = time.perf_counter()
    inject()
    time.sleep(max(0.0, DURING - (time.perf_counter() - fault_wall)))
    clear()
    cleared_wall = time.perf_counter()
    recovery = wait_recovered(svc, bodies[0])
    thread.join(60)
    (phase,) = out["run"].phases
    base = phase.start_time
    run = FaultRun(name, phase, fault_wall - base, cleared_wall - base, recovery)
    figures = run.figures()
    print(f"\n{name}: {json.dumps(figures)}")
    if FIGURES:
        with open(FIGURES, "a") as f:
            f.write(json.dumps(figures) + "\n")
    assert started <= base
    return run


def assert_survived(run: FaultRun, svc: ServiceProcess) -> None:
    statuses = {int(s) for s in run.phase.statuses}
    assert statuses == {200}, run.phase.errors  # no 5xx, no timeout, no lost connection
    assert run.phase.finished == run.phase.scheduled
    assert run.phase.degraded > 0, "the fault never showed: was it injected?"
    assert svc.process is not None and svc.process.poll() is None
    assert run.p99_ms(run.fault_at, run.cleared_at) < DEADLINE_MS + MARGIN_MS
    assert run.recovery_s < RECOVERY_S
    text = svc.http.get("/metrics").text
    assert metric(text, "ctr_errors_total", code="internal_error") == 0
    assert "Traceback" not in svc.log()


# ----------------------------------------------------------------------------------------------
# Redis faults


# A fault's inject and clear: what they return is ignored.
Fault = Callable[[], object]


def kill_and_restart(server: FaultRedis) -> tuple[Fault, Fault]:
    return server.kill, server.start


def client_pause(server: FaultRedis) -> tuple[Fault, Fault]:
    def inject() -> None:
        with server.client() as r:
            r.execute_command("CLIENT", "PAUSE", str(int(DURING * 1000)), "ALL")

    def clear() -> None:
        with server.client() as r:
            r.execute_command("CLIENT", "UNPAUSE")

    return inject, clear


def debug_sleep(server: FaultRedis) -> tuple[Fault, Fault]:
    # DEBUG SLEEP blocks the whole server, accept() included; it ends by itself.
    sleeper = threading.Thread(target=lambda: server.client().execute_command(
        "DEBUG", "SLEEP", str(DURING)))

    def inject() -> None:
        sleeper.start()

    return inject, lambda: sleeper.join(30)


def max_clients(server: FaultRedis) -> tuple[Fault, Fault]:
    admin = server.client()

    def inject() -> None:
        # Only the admin connection is left, and no new one is accepted: the service's pool must
        # reconnect and is refused ("max number of clients reached").
        admin.config_set("maxclients", 1)
        admin.client_kill_filter(_type="normal", skipme=True)

    def clear() -> None:
        admin.config_set("maxclients", 10000)
        admin.close()

    return inject, clear


REDIS_FAULTS = {
    "redis killed and restarted": kill_and_restart,
    "redis CLIENT PAUSE": client_pause,
    "redis DEBUG SLEEP": debug_sleep,
    "redis at maxclients": max_clients,
}


@pytest.mark.parametrize("fault", list(REDIS_FAULTS))
def test_redis_fault_under_load_degrades_then_recovers(
    fault: str, fault_redis: FaultRedis, serve: Callable[..., ServiceProcess], plain_bundle: Path,
) -> None:
    bodies = seed(fault_redis.url, plain_bundle)
    svc = serve(plain_bundle, fault_redis.url)
    inject, clear = REDIS_FAULTS[fault](fault_redis)

    def restore() -> None:
        clear()
        # A restarted server is empty (nothing persisted): the histories come back with it.
        if fault == "redis killed and restarted":
            seed(fault_redis.url, plain_bundle)

    run = under_fault(fault, svc, bodies, inject, restore)
    assert_survived(run, svc)


# ----------------------------------------------------------------------------------------------
# A slow or broken network between the service and Redis


def proxy_delay(proxy: TcpProxy) -> tuple[Fault, Fault]:
    # 300 ms each way: every round trip misses the 100 ms deadline.
    return lambda: proxy.delay(0.3), proxy.clear


def proxy_blackhole(proxy: TcpProxy) -> tuple[Fault, Fault]:
    return lambda: proxy.blackhole(True), proxy.clear


def proxy_reset(proxy: TcpProxy) -> tuple[Fault, Fault]:
    def inject() -> None:
        proxy.refuse(True)
        proxy.reset_all()

    return inject, proxy.clear


NETWORK_FAULTS = {
    "network delay 300 ms each way": proxy_delay,
    "network black hole": proxy_blackhole,
    "network resets every connection": proxy_reset,
}


@pytest.mark.parametrize("fault", list(NETWORK_FAULTS))
def test_network_fault_to_redis_under_load_degrades_then_recovers(
    fault: str, fault_redis: FaultRedis, serve: Callable[..., ServiceProcess], plain_bundle: Path,
) -> None:
    bodies = seed(fault_redis.url, plain_bundle)
    with TcpProxy("127.0.0.1", fault_redis.port) as proxy:
        svc = serve(plain_bundle, proxy.url)
        inject, clear = NETWORK_FAULTS[fault](proxy)
        run = under_fault(fault, svc, bodies, inject, clear)
        assert_survived(run, svc)


def test_fail_policy_answers_only_documented_503s_during_an_outage(
    fault_redis: FaultRedis, serve: Callable[..., ServiceProcess], plain_bundle: Path,
) -> None:
    bodies = seed(fault_redis.url, plain_bundle)
    svc = serve(plain_bundle, fault_redis.url, redis_policy="fail")
    run = under_fault("redis killed (fail policy)", svc, bodies, fault_redis.kill,
                      lambda: (fault_redis.start(), seed(fault_redis.url, plain_bundle)))
    statuses = {int(s) for s in run.phase.statuses}
    assert statuses == {200, 503}, run.phase.errors
    during = run.window(run.fault_at, run.cleared_at)
    assert any(s == 503 for _, s in during)
    # Before the fault, and once recovered, everything is scored.
    assert {s for _, s in run.window(0, run.fault_at - 0.05)} == {200}
    assert {s for _, s in run.window(run.cleared_at + run.recovery_s + 0.5,
                                     run.phase.duration_s)} <= {200}
    text = svc.http.get("/metrics").text
    assert metric(text, "ctr_errors_total", code="history_unavailable") > 0
    assert metric(text, "ctr_errors_total", code="internal_error") == 0
    assert run.recovery_s < RECOVERY_S


# ----------------------------------------------------------------------------------------------
# Bad bundles dropped into the model directory while serving


def corrupt(bundle: Path) -> None:
    with (bundle / "items.tsv").open("a") as f:
        f.write("tampered\t\n")  # sha256 no longer matches the manifest


def truncate_model(bundle: Path) -> None:
    data = (bundle / "model.onnx").read_bytes()
    (bundle / "model.onnx").write_bytes(data[: len(data) // 2])


def truncate_manifest(bundle: Path) -> None:
    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(text[: len(text) // 2])


def wrong_contract(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["inputs"]:
        if entry["name"] == "history_items":
            entry["dtype"] = "float32"  # checksums still match: only the contract is wrong
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_bad_bundles_dropped_in_during_load_are_refused_and_the_old_model_keeps_serving(
    serve: Callable[..., ServiceProcess], plain_bundle: Path, fault_redis: FaultRedis,
    tmp_path: Path,
) -> None:
    bodies = seed(fault_redis.url, plain_bundle)
    name_dir = tmp_path / "models" / "din"
    shutil.copytree(plain_bundle, name_dir / "1")
    svc = serve(tmp_path / "models", fault_redis.url, reload_poll_seconds="0.2")
    breakers = [corrupt, truncate_model, truncate_manifest, wrong_contract]

    def drop_bad_bundles() -> None:
        for version, breaker in enumerate(breakers, start=2):
            # Written in place, not renamed in: the poller may even see it half-copied.
            target = name_dir / str(version)
            shutil.copytree(plain_bundle, target)
            breaker(target)
            deadline = time.monotonic() + 20
            while metric(svc.http.get("/metrics").text, "ctr_model_reloads_total",
                         result="rejected") < version - 1:
                assert time.monotonic() < deadline, f"bundle {version} was never judged"
                time.sleep(0.05)

    settings = LoadSettings(url=f"{svc.url}/score", rate=RATE, duration=8.0, warmup=0.0,
                            connections=8, max_connections=64, timeout=10.0, pause=0.0)
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(
        run=run_loop(measure(settings, bodies), "asyncio")))
    thread.start()
    time.sleep(1.0)
    drop_bad_bundles()
    good = name_dir / ".staging"
    shutil.copytree(plain_bundle, good)
    os.rename(good, name_dir / "6")  # a valid bundle, installed atomically: served
    deadline = time.monotonic() + 20
    while svc.http.get("/model").json()["version"] != "6":
        assert time.monotonic() < deadline, "version 6 never served"
        time.sleep(0.05)
    thread.join(60)
    (phase,) = out["run"].phases
    print(f"\nbad bundles under load: {phase.finished} requests, errors {dict(phase.errors)}, "
          f"versions sampled {dict(phase.model_versions)}")
    assert {int(s) for s in phase.statuses} == {200}, phase.errors
    assert set(phase.model_versions) <= {"1", "6"}
    text = svc.http.get("/metrics").text
    assert metric(text, "ctr_model_reloads_total", result="rejected") == len(breakers)
    assert metric(text, "ctr_model_reloads_total", result="loaded") == 1
    log = svc.log()
    assert log.count("model reload refused") >= len(breakers)
    for problem in ("does not match the manifest", "unreadable manifest", "float32"):
        assert problem in log, problem


# ----------------------------------------------------------------------------------------------
# SIGTERM under load


def test_sigterm_under_load_finishes_in_flight_requests_refuses_new_ones_and_exits_0(
    serve: Callable[..., ServiceProcess], plain_bundle: Path, fault_redis: FaultRedis,
) -> None:
    bodies = seed(fault_redis.url, plain_bundle)
    with TcpProxy("127.0.0.1", fault_redis.port) as proxy:
        # Every Redis round trip takes ~1 s (within a 5 s deadline): the callers' requests are
        # still waiting on Redis when the signal arrives, and must finish with real histories.
        svc = serve(plain_bundle, proxy.url, redis_deadline_ms="5000", max_in_flight="256",
                    max_queued="256")
        proxy.delay(0.5)
        settings = LoadSettings(url=f"{svc.url}/score", rate=RATE / 2, duration=4.0,
                                warmup=0.0, connections=8, max_connections=128, timeout=10.0,
                                pause=0.0)
        out: dict[str, Any] = {}
        load = threading.Thread(target=lambda: out.update(
            run=run_loop(measure(settings, bodies), "asyncio")))
        in_flight: list[tuple[int, bool]] = []
        sent = threading.Barrier(7)

        def one(body: bytes) -> None:
            with svc.client() as http:
                http.get("/healthz")  # connected beforehand: the request itself goes out at once
                sent.wait()
                response = http.post("/score", content=body,
                                     headers={"content-type": "application/json"})
                in_flight.append((response.status_code, response.json().get("degraded", True)))

        load.start()
        time.sleep(1.5)
        callers = [threading.Thread(target=one, args=(b,)) for b in bodies[:6]]
        for caller in callers:
            caller.start()
        sent.wait()
        time.sleep(0.3)  # requests on open connections reach the server in well under 300 ms
        before = svc.http.get("/metrics").text
        assert svc.process is not None
        svc.process.send_signal(signal.SIGTERM)
        signalled = time.perf_counter()
        # New connections are refused at once (the listening socket is closed first). A probe
        # that reached the kernel's accept queue just before the close is closed unanswered
        # instead (seen once in CI): not served either, which is what a caller must see.
        refused = False
        while not refused and time.perf_counter() - signalled < 5:
            try:
                httpx.get(f"{svc.url}/healthz", timeout=1.0)
                time.sleep(0.02)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                refused = True
        for caller in callers:
            caller.join(30)
        code = svc.process.wait(30)
        drained = time.perf_counter() - signalled
        load.join(60)

    (phase,) = out["run"].phases
    sigterm_at = signalled - phase.start_time
    print(f"\nSIGTERM under load: exit {code} after {drained * 1000:.0f} ms; "
          f"{metric(before, 'ctr_requests_in_flight'):.0f} in flight at the signal; callers "
          f"{in_flight}; load: {phase.ok} answered 200, errors {dict(phase.errors)}")
    assert code == 0
    assert in_flight == [(200, False)] * 6  # every request in flight finished, with its history
    assert refused
    # The open-loop load saw only 200s; requests that found the server gone failed to connect
    # or found their idle keep-alive connection closed: all of them scheduled after the signal.
    assert {int(s) for s in phase.statuses} <= {0, 200}, phase.errors
    for reason in phase.errors:
        assert reason.startswith(("connect:", "connection:")), reason
    late = [off for off, s in zip(phase.offsets, phase.statuses, strict=True) if s == 0]
    assert all(off >= sigterm_at - 0.05 for off in late), (sigterm_at, late[:5])
    log = svc.log()
    assert "Shutting down" in log and "Finished server process" in log
    assert "Traceback" not in log
    svc.process = None  # already reaped
    svc.http.close()
