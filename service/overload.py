"""AdmissionControl: bounded concurrency, a bounded queue, deadlines and a body timeout for /score.

An ASGI middleware in front of POST /score (the only gated route: probes, /metrics and /model
always answer, so an orchestrator can tell "busy" from "dead"). At most `max_in_flight` requests
run; up to `max_queued` more wait for at most `queue_timeout`; anything beyond answers at once with
503 `overloaded` and `Retry-After`, before its body is read. A queue that can only grow turns a
burst into minutes of latency for everyone (Little's law: the wait is queue length / throughput);
a short bounded one absorbs jitter and sheds the rest while it is still cheap to shed.

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

The body must arrive within `body_timeout` of admission: a client that trickles its body
(slow-loris) gets 408 and its connection closed, instead of holding a slot for ever.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
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
        except InvalidRequest as exc:
            await self._refuse(exc, scope, receive, send)
            return
        deadline_at = None if budget is None else arrived + budget
        wait = self.queue_timeout if budget is None else min(self.queue_timeout, budget)
        try:
            await self._acquire(wait, with_deadline=budget is not None)
        except TimeoutError:
            refused: ServiceError
            if budget is not None and budget <= self.queue_timeout:
                self.metrics.rejected.labels("deadline").inc()
                refused = DeadlineExceeded(
                    f"{DEADLINE_HEADER}: {budget * 1000:g} ms passed while the request was "
                    "queued; it was not run",
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
        self.metrics.queue_wait_seconds.observe(loop.time() - arrived)
        try:
            await self._run(scope, receive, send, deadline_at, budget)
        finally:
            self._release()

    # -- the slots ----------------------------------------------------------------------------

    async def _acquire(self, wait_seconds: float, with_deadline: bool = False) -> None:
        """Take a slot, waiting at most wait_seconds; Overloaded at once when the queue is full.

        A waiter is queued with the time from which, as the oldest, it makes the queue standing:
        lifo_after after it came for a request with a deadline, never for one without.
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
        try:
            async with asyncio.timeout(wait_seconds):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as the wait ended: take it rather than leak it.
                return
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            if entry in self._waiters:
                self._waiters.remove(entry)  # O(max_queued), only on timeout or cancellation
            self.metrics.queued.set(self.queued)

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
        body_deadline = loop.time() + self.body_timeout
        body_done = False
        started = False
        timeout: asyncio.Timeout | None = None

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()  # after the body, receive() waits for a disconnect
            try:
                async with asyncio.timeout_at(body_deadline):
                    message = await receive()
            except TimeoutError:
                if timeout is not None and timeout.expired():
                    raise  # the caller's deadline, not the body's
                self.metrics.rejected.labels("body_timeout").inc()
                raise RequestTimeout(
                    f"body: not received within {self.body_timeout * 1000:g} ms",
                    field="body",
                    limit=self.body_timeout * 1000,
                    # A half-read body leaves the connection unusable: close it.
                    headers={"Connection": "close"},
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

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
            await self.app(scope, timed_receive, tracked_send)
            return
        try:
            async with asyncio.timeout_at(deadline_at) as timeout:
                if loop.time() >= deadline_at:
                    raise TimeoutError  # spent while queued: do not start the work at all
                await self.app(scope, timed_receive, tracked_send)
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
