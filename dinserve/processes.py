"""Child processes that cannot outlive the command that started them.

`dinserve demo` starts a trainer, a redis-server and the service. Each child gets its own process
group (so a terminal's Ctrl-C reaches only the demo, which then stops the children in order) and,
on Linux, a parent-death signal (so even a SIGKILLed demo leaves nothing running). stop() signals
the whole group, not just the leader: `dinserve serve` with several uvicorn workers forks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGTERM the child when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    parent = os.getpid()

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        # The parent may have died between fork() and prctl(): then nobody would ever signal us.
        if os.getppid() != parent:
            os._exit(1)

    return arm


def spawn(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout: IO[Any] | int | None = None,
    stderr: IO[Any] | int | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv in a new session (its own process group) that dies with us."""
    return subprocess.Popen(
        [str(a) for a in argv],
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        # preexec_fn is only unsafe with threads running; the demo starts none.
        preexec_fn=_parent_death_signal(),
    )


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send sig to a process group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def group_alive(pgid: int) -> bool:
    """True while any process of the group exists (signal 0 only checks)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM the child's process group, SIGKILL what is left after timeout; reap the leader.

    Returns the leader's exit code (None if it had to be killed and could not be reaped).
    """
    pgid = proc.pid  # start_new_session: the child leads its own group, pgid == pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    # Workers forked by the leader may still be shutting down after it exited.
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_alive(pgid):
        _signal_group(pgid, signal.SIGKILL)
    try:
        return proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's pick; racy by nature, callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """True when a server could bind host:port (SO_REUSEADDR like uvicorn, so TIME_WAIT is fine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_until_answering(
    proc: subprocess.Popen[bytes], url: str, timeout: float, poll: float = 0.1
) -> str:
    """Poll GET url until it answers 200 while proc lives: "ready", "exited" or "timeout"."""
    import httpx  # a runtime dependency, imported here so spawning stays import-light

    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return "exited"
            try:
                if client.get(url).status_code == 200:
                    return "ready"
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(poll)
    return "timeout"
