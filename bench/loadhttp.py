"""HTTP/1.1 on asyncio Protocols for the load tester: the target URL and one keep-alive connection.

A connection carries one request at a time (no pipelining): it writes pre-encoded request bytes
and frames the response by Content-Length, chunked encoding, or connection close (RFC 9112 §6.3)
with a small hand-written parser, then hands status and body to its owner (the pool in
bench/loadclient.py). No streams, no per-request task, future or timer: the owner's sweeper
expires requests past their deadline.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

Job = tuple[int, float]  # (request index, scheduled send time)


class ConnectionOwner(Protocol):
    """What a connection reports to: the pool that lent it a request."""

    def on_answer(self, conn: HttpConnection, job: Job, sent_at: float, status: int,
                  body: bytes) -> None: ...

    def on_failure(self, job: Job, reason: str) -> None: ...

    def on_stale(self, job: Job) -> None: ...

    def on_lost(self, conn: HttpConnection) -> None: ...


# Headers the client writes itself: a caller's own would break the framing or the payload.
CLIENT_HEADERS = frozenset({"host", "content-type", "content-length", "transfer-encoding",
                            "connection"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_header(text: str) -> tuple[str, str]:
    """`Name: value` as given to --header -> (name, value); ValueError saying what is wrong."""
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not _TOKEN.fullmatch(name):
        raise ValueError(f"--header must be 'Name: value' with a token name, got {text!r}")
    if name.lower() in CLIENT_HEADERS:
        raise ValueError(f"--header {name}: set by the load tester itself")
    if not value.isascii() or any(c in value for c in "\r\n\0"):
        raise ValueError(f"--header {name}: the value must be ASCII without CR, LF or NUL")
    return name, value


@dataclass(frozen=True)
class Target:
    """Where requests go: one http(s) URL, its path defaulting to /score, extra headers."""

    scheme: str
    host: str
    port: int
    path: str
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(
        cls, url: str, default_path: str = "/score", headers: tuple[tuple[str, str], ...] = ()
    ) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"target URL must be http://host[:port][/path], got {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = parts.path if parts.path not in ("", "/") else default_path
        if parts.query:
            path = f"{path}?{parts.query}"
        return cls(parts.scheme, parts.hostname, port, path, headers)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    def encode_post(self, body: bytes) -> bytes:
        """The complete keep-alive request for one JSON body, ready to write to a socket."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        head = (
            f"POST {self.path} HTTP/1.1\r\n"
            f"Host: {host}:{self.port}\r\n"
            "User-Agent: dinserve-loadtest\r\n"
            "Content-Type: application/json\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in self.headers)
            + f"Content-Length: {len(body)}\r\n"
            "\r\n"
        )
        return head.encode("ascii") + body


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    __slots__ = (
        "_pool", "transport", "closed", "job", "deadline", "served", "idle_since", "_sent_at",
        "_buf", "_head_end", "_status", "_need", "_chunked", "_until_close", "_close_after",
    )

    def __init__(self, pool: ConnectionOwner) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.job: Job | None = None
        self.deadline = 0.0
        self.served = 0  # answers received on this connection
        self.idle_since = 0.0
        self._sent_at = 0.0
        self._buf = bytearray()
        self._reset_parser()

    def _reset_parser(self) -> None:
        self._buf.clear()
        self._head_end = -1
        self._status = 0
        self._need = -1
        self._chunked = False
        self._until_close = False
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, job: Job, payload: bytes, now: float, deadline: float) -> None:
        assert self.transport is not None and self.job is None
        self.job = job
        self.deadline = deadline
        self._sent_at = now
        self._reset_parser()
        self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        if self.job is None:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self.drop()
            return
        buf = self._buf
        buf += data
        if self._head_end < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head_end = end + 4
            self._parse_head(bytes(buf[:end]))
        if self._until_close:
            return
        if self._chunked:
            body = _dechunk(buf, self._head_end)
            if body is None:
                return
        else:
            if len(buf) < self._need:
                return
            body = bytes(buf[self._head_end:self._need])
        self._complete(self._status, body)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        self._status = int(status_line[1])
        length = -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
            elif name == b"connection" and b"close" in value.lower():
                self._close_after = True
        if status_line[0] == b"HTTP/1.0":
            self._close_after = True
        if self._chunked:
            return
        if length >= 0:
            self._need = self._head_end + length
        elif self._status in (204, 304) or 100 <= self._status < 200:
            self._need = self._head_end
        else:
            self._until_close = True  # RFC 9112 §6.3: no length, the body ends with the connection

    def _complete(self, status: int, body: bytes) -> None:
        job = self.job
        assert job is not None
        self.job = None
        self.served += 1
        if self._close_after:
            self.drop()
        self._pool.on_answer(self, job, self._sent_at, status, body)

    def expire(self) -> None:
        """The sweeper found this request past its deadline: count a timeout, drop the socket."""
        job = self.job
        if job is None:
            return
        self.job = None
        self.drop()
        self._pool.on_failure(job, "timeout")

    def drop(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        job = self.job
        if job is not None:
            if self._until_close and self._head_end >= 0:
                self._complete(self._status, bytes(self._buf[self._head_end:]))
            elif self.served > 0 and not self._buf:
                # A reused keep-alive connection the server closed as we wrote to it (its idle
                # timeout raced our request): nothing was processed, so the owner may resend.
                self.job = None
                self._pool.on_stale(job)
            else:
                self.job = None
                reason = type(exc).__name__ if exc is not None else "closed by server"
                self._pool.on_failure(job, f"connection: {reason}")
        self._pool.on_lost(self)


def _dechunk(buf: bytearray, start: int) -> bytes | None:
    """The body of a complete chunked message, or None while chunks are still arriving."""
    out = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        if size == 0:
            # No trailers expected from the servers we test; the message ends with CRLF CRLF.
            return bytes(out) if buf.find(b"\r\n", eol + 2) >= 0 else None
        if len(buf) < eol + 2 + size + 2:
            return None
        out += buf[eol + 2:eol + 2 + size]
        pos = eol + 2 + size + 2
