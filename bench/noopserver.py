"""The cheapest HTTP/1.1 server we can write, to measure the load tester's own cost.

It frames each request by Content-Length, ignores the body and answers one fixed JSON document
on the keep-alive connection: no routing, no parsing. Whatever latency and CPU remain when
`dinserve loadtest --noop-server` drives it are the client's floor (plus this loop's few
microseconds). Run: `python -m bench.noopserver --port 0`; it prints `listening <port>` and
stops by itself after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import cast

from bench.loadclient import run_loop

RESPONSE_BODY = b'{"model_version":"noop","scores":[],"history_length":0,"degraded":false}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(RESPONSE_BODY)).encode() + b"\r\n\r\n" + RESPONSE_BODY
)


class _NoopProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in bytes(buf[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            total = end + 4 + length
            if len(buf) < total:
                return
            del buf[:total]
            assert self._transport is not None
            self._transport.write(RESPONSE)


async def serve(host: str, port: int, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_NoopProtocol, host, port)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening {bound}", flush=True)
    async with server:
        await asyncio.sleep(max_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)
    try:
        run_loop(serve(args.host, args.port, args.max_seconds))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
