"""The load tester (bench/loadtest.py and its engine) against a real uvicorn server on loopback.

The server is a small Starlette app run by uvicorn in a thread, with routes that answer fast,
fail deterministically, stall the whole event loop once, serve slowly, never answer, or answer
chunked. Assertions are about counts and about lower bounds that the server's own sleeps force;
nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import psutil
import pytest
import redis
import uvicorn
from service_helpers import ROOT, ServiceProcess
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench.loadclient import PhaseResult, arrival_offsets, run_loop
from bench.loadhttp import Target, parse_header
from bench.loadpayload import (
    build_bodies,
    items_from_range,
    read_items,
    seed_histories,
    users_from_redis,
)
from bench.loadreport import noisiest_phase
from bench.loadtest import LoadSettings, measure
from bench.machinecpu import CpuWindow, window
from bench.servermetrics import parse_exposition, phase_summary
from dinserve.cli import main as cli_main
from service.bundle import MANIFEST_FILE
from service.heap import frozen_heap
from service.history import keys
from service.metrics import Metrics

SCORE = {"model_version": "7", "scores": [0.5], "history_length": 3, "degraded": False}
STALL_AT = 30          # the request number that blocks the server's loop
STALL_SECONDS = 0.4
SLOW_SECONDS = 0.02    # /slow serves one request at a time: at most 50 per second


@dataclass
class ServerState:
    counts: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)
    deadlines: dict[str | None, int] = field(default_factory=dict)  # X-Request-Deadline-Ms seen
    frozen: list[int] = field(default_factory=list)  # gc.get_freeze_count() at each /frozen
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self, route: str) -> int:
        with self.lock:
            self.counts[route] = self.counts.get(route, 0) + 1
            return self.counts[route]

    def answered(self, route: str, status: int) -> None:
        with self.lock:
            by_status = self.statuses.setdefault(route, {})
            by_status[status] = by_status.get(status, 0) + 1


def make_app(state: ServerState) -> Starlette:
    async def score(request: Request) -> Response:
        await request.body()
        state.seen("score")
        deadline = request.headers.get("x-request-deadline-ms")
        with state.lock:
            state.deadlines[deadline] = state.deadlines.get(deadline, 0) + 1
        return JSONResponse(SCORE)

    async def frozen(request: Request) -> Response:
        await request.body()
        # The load tester runs in this process. A route of its own: get_freeze_count() walks
        # the frozen objects (CPython 3.11), milliseconds a call in a test process's heap.
        with state.lock:
            state.frozen.append(gc.get_freeze_count())
        return JSONResponse(SCORE)

    async def flaky(request: Request) -> Response:
        await request.body()
        n = state.seen("flaky")
        status = 500 if n % 3 == 0 else 200
        state.answered("flaky", status)
        return JSONResponse(SCORE if status == 200 else {"detail": "boom"}, status_code=status)

    async def stall(request: Request) -> Response:
        await request.body()
        if state.seen("stall") == STALL_AT:
            time.sleep(STALL_SECONDS)  # blocks the whole server, like a GC pause or a stuck lock
        return JSONResponse(SCORE)

    async def slow(request: Request) -> Response:
        await request.body()
        state.seen("slow")
        time.sleep(SLOW_SECONDS)
        return JSONResponse(SCORE)

    async def hang(request: Request) -> Response:
        await request.body()
        state.seen("hang")
        await asyncio.sleep(30)
        return JSONResponse(SCORE)

    async def chunked(request: Request) -> Response:
        await request.body()
        state.seen("chunked")

        async def parts() -> AsyncIterator[bytes]:
            body = orjson.dumps(SCORE)
            yield body[:10]
            yield body[10:]

        return StreamingResponse(parts(), media_type="application/json")

    return Starlette(routes=[
        Route(f"/{name}", handler, methods=["POST"])
        for name, handler in [("score", score), ("frozen", frozen), ("flaky", flaky),
                              ("stall", stall), ("slow", slow), ("hang", hang),
                              ("chunked", chunked)]
    ])


@dataclass
class LiveServer:
    base: str
    state: ServerState


@pytest.fixture
def server() -> Iterator[LiveServer]:
    """The test app under uvicorn on a free loopback port, in a thread; stopped after the test."""
    state = ServerState()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(state), loop="asyncio", lifespan="off", ws="none",
                            log_level="warning", access_log=False, timeout_graceful_shutdown=1)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", state)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()


BODIES = build_bodies([str(i) for i in range(1, 50)], items_from_range("1:500"), 20, 16)
# Short phases, no warmup, short pauses: these runs test behaviour, not speed.
QUICK = LoadSettings(warmup=0.0, pause=0.1, timeout=3.0, connections=2)


def load(settings: LoadSettings) -> PhaseResult:
    # Measured as the CLI measures, with the heap frozen: by the time these tests run, a full
    # collection of the test process's heap takes ~0.4 s on a 2-vCPU VM, long enough to time out
    # a loopback connect and turn a request's "timeout" into "connect: TimeoutError".
    with frozen_heap():
        result = run_loop(measure(settings, BODIES), "asyncio")
    assert len(result.phases) == 1
    return result.phases[0]


def test_request_count_follows_rate_times_duration(server: LiveServer) -> None:
    phase = load(replace(QUICK, url=f"{server.base}/score", rate=100, duration=2.0))
    assert phase.scheduled == 200
    assert phase.ok == 200 and not phase.errors
    assert server.state.counts["score"] == 200
    assert 40 < phase.achieved_rps <= 101
    assert phase.latency.get_total_count() == 200
    assert phase.history_lengths and set(phase.history_lengths) == {3}
    assert set(phase.model_versions) == {"7"}


def test_extra_headers_go_with_every_request(server: LiveServer) -> None:
    headers = (parse_header("X-Request-Deadline-Ms: 50"),)
    phase = load(replace(QUICK, url=f"{server.base}/score", rate=100, duration=0.5,
                         headers=headers))
    assert phase.ok == 50
    assert server.state.deadlines == {"50": 50}


def test_a_bad_option_is_a_clear_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    base = ["loadtest", "--noop-server", "--duration", "0.5", "--out", str(tmp_path)]
    assert cli_main([*base, "--header", "Content-Length: 9"]) == 2
    assert "--header Content-Length: set by the load tester" in capsys.readouterr().err
    assert cli_main([*base, "--step-factor", "0.5"]) == 2
    assert "--step-factor must be > 1" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_poisson_arrivals_are_bounded_by_duration_and_cap() -> None:
    offsets = arrival_offsets(200, 2.0, None, "poisson", seed=3)
    assert 250 < len(offsets) < 550 and offsets[-1] < 2.0
    assert offsets == sorted(offsets)
    assert len(arrival_offsets(200, 2.0, 50, "poisson", seed=3)) == 50
    assert len(arrival_offsets(200, 2.0, 50)) == 50


def test_errors_are_counted_by_status_exactly(server: LiveServer) -> None:
    phase = load(replace(QUICK, url=f"{server.base}/flaky", rate=150, duration=1.0))
    answered = server.state.statuses["flaky"]
    assert phase.errors == {"500": answered[500]}
    assert phase.ok == answered[200]
    assert phase.ok + answered[500] == phase.scheduled == 150
    assert phase.latency.get_total_count() == phase.ok  # latency percentiles are over 2xx only


def test_a_server_stall_shows_in_latency_from_scheduled_time(server: LiveServer) -> None:
    phase = load(replace(QUICK, url=f"{server.base}/stall", rate=100, duration=3.0))
    assert phase.ok == phase.scheduled == 300
    late = [ms for ms in phase.latencies_ms if ms >= 100.0]
    # Every request scheduled during the 400 ms stall waited for it, not only the one in flight:
    # at 100/s that is about 30 requests (a closed-loop tester would show one).
    assert len(late) >= 10
    assert phase.latency.get_max_value() / 1000.0 >= STALL_SECONDS * 1000 * 0.9
    assert phase.latency.get_value_at_percentile(99.0) / 1000.0 >= 200.0
    # The client kept sending during the stall, on extra connections.
    assert phase.peak_connections > 2


def test_timeouts_are_counted_and_the_run_ends(server: LiveServer) -> None:
    started = time.monotonic()
    phase = load(replace(QUICK, url=f"{server.base}/hang", rate=20, duration=0.5, timeout=0.4))
    assert phase.errors == {"timeout": 10}
    assert phase.ok == 0
    assert time.monotonic() - started < 20  # bounded by the timeout, not by the 30 s handler


def test_refused_connections_are_counted_per_request() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the run: nothing listens there
    phase = load(replace(QUICK, url=f"http://127.0.0.1:{port}/score", rate=50, duration=0.4))
    assert phase.ok == 0
    assert sum(phase.errors.values()) == phase.scheduled == 20
    assert all(reason.startswith("connect: ") for reason in phase.errors)


def test_cli_exits_non_zero_when_nothing_succeeded(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = cli_main(["loadtest", "--url", f"http://127.0.0.1:{port}/score", "--rate", "20",
                     "--duration", "0.5", "--warmup", "0", "--pause", "0", "--candidates", "2",
                     "--no-picture", "--out", str(tmp_path)])
    assert code == 1
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert report["phases"][0]["ok"] == 0 and report["picture"] is None


def test_pool_cap_makes_requests_queue_and_says_so(server: LiveServer) -> None:
    phase = load(replace(QUICK, url=f"{server.base}/slow", rate=100, duration=0.5,
                         max_connections=2))
    assert phase.ok == phase.scheduled == 50
    assert phase.peak_connections <= 2
    assert phase.queued_at_cap > 0 and phase.first_queued_at_s is not None


class _OneAnswerPerConnection(asyncio.Protocol):
    """Answers the first request of a connection; on the second, closes without a byte."""

    def __init__(self) -> None:
        self.answered = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.answered:
            self.transport.abort()
            return
        self.answered = True
        body = orjson.dumps(SCORE)
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(body)).encode()
                             + b"\r\n\r\n" + body)


@pytest.fixture
def one_answer_server() -> Iterator[str]:
    """A raw server that drops every reused keep-alive connection, as an idle-timeout race does."""
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(
        loop.create_server(_OneAnswerPerConnection, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/score"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


def test_reused_connection_closed_before_reading_is_resent(one_answer_server: str) -> None:
    phase = load(replace(QUICK, url=one_answer_server, rate=50, duration=0.4, connections=1))
    assert phase.ok == phase.scheduled == 20 and not phase.errors
    assert phase.stale_retries > 0


def test_idle_connections_are_closed_before_the_server_does(server: LiveServer) -> None:
    phase = load(replace(QUICK, url=f"{server.base}/score", rate=2, duration=1.5, connections=1,
                         idle_timeout=0.2))
    assert phase.ok == 3
    assert phase.connections_opened >= 2  # the connection idle for 0.5 s was closed and reopened


def test_chunked_responses_are_parsed(server: LiveServer) -> None:
    phase = load(replace(QUICK, url=f"{server.base}/chunked", rate=50, duration=0.5))
    assert phase.ok == 25 and not phase.errors
    assert set(phase.history_lengths) == {3}


def test_cli_writes_report_and_picture(server: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = cli_main(["loadtest", "--url", f"{server.base}/flaky", "--rate", "80",
                     "--duration", "1", "--warmup", "0", "--candidates", "5",
                     "--item-range", "1:100", "--users", "20", "--distinct-payloads", "8",
                     "--pause", "0", "--out", str(out)])
    assert code == 0
    report = orjson.loads((out / "report.json").read_bytes())
    assert report["tool"] == "dinserve loadtest" and report["schema_version"] == 1
    assert report["mode"] == "constant" and report["saturation"] is None
    assert report["target"] == f"{server.base}/flaky"
    assert report["payload"]["candidates"] == 5 and report["payload"]["distinct_payloads"] == 8
    (phase,) = report["phases"]
    assert phase["scheduled"] == 80 and phase["finished"] == 80
    assert set(phase["latency_ms"]) == {"count", "p50", "p90", "p99", "p99.9", "max", "mean"}
    assert phase["latency_ms"]["p50"] <= phase["latency_ms"]["p99"] <= phase["latency_ms"]["max"]
    assert phase["errors"] == {"500": server.state.statuses["flaky"][500]}
    assert phase["ok"] + phase["errors"]["500"] == 80
    assert phase["server"] is None  # this server has no /metrics: the run goes on without
    # The machine's account of the phase: the tester and the server ran on it, so it was busy.
    assert 0 < phase["machine"]["busy_pct"] <= 100
    assert 0 <= phase["machine"]["steal_pct"] <= 100  # Linux reports steal
    assert report["machine"]["steal_phase"] == "constant"
    assert report["machine"]["steal_pct_max"] == phase["machine"]["steal_pct"]
    for key in ("cpu_us_per_request", "dispatch_lag_ms", "peak_connections", "queued_at_cap"):
        assert key in phase["client"]
    assert report["client"]["cpu_us_per_request"] > 0
    picture = out / report["picture"]
    head = picture.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 5000



def test_report_is_written_when_matplotlib_cannot_be_imported(
    server: LiveServer, tmp_path: Path,
) -> None:
    """matplotlib comes with the dev extra only: without it, report.json and one line, no PNG."""
    out = tmp_path / "run"
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None  # `import matplotlib` now raises ImportError\n"
        "from dinserve.cli import main\n"
        f"sys.exit(main(['loadtest', '--url', '{server.base}/score', '--rate', '40',\n"
        "    '--duration', '0.5', '--warmup', '0', '--pause', '0', '--candidates', '2',\n"
        f"    '--item-range', '1:100', '--out', {str(out)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = orjson.loads((out / "report.json").read_bytes())
    assert report["phases"][0]["ok"] == 20 and report["picture"] is None
    assert not (out / "latency.png").exists()
    skipped = [line for line in result.stderr.splitlines() if "matplotlib" in line]
    assert skipped == ["picture: skipped latency.png: matplotlib is not installed "
                       "(pip install matplotlib, or the project's dev extra)"], result.stderr


def test_the_cli_freezes_its_setup_heap_while_it_measures(
    server: LiveServer, tmp_path: Path
) -> None:
    # A full collection walking the payloads and imports would stall the client's loop for tens
    # of ms and show up as server latency; frozen objects are not walked (service/heap.py).
    code = cli_main(["loadtest", "--url", f"{server.base}/frozen", "--rate", "50",
                     "--duration", "0.4", "--warmup", "0", "--candidates", "5",
                     "--item-range", "1:100", "--users", "20", "--distinct-payloads", "8",
                     "--pause", "0", "--no-picture", "--out", str(tmp_path / "run")])
    assert code == 0
    assert len(server.state.frozen) == 20 and min(server.state.frozen) > 1000
    assert gc.get_freeze_count() == 0  # given back to the collector once the run is over


def test_find_saturation_stops_and_reports_a_rate(server: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "sat"
    code = cli_main(["loadtest", "--url", f"{server.base}/slow", "--find-saturation",
                     "--start-rate", "10", "--step-factor", "2", "--step-duration", "1",
                     "--max-rate", "400", "--max-steps", "8", "--refine", "1",
                     "--fractions", "0.5", "--fraction-duration", "1", "--warmup", "0",
                     "--pause", "0.2", "--timeout", "2", "--candidates", "5",
                     "--item-range", "1:100", "--distinct-payloads", "4", "--out", str(out)])
    assert code == 0
    report = orjson.loads((out / "report.json").read_bytes())
    sat = report["saturation"]
    assert report["mode"] == "saturation"
    # /slow serves one request per 20 ms, so nothing above 50/s can come back.
    assert 0 < sat["saturation_rps"] <= 1 / SLOW_SECONDS * 1.1
    assert "not saturated" not in sat["stop_reason"]
    assert sat["steps"][-1]["passed"] is False or any(not s["passed"] for s in sat["steps"])
    (frac,) = sat["fractions"]
    assert frac["fraction"] == 0.5
    assert frac["offered_rps"] == pytest.approx(0.5 * sat["saturation_rps"], rel=1e-3)
    names = [p["name"] for p in report["phases"]]
    assert names[0] == "step-1" and names[-1] == "at-50%"
    # Each step and fraction carries the host's steal over its phase, as the phase recorded it.
    steal = {p["name"]: p["machine"]["steal_pct"] for p in report["phases"]}
    for row in [*sat["steps"], frac]:
        assert row["steal_pct"] == steal[row["name"]] and 0 <= row["steal_pct"] <= 100
    assert (out / "latency.png").stat().st_size > 5000


def test_target_parsing() -> None:
    assert Target.parse("http://127.0.0.1:8000").path == "/score"
    assert Target.parse("http://localhost:9/x/score").path == "/x/score"
    assert Target.parse("https://example.test").port == 443
    request = Target.parse("http://127.0.0.1:8000").encode_post(b"{}")
    assert request.startswith(b"POST /score HTTP/1.1\r\n")
    assert request.endswith(b"Content-Length: 2\r\n\r\n{}")
    with pytest.raises(ValueError, match="http://"):
        Target.parse("ftp://host/score")
    assert parse_header(" X-Request-Deadline-Ms :  50 ") == ("X-Request-Deadline-Ms", "50")
    assert parse_header("Authorization: Bearer a:b") == ("Authorization", "Bearer a:b")
    for bad in ("no colon", "Bad Name: 1", ": 1", "Host: x", "X-A: 1\r\nX-B: 2", "X-A: \u00e9"):
        with pytest.raises(ValueError, match="--header"):
            parse_header(bad)
    with_headers = Target.parse("http://127.0.0.1:8000", headers=(("X-A", "1"), ("X-B", "2")))
    assert b"\r\nX-A: 1\r\nX-B: 2\r\n" in with_headers.encode_post(b"{}")
    assert with_headers.encode_post(b"{}").endswith(b"Content-Length: 2\r\n\r\n{}")


def test_payloads_from_a_bundle_items_file(tmp_path: Path) -> None:
    version = tmp_path / "din" / "3"
    version.mkdir(parents=True)
    (version / "items.tsv").write_text("10\tAction|Drama\n11\t\n12\tComedy\n", encoding="utf-8")
    (version / MANIFEST_FILE).write_text("{}", encoding="utf-8")
    (tmp_path / "din" / "2").mkdir()
    unfinished = tmp_path / "din" / "10"  # no manifest yet: the service would not serve it
    unfinished.mkdir()
    (unfinished / "items.tsv").write_text("99\tHorror\n", encoding="utf-8")
    items = read_items(tmp_path / "din")  # a name directory: the version the service would serve
    assert [(i.item_id, i.category) for i in items] == [("10", "Action"), ("11", ""),
                                                        ("12", "Comedy")]
    bodies = build_bodies(["u1", "u2"], items, 3, 5, with_categories=True,
                          context={"device": "ios"})
    assert len(bodies) == 5
    doc: dict[str, Any] = orjson.loads(bodies[0])
    assert doc["user_id"] in {"u1", "u2"} and doc["context"] == {"device": "ios"}
    assert sorted(c["item_id"] for c in doc["candidates"]) == ["10", "11", "12"]
    assert {"item_id": "10", "category": "Action"} in doc["candidates"]
    assert {"item_id": "11"} in doc["candidates"]  # no category: the field is left out
    with pytest.raises(FileNotFoundError, match="items.tsv"):
        read_items(tmp_path / "din" / "2")
    with pytest.raises(ValueError, match="LO:HI"):
        items_from_range("100")


def test_seeded_histories_use_the_service_key_scheme(redis_url: str, redis_prefix: str) -> None:
    users = ["a", "b", "c"]
    assert seed_histories(redis_url, redis_prefix, users, items_from_range("1:50"), 7) == 3
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for user in users:
            history_key, _ = keys(redis_prefix, user)
            values = client.lrange(history_key, 0, -1)
            assert len(values) == 7 and all(1 <= int(v) < 50 for v in values)
        seed_histories(redis_url, redis_prefix, ["a"], items_from_range("1:50"), 2)
        assert client.llen(keys(redis_prefix, "a")[0]) == 2  # replaced, not appended
    finally:
        client.close()
    assert users_from_redis(redis_url, redis_prefix, 10) == users
    assert len(users_from_redis(redis_url, redis_prefix, 2)) == 2


def test_a_dinserve_target_gives_its_own_account_of_each_phase(
    plain_bundle: Path, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    # The report holds what the server counted between two scrapes of its /metrics: exactly the
    # phase's requests, and the stages of /score, which fit inside the server-side time.
    service = ServiceProcess(plain_bundle, redis_url, tmp_path / "service.log",
                             reload_poll_seconds="0", warmup_runs="1", access_log="false",
                             redis_prefix=redis_prefix)
    args = ["loadtest", "--url", "", "--rate", "50", "--duration", "1", "--warmup", "0.3",
            "--candidates", "20", "--item-ids-from", str(plain_bundle), "--users", "10",
            "--history-length", "8", "--redis-url", redis_url, "--prefix", redis_prefix,
            "--distinct-payloads", "8", "--pause", "0.2", "--no-picture", "--out"]
    with service:
        args[2] = f"{service.url}/score"
        assert cli_main([*args, str(tmp_path / "with")]) == 0
        assert cli_main([*args, str(tmp_path / "without"), "--no-server-metrics"]) == 0
    (phase,) = orjson.loads((tmp_path / "with" / "report.json").read_bytes())["phases"]
    server = phase["server"]
    assert phase["finished"] == 50 and phase["ok"] == 50
    assert server["requests"] == 50 and server["by_status"] == {"200": 50}  # not the warm-up's
    stages = server["stages_mean_ms"]
    assert all(value > 0 for value in stages.values()), stages
    assert sum(stages.values()) <= server["mean_ms"]
    assert 0 < server["inference_cpu_mean_ms"] <= stages["inference"]
    assert server["process_cpu_ms_per_request"] > 0
    assert server["errors"] == {}
    (plain,) = orjson.loads((tmp_path / "without" / "report.json").read_bytes())["phases"]
    assert plain["server"] is None


class BareCpuTimes(NamedTuple):
    """psutil.cpu_times() on a platform that reports neither iowait nor steal."""

    user: float
    system: float
    idle: float


def test_the_machine_account_is_the_difference_of_two_readings() -> None:
    times = type(psutil.cpu_times())  # the real record type, with this platform's fields
    zero = times(*[0.0] * len(times._fields))
    spent = {"user": 6.0, "system": 2.0, "idle": 10.0, "iowait": 1.0, "steal": 1.0,
             "guest": 3.0}  # guest time is inside user time too: counted once
    after = zero._replace(**{k: v for k, v in spent.items() if k in times._fields})
    cpu = window(zero, after)
    assert cpu is not None
    assert cpu.busy_pct == pytest.approx(100 * 8 / 20)
    assert cpu.steal_pct == pytest.approx(100 * 1 / 20)
    assert window(after, after) is None  # no tick counted in between: nothing to say
    # A platform that does not report steal: busy still, steal unknown.
    cpu = window(BareCpuTimes(0.0, 0.0, 0.0), BareCpuTimes(1.0, 1.0, 2.0))
    assert cpu == CpuWindow(busy_pct=50.0, steal_pct=None)


def test_the_report_names_the_phase_the_host_took_most_from() -> None:
    phases = [replace(PhaseResult(name, 10.0, 10, 1.0), machine=machine)
              for name, machine in [("step-1", CpuWindow(40.0, 0.5)), ("step-2", None),
                                    ("step-3", CpuWindow(90.0, 7.25)),
                                    ("step-4", CpuWindow(95.0, None))]]
    assert noisiest_phase(phases) == ("step-3", 7.25)
    assert noisiest_phase(phases[1:2]) is None


def test_the_server_account_is_the_difference_of_two_expositions() -> None:
    # The service's own Metrics, as its /metrics renders them: only what happened between the
    # two reads counts, by status and by error code, and only on the loaded route.
    metrics = Metrics()
    try:
        # before the first read: not counted
        metrics.request_seconds.labels("/score", "POST", "200").observe(0.010)
        metrics.errors.labels("overloaded").inc()
        before = parse_exposition(metrics.exposition().decode())
        for seconds in (0.002, 0.004, 0.006):
            metrics.request_seconds.labels("/score", "POST", "200").observe(seconds)
        metrics.request_seconds.labels("/score", "POST", "503").observe(0.0005)
        metrics.request_seconds.labels("/model", "GET", "200").observe(0.5)  # another route
        metrics.stage_seconds.labels("history").observe(0.001)
        metrics.errors.labels("overloaded").inc(2)
        metrics.errors.labels("client_disconnected").inc()
        after = parse_exposition(metrics.exposition().decode())
    finally:
        metrics.close()
    assert before is not None and after is not None
    summary = phase_summary(before, after, "/score")
    assert summary is not None
    assert summary["requests"] == 4 and summary["by_status"] == {"200": 3, "503": 1}
    assert summary["mean_ms"] == pytest.approx(4.0)
    assert summary["stages_mean_ms"] == {"history": pytest.approx(1.0), "features": None,
                                         "inference": None}
    assert summary["errors"] == {"client_disconnected": 1, "overloaded": 2}
    assert phase_summary(after, after, "/score") is None  # nothing happened in between
    assert parse_exposition("<html>not metrics</html>") is None


def test_the_cpu_per_request_of_a_service_with_workers_is_their_summed_cpu() -> None:
    # With CTR_WORKERS > 1 the exposition has no process_* family (it would describe one worker)
    # but ctr_worker_cpu_seconds_total, every worker's CPU summed: the account divides that.
    def exposition(requests: int, cpu: float) -> str:
        return (
            "# TYPE ctr_request_duration_seconds histogram\n"
            f'ctr_request_duration_seconds_count{{method="POST",route="/score",status="200"}} '
            f"{requests}\n"
            f'ctr_request_duration_seconds_sum{{method="POST",route="/score",status="200"}} '
            f"{requests * 0.005}\n"
            "# TYPE ctr_worker_cpu_seconds counter\n"
            f"ctr_worker_cpu_seconds_total {cpu}\n"
        )

    before = parse_exposition(exposition(100, 12.5))
    after = parse_exposition(exposition(500, 14.5))
    assert before is not None and after is not None
    summary = phase_summary(before, after, "/score")
    assert summary is not None and summary["requests"] == 400
    assert summary["process_cpu_ms_per_request"] == pytest.approx(5.0)  # 2 s over 400
    assert summary["mean_ms"] == pytest.approx(5.0)


def test_a_fresh_server_with_no_request_yet_is_still_recognised() -> None:
    # Before its first request the service's histogram has no labelled sample; the first phase of
    # a run without warm-up must still get its account.
    metrics = Metrics()
    try:
        before = parse_exposition(metrics.exposition().decode())
        metrics.request_seconds.labels("/score", "POST", "200").observe(0.003)
        after = parse_exposition(metrics.exposition().decode())
    finally:
        metrics.close()
    assert before is not None and after is not None
    summary = phase_summary(before, after, "/score")
    assert summary is not None and summary["requests"] == 1
