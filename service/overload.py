"""AdmissionControl: bounded concurrency, a bounded queue, deadlines and a body timeout for /score.

An ASGI middleware in front of POST /score (the only gated route: probes, /metrics and /model
always answer, so an orchestrator can tell "busy" from "dead"). At most `max_in_flight` requests
run; up to `max_queued` more wait for at most `queue_timeout`; anything beyond answers at once with
503 `overloaded` and `Retry-After`, before any Redis read or graph call. A queue that can only
grow turns a burst into minutes of latency for everyone (Little's law: the wait is queue length /
throughput); a short bounded one absorbs jitter and sheds the rest while it is still cheap to
shed.

Adaptive LIFO for requests with deadlines: a freed slot goes to the oldest waiter while the queue
only absorbs jitter, and to the newest once the oldest carries a deadline and has waited
`lifo_after` (the queue is standing: arrivals outrun capacity). Served oldest first, a standing
queue hands every slot to the request closest to its caller's deadline, which then misses it, and
the next one too: the service stays busy and answers almost nothing in time. Served newest
first, the requests that run have the most budget left and make it; the oldest time out in the
queue, where refusing them costs nothing. A request without a deadline has no stated budget to
miss: it keeps its turn, so near capacity none is starved into a 503 that oldest first would
have served within the queue timeout (measured both ways, docs/performance.md).

A caller may send `X-Request-Deadline-Ms: <ms>`, its remaining budget counted from arrival here.
A request whose deadline passes while it waits answers 504 `deadline_exceeded` without running;
one whose deadline passes while it runs is cancelled at that moment (the Redis read is cancel-safe,
service/history.py; a graph call still waiting for an inference thread is never started, one
already running finishes in its thread and its result is discarded) and answers 504, rather than
a score that the ranking stage has stopped waiting for. Once the response has started the deadline
no longer applies: a half-sent answer would be worse than a late one.

The body is read before a slot is taken, and must arrive within `body_timeout` of the headers: a
client that trickles its body (slow-loris) holds only its own connection, never a slot the others
need, and gets 408 and its connection closed (the body size limit, service/middleware.py, still
applies as the bytes arrive). A caller that hangs up while its request waits for a slot leaves the
queue at once and is never run: the queue holds only requests someone still waits for.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Collection

from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    CLIENT_CLOSED_REQUEST,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    ServiceError,
    error_response,
)
from service.metrics import Metrics

DEADLINE_HEADER = "x-request-deadline-ms"
MAX_DEADLINE_MS = 600_000.0  # ten minutes: anything longer is a unit mistake (seconds? µs?)
GATED_ROUTES: frozenset[tuple[str, str]] = frozenset({("POST", "/score")})


def parse_deadline(headers: Collection[tuple[bytes, bytes]]) -> float | None:
    """The X-Request-Deadline-Ms budget in seconds, None when absent; InvalidRequest if malformed.

    The header is the caller's remaining budget in milliseconds (a positive number, fractions
    allowed), relative rather than a wall-clock time so that client and server clocks need not
    agree (gRPC's grpc-timeout is relative for the same reason).
    """
    raw = next((value for name, value in headers if name == DEADLINE_HEADER.encode()), None)
    if raw is None:
        return None
    try:
        ms = float(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        ms = math.nan
    if not 0 < ms <= MAX_DEADLINE_MS:  # `not` also refuses NaN
        raise InvalidRequest(
            f"{DEADLINE_HEADER}: must be a number of milliseconds in (0, {MAX_DEADLINE_MS:g}]",
            field=DEADLINE_HEADER,
            limit=MAX_DEADLINE_MS,
        )
    return ms / 1000.0


class AdmissionControl:
    """ASGI middleware: the bounded gate in front of the scoring route (module docstring).

    The slot accounting is a counter plus a deque of waiting futures rather than
    asyncio.Semaphore: the queue length must be known to refuse beyond it, the handover picks
    either end of the queue (module docstring), and a released slot goes straight to a waiter so
    a newcomer cannot overtake the queue.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        max_in_flight: int,
        max_queued: int,
        queue_timeout_seconds: float,
        body_timeout_seconds: float,
        lifo_after_seconds: float = math.inf,
        routes: frozenset[tuple[str, str]] = GATED_ROUTES,
    ) -> None:
        if max_in_flight < 1 or max_queued < 0 or not lifo_after_seconds >= 0:
            raise ValueError(
                "max_in_flight must be >= 1, max_queued >= 0 and lifo_after_seconds >= 0"
            )
        self.app = app
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout_seconds
        self.body_timeout = body_timeout_seconds
        self.lifo_after = lifo_after_seconds
        self.routes = routes
        self.running = 0
        # (standing from, waiter), oldest on the left: _acquire() and _release()
        self._waiters: deque[tuple[float, asyncio.Future[None]]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) not in self.routes:
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        try:
            budget = parse_deadline(scope["headers"])
            body = await self._read_body(receive, arrived + self.body_timeout)
        except ServiceError as exc:  # the deadline header, the body timeout, the size limit
            await self._refuse(exc, scope, receive, send)
            return
        except ClientDisconnect:
            await self._hung_up(scope, receive, send)
            return
        deadline_at = None if budget is None else arrived + budget
        read = loop.time()
        wait = self.queue_timeout if deadline_at is None else min(
            self.queue_timeout, max(0.0, deadline_at - read))
        try:
            await self._acquire(wait, with_deadline=budget is not None, receive=receive)
        except TimeoutError:
            refused: ServiceError
            if budget is not None and wait < self.queue_timeout:
                self.metrics.rejected.labels("deadline").inc()
                refused = DeadlineExceeded(
                    f"{DEADLINE_HEADER}: {budget * 1000:g} ms passed before the request got a "
                    "processing slot; it was not run",
                    field=DEADLINE_HEADER,
                )
            else:
                self.metrics.rejected.labels("queue_timeout").inc()
                refused = Overloaded(
                    f"overloaded: no processing slot within {self.queue_timeout * 1000:g} ms "
                    f"({self.max_in_flight} in flight, {self.queued} queued); retry later",
                    reason="queue_timeout",
                )
            await self._refuse(refused, scope, receive, send)
            return
        except Overloaded as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            await self._refuse(exc, scope, receive, send)
            return
        except ClientDisconnect:
            await self._hung_up(scope, receive, send)
            return
        self.metrics.queue_wait_seconds.observe(loop.time() - read)
        try:
            await self._run(scope, _replay(body, receive), send, deadline_at, budget)
        finally:
            self._release()

    async def _read_body(self, receive: Receive, until: float) -> bytes:
        """The whole body by `until`; RequestTimeout (408) after it, ClientDisconnect on a hang-up.

        Small bodies usually arrive with the headers, so the first receive() answers at once.
        """
        chunks: list[bytes] = []
        while True:
            try:
                async with asyncio.timeout_at(until):
                    message = await receive()
            except TimeoutError:
                self.metrics.rejected.labels("body_timeout").inc()
                raise RequestTimeout(
                    f"body: not received within {self.body_timeout * 1000:g} ms",
                    field="body",
                    limit=self.body_timeout * 1000,
                    # A half-read body leaves the connection unusable: close it.
                    headers={"Connection": "close"},
                ) from None
            if message["type"] != "http.request":
                raise ClientDisconnect()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # -- the slots ----------------------------------------------------------------------------

    async def _acquire(
        self, wait_seconds: float, with_deadline: bool = False, receive: Receive | None = None,
    ) -> None:
        """Take a slot, waiting at most wait_seconds; Overloaded at once when the queue is full.

        A waiter is queued with the time from which, as the oldest, it makes the queue standing:
        lifo_after after it came for a request with a deadline, never for one without. With
        `receive` (the body already read), a caller that hangs up while waiting leaves the queue
        at once: ClientDisconnect.
        """
        if self.running < self.max_in_flight and not self._waiters:
            self.running += 1
            self.metrics.in_flight.set(self.running)
            return
        if len(self._waiters) >= self.max_queued:
            raise Overloaded(
                f"overloaded: {self.max_in_flight} requests in flight and {self.queued} queued "
                f"(max_queued {self.max_queued}); retry later",
                reason="queue_full",
            )
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        standing_from = loop.time() + self.lifo_after if with_deadline else math.inf
        entry = (standing_from, waiter)
        self._waiters.append(entry)
        self.metrics.queued.set(self.queued)
        # After the body, the server's receive() answers only when the connection ends; that
        # cancels the waiter, as a cancelled request task does, so that no slot goes to it.
        hang_up = None if receive is None else asyncio.ensure_future(receive())
        if hang_up is not None:
            hang_up.add_done_callback(lambda _: waiter.cancel())  # no-op once it has its slot
        try:
            async with asyncio.timeout(wait_seconds):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as the wait ended: take it rather than leak it.
                return
            if isinstance(exc, asyncio.CancelledError) and _ended(hang_up):
                raise ClientDisconnect() from None
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            if hang_up is not None and not hang_up.done():
                hang_up.cancel()
            if entry in self._waiters:
                self._waiters.remove(entry)  # O(max_queued), only when a waiter gives up
            self.metrics.queued.set(self.queued)
        if _ended(hang_up):  # in the same turn as the slot came: pass it on
            self._release()
            raise ClientDisconnect()

    def _release(self) -> None:
        """Hand the slot to a live waiter (running stays the same), or free it.

        The oldest waiter, unless it makes the queue standing: then the newest (module docstring).
        """
        waiters = self._waiters
        # A waiter that timed out or was cancelled leaves the deque when its task resumes; until
        # then it may sit at either end.
        while waiters and waiters[0][1].done():
            waiters.popleft()
        while waiters and waiters[-1][1].done():
            waiters.pop()
        if waiters:
            standing = asyncio.get_running_loop().time() >= waiters[0][0]
            _, waiter = waiters.pop() if standing else waiters.popleft()
            if standing:
                self.metrics.lifo_handovers.inc()
            waiter.set_result(None)
            self.metrics.queued.set(self.queued)
            return
        self.running -= 1
        self.metrics.in_flight.set(self.running)

    # -- one admitted request -----------------------------------------------------------------

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, deadline_at: float | None,
        budget: float | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        started = False
        timeout: asyncio.Timeout | None = None

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                if timeout is not None:
                    if timeout.expired():
                        # The deadline fired but its cancellation did not stop the app (something
                        # swallowed it, or a result landed in the same loop turn): answer the 504
                        # now, before a byte of this answer is sent. A pending cancellation lands
                        # at the checkpoint; otherwise the TimeoutError says the same.
                        await asyncio.sleep(0)
                        raise TimeoutError
                    timeout.reschedule(None)  # never cut an answer in half
                started = True
            await send(message)

        if deadline_at is None:
            await self.app(scope, receive, tracked_send)
            return
        try:
            async with asyncio.timeout_at(deadline_at) as timeout:
                if loop.time() >= deadline_at:
                    raise TimeoutError  # spent while queued: do not start the work at all
                await self.app(scope, receive, tracked_send)
        except TimeoutError:
            if started or (timeout is not None and not timeout.expired()
                           and loop.time() < deadline_at):
                raise
            self.metrics.rejected.labels("deadline").inc()
            await self._refuse(
                DeadlineExceeded(
                    f"{DEADLINE_HEADER}: {(budget or 0) * 1000:g} ms passed before the answer "
                    "was ready; the work was dropped",
                    field=DEADLINE_HEADER,
                ),
                scope, receive, send,
            )

    async def _refuse(self, exc: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.errors.labels(exc.code).inc()
        await error_response(exc)(scope, receive, send)

    async def _hung_up(self, scope: Scope, receive: Receive, send: Send) -> None:
        # As the app's handler for a hang-up does (service/errors.py): counted, timed as 499,
        # nothing logged; uvicorn drops the answer, the peer is gone.
        self.metrics.errors.labels("client_disconnected").inc()
        await Response(status_code=CLIENT_CLOSED_REQUEST)(scope, receive, send)


def _ended(hang_up: asyncio.Future[Message] | None) -> bool:
    """True when the connection's receive() has answered (with its end, or an error)."""
    if hang_up is None or not hang_up.done() or hang_up.cancelled():
        return False
    hang_up.exception()  # retrieved: whatever ended the connection, it has ended
    return True


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives the app the body read before admission, then the server's own."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
