"""`dinserve demo` end to end, as a user runs it: a real subprocess, real training on a slice of
the MovieLens data, a real redis-server (its own, or REDIS_URL's), the printed curl sent as is.

The first run trains a quick model (40 users, 1 epoch) into a shared workdir, starts its own
redis-server, and is stopped with SIGINT (Ctrl-C); the second run reuses the model, uses the
session's Redis through REDIS_URL under a test prefix, and is stopped with SIGTERM. After each
stop, the service and redis-server processes must be gone and their ports closed.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--max-users", "40", "--epochs", "1"]
FIRST_RUN_TIMEOUT = 240.0  # training + export + history load on the shared 2-core machine
STOP_TIMEOUT = 30.0


@dataclass
class DemoProcess:
    """A running `dinserve demo` whose output is collected line by line."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first output line matching pattern; fails on timeout or if the demo exits."""
        regex = re.compile(pattern)
        for line in self.lines:
            if match := regex.search(line):
                return match
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line matching {pattern!r} after {timeout}s:\n{self.output}")
            try:
                next_line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if next_line is None:
                pytest.fail(f"demo exited ({self.proc.wait()}) before {pattern!r}:\n{self.output}")
            self.lines.append(next_line)
            if match := regex.search(next_line):
                return match

    def drain(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                return
            self.lines.append(line)

    def close(self) -> None:
        """Kill the demo if it still runs, then release its output pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._pump_thread.join(timeout=5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def start_demo(args: list[str], env: dict[str, str]) -> DemoProcess:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dinserve", "demo", *args],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    return DemoProcess(proc)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that would point the demo elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if k != "REDIS_URL" and not k.startswith("CTR_")}
    env.update(extra)
    return env


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def send_printed_curl(demo: DemoProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the curl the demo printed, with httpx: same URL, headers and body."""
    line = demo.wait_for(r"^\s+curl .*/score", timeout=5.0).string
    argv = shlex.split(line)
    url = next(a for a in argv if a.startswith("http"))
    headers: dict[str, str] = {}
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-H":
            name, _, field_value = value.partition(":")
            headers[name.strip()] = field_value.strip()
    body = argv[argv.index("-d") + 1]
    reply = httpx.post(url, content=body, headers=headers, timeout=10.0)
    assert reply.status_code == 200, reply.text
    return json.loads(body), reply.json()


def stop_and_check(demo: DemoProcess, sig: signal.Signals, pids: list[int],
                   ports: list[int]) -> None:
    demo.proc.send_signal(sig)
    try:
        code = demo.proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        demo.proc.kill()
        pytest.fail(f"demo did not exit within {STOP_TIMEOUT}s of {sig.name}")
    demo.drain()
    assert code == 0, demo.output
    assert "stopped everything the demo started" in demo.output
    for pid in pids:
        assert not alive(pid), f"pid {pid} survived the demo:\n{demo.output}"
    for port in ports:
        assert not listening(port), f"port {port} still open after the demo stopped"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo")


@pytest.fixture
def kill_leftovers() -> Iterator[list[DemoProcess]]:
    """Whatever a failing test leaves running is killed, so one failure does not cascade."""
    started: list[DemoProcess] = []
    yield started
    for demo in started:
        demo.close()


@pytest.mark.slow
def test_first_run_trains_serves_with_its_own_redis_and_stops_on_ctrl_c(
    workdir: Path, kill_leftovers: list[DemoProcess]
) -> None:
    demo = start_demo(["--workdir", str(workdir), "--port", "0", *QUICK], clean_env())
    kill_leftovers.append(demo)

    redis_match = demo.wait_for(r"redis: started .* \(pid (\d+)\) at redis://127\.0\.0\.1:(\d+)",
                                timeout=FIRST_RUN_TIMEOUT)
    service_match = demo.wait_for(r"service: started .* \(pid (\d+)\) on 127\.0\.0\.1:(\d+)",
                                  timeout=FIRST_RUN_TIMEOUT)
    demo.wait_for(r"ready in [\d.]+s", timeout=FIRST_RUN_TIMEOUT)
    assert "model: training" in demo.output
    assert (workdir / "runs" / "demo" / "checkpoint.pt").is_file()
    assert list((workdir / "models" / "demo").glob("*/manifest.json"))

    request, answer = send_printed_curl(demo)
    candidates = request["candidates"]
    assert isinstance(candidates, list) and len(candidates) == 5
    scores = answer["scores"]
    assert isinstance(scores, list) and len(scores) == len(candidates)
    assert all(0.0 < s < 1.0 for s in scores)
    assert answer["degraded"] is False
    assert isinstance(answer["history_length"], int) and answer["history_length"] > 0

    redis_pid, redis_port = int(redis_match.group(1)), int(redis_match.group(2))
    service_pid, service_port = int(service_match.group(1)), int(service_match.group(2))
    assert alive(redis_pid) and alive(service_pid)
    stop_and_check(demo, signal.SIGINT, [service_pid, redis_pid], [service_port, redis_port])


@pytest.mark.slow
def test_second_run_reuses_the_model_uses_redis_url_and_stops_on_sigterm(
    workdir: Path, redis_url: str, redis_prefix: str, kill_leftovers: list[DemoProcess]
) -> None:
    if not list((workdir / "models" / "demo").glob("*/manifest.json")):
        pytest.skip("needs the bundle of the first run")
    env = clean_env(REDIS_URL=redis_url, CTR_REDIS_PREFIX=redis_prefix)
    demo = start_demo(["--workdir", str(workdir), "--port", "0", *QUICK], env)
    kill_leftovers.append(demo)

    demo.wait_for(r"redis: .* answers PING, using it", timeout=60.0)
    service_match = demo.wait_for(r"service: started .* \(pid (\d+)\) on 127\.0\.0\.1:(\d+)",
                                  timeout=60.0)
    demo.wait_for(r"ready in [\d.]+s", timeout=60.0)
    assert "reusing the bundle" in demo.output
    assert "model: training" not in demo.output
    assert "redis: started" not in demo.output

    request, answer = send_printed_curl(demo)
    assert answer["history_length"] > 0  # read from REDIS_URL under our prefix
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.exists(f"{redis_prefix}:hist:{request['user_id']}") == 1
    finally:
        client.close()

    service_pid, service_port = int(service_match.group(1)), int(service_match.group(2))
    stop_and_check(demo, signal.SIGTERM, [service_pid], [service_port])


def test_a_taken_port_is_reported_before_any_work(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "dinserve", "demo", "--workdir", str(tmp_path),
             "--port", str(port), *QUICK],
            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stdout
    assert "--port" in result.stdout
    assert not (tmp_path / "runs").exists()  # nothing trained


@pytest.mark.slow
def test_setup_only_loads_histories_and_exits(
    workdir: Path, redis_url: str, redis_prefix: str
) -> None:
    """docker-compose's model job: reuse the bundle, load histories, exit 0, serve nothing."""
    if not list((workdir / "models" / "demo").glob("*/manifest.json")):
        pytest.skip("needs the bundle of the first run")
    env = clean_env(REDIS_URL=redis_url, CTR_REDIS_PREFIX=redis_prefix)
    result = subprocess.run(
        [sys.executable, "-m", "dinserve", "demo", "--setup-only", "--workdir", str(workdir),
         *QUICK],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "setup done" in result.stdout
    assert "service: started" not in result.stdout and "redis: started" not in result.stdout
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.llen(f"{redis_prefix}:hist:1") > 0
    finally:
        client.close()


def test_setup_only_refuses_a_redis_that_does_not_answer(tmp_path: Path) -> None:
    """The model job must fail loudly rather than load histories into a Redis of its own."""
    (tmp_path / "models" / "demo" / "1").mkdir(parents=True)
    (tmp_path / "models" / "demo" / "1" / "manifest.json").write_text("{}")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        result = subprocess.run(
            [sys.executable, "-m", "dinserve", "demo", "--setup-only", "--workdir", str(tmp_path),
             "--redis-url", f"redis://127.0.0.1:{port}/0"],
            cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1
    assert "does not answer PING" in result.stdout
