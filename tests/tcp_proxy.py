"""TcpProxy: a loopback TCP proxy whose network can be made slow, silent or hostile at run time.

For fault tests between the service and Redis: point the service at the proxy's port and turn
faults on and off while load runs. The proxy runs its own asyncio loop in a daemon thread, so the
test's thread stays free; every control method is thread-safe and takes effect at once for new
bytes (bytes already delayed keep their schedule).

    delay(seconds)   every chunk, both directions, is held this long (a slow or distant network)
    blackhole(True)  bytes are read and dropped, nothing is forwarded, connections stay open: a
                     partition where packets vanish and only a timeout can tell
    refuse(True)     new connections are reset as soon as they are accepted
    reset_all()      every open connection is reset now (RST, not FIN: a crashed peer or a
                     middlebox dropping state)
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from types import TracebackType

CHUNK = 65536


class TcpProxy:
    """127.0.0.1:<port> -> target_host:target_port, with switchable faults (module docstring)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._delay = 0.0
        self._blackhole = False
        self._refuse = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.accepted = 0

    # -- control (any thread) -----------------------------------------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                _reset(writer)
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def delay(self, seconds: float) -> None:
        self._delay = max(0.0, seconds)

    def blackhole(self, on: bool) -> None:
        self._blackhole = on

    def refuse(self, on: bool) -> None:
        self._refuse = on

    def reset_all(self) -> None:
        async def reset() -> None:
            for writer in list(self._writers):
                _reset(writer)

        asyncio.run_coroutine_threadsafe(reset(), self._loop).result(10)

    def clear(self) -> None:
        """Back to a healthy network."""
        self.delay(0.0)
        self.blackhole(False)
        self.refuse(False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- the loop -----------------------------------------------------------------------------

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._refuse:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)  # the target is down: the client sees a reset, as through a NAT
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                if not w.is_closing():
                    _reset(w)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction, holding each chunk for the delay in force when it arrived."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if writer.is_closing():
                    break
                writer.write(data)
                await writer.drain()
            if not writer.is_closing():
                writer.close()

        sender = asyncio.create_task(forward())
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if self._blackhole:
                    continue
                queue.put_nowait((time.monotonic() + self._delay, data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((0.0, b""))
            try:
                await sender
            except (ConnectionError, OSError):
                pass


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER 0 makes close() abort the connection."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
