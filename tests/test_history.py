"""service/history.py against a real Redis: key scheme, order, cap, profile, bad data, outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from dinserve import processes
from service.errors import HistoryUnavailable
from service.history import History, HistoryStore, _decode, _text, keys, open_client

if TYPE_CHECKING:
    from conftest import PrivateRedis

T = TypeVar("T")

DEADLINE = 0.05


def make_store(url: str, prefix: str, deadline: float = DEADLINE) -> HistoryStore:
    client = open_client(url, deadline_seconds=deadline, max_connections=16)
    return HistoryStore(client, prefix, deadline)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_keys_are_built_from_prefix_and_user() -> None:
    assert keys("ctr", "u:1") == ("ctr:hist:u:1", "ctr:user:u:1")


def test_reads_newest_first_capped_with_profile(redis_url: str, redis_prefix: str) -> None:
    hist_key, user_key = keys(redis_prefix, "alice")
    with redis.Redis.from_url(redis_url) as r:
        r.rpush(hist_key, *[f"item{i}" for i in range(8)])  # item0 is the newest
        r.hset(user_key, mapping={"age": "30", "gender": "f"})

    async def scenario() -> tuple[History, History, History]:
        store = make_store(redis_url, redis_prefix)
        try:
            capped = await store.fetch("alice", 5, with_profile=True)
            no_profile = await store.fetch("alice", 100, with_profile=False)
            missing = await store.fetch("nobody", 5, with_profile=True)
            return capped, no_profile, missing
        finally:
            await store.client.aclose()

    capped, no_profile, missing = run(scenario())
    assert capped.items == ["item0", "item1", "item2", "item3", "item4"]
    assert capped.profile == {"age": "30", "gender": "f"}
    assert capped.skipped == {}
    assert len(no_profile.items) == 8 and no_profile.profile == {}
    assert missing.items == [] and missing.profile == {}


def test_wrong_type_and_garbage_values_are_skipped_and_counted(
    redis_url: str, redis_prefix: str
) -> None:
    with redis.Redis.from_url(redis_url) as r:
        r.set(keys(redis_prefix, "wrong")[0], "not a list")
        r.rpush(keys(redis_prefix, "wrong")[1], "not a hash")
        garbage_key = keys(redis_prefix, "garbage")[0]
        r.rpush(garbage_key, "7", b"\xff\xfe", "", "a\tb", "8", "\xe9t\xe9")

    async def scenario() -> tuple[History, History, History]:
        store = make_store(redis_url, redis_prefix)
        try:
            return (
                await store.fetch("wrong", 5, with_profile=True),  # the pipelined read
                await store.fetch("wrong", 5, with_profile=False),  # the single LRANGE
                await store.fetch("garbage", 10, with_profile=False),
            )
        finally:
            await store.client.aclose()

    wrong, wrong_list_only, garbage = run(scenario())
    assert wrong.items == [] and wrong.profile == {}
    assert wrong.skipped == {"wrong_type": 2}
    assert wrong_list_only.items == [] and wrong_list_only.skipped == {"wrong_type": 1}
    assert garbage.items == ["7", "8", "\xe9t\xe9"]
    assert garbage.skipped == {"invalid_value": 3}


# Values as Redis may hold them: ids, text with the characters a value may not hold, and bytes
# that are not UTF-8 (a lone continuation byte, a character cut short, an overlong form).
_VALUES = st.one_of(
    st.text(alphabet=st.sampled_from("7a\u00e9\u4e2d\U0001f600\t\n\r \x00"), max_size=4).map(
        str.encode
    ),
    st.sampled_from([b"\xff", b"\x80", b"\xe4\xb8", b"\xc0\xaf", b"ok"]),
    st.binary(max_size=3),
)


@given(st.lists(_VALUES, max_size=8))
def test_a_list_decodes_as_its_values_one_by_one(raws: list[bytes]) -> None:
    # _decode reads a clean list in one decode; the result must be what the value-by-value rule
    # gives, including which values are skipped and how many.
    one_by_one = [_text(raw) for raw in raws]
    history = _decode([raws], with_profile=False)
    assert history.items == [text for text in one_by_one if text is not None]
    dropped = one_by_one.count(None)
    assert history.skipped == ({"invalid_value": dropped} if dropped else {})


def test_unreachable_redis_is_history_unavailable_within_the_deadline() -> None:
    closed = f"redis://127.0.0.1:{processes.free_port()}/0"

    async def scenario() -> tuple[HistoryUnavailable, float]:
        store = make_store(closed, "x")
        try:
            start = time.perf_counter()
            with pytest.raises(HistoryUnavailable) as info:
                await store.fetch("u", 5, with_profile=False)
            assert not await store.ping()
            return info.value, time.perf_counter() - start
        finally:
            await store.client.aclose()

    error, elapsed = run(scenario())
    assert error.reason == "connection"
    assert error.status == 503
    print(f"unreachable: failed after {elapsed * 1000:.1f} ms")


def test_stalled_redis_misses_the_deadline_then_recovers(private_redis: PrivateRedis) -> None:
    with private_redis.client() as r:
        r.rpush("p:hist:u", "1", "2")

    async def scenario() -> tuple[list[str], list[float], list[str]]:
        store = make_store(private_redis.url, "p")
        try:
            before = (await store.fetch("u", 5, False)).items
            private_redis.pause(1500)
            reasons, elapsed = [], []
            # Several requests during the stall, some concurrent: each must give up at the deadline.
            for _ in range(3):
                start = time.perf_counter()
                results = await asyncio.gather(
                    *(store.fetch("u", 5, False) for _ in range(4)), return_exceptions=True
                )
                elapsed.append(time.perf_counter() - start)
                for result in results:
                    assert isinstance(result, HistoryUnavailable), result
                    reasons.append(result.reason)
            # After the pause: the same client, the same pool, answers again (nothing wedged).
            deadline = time.monotonic() + 10
            while True:
                try:
                    after = (await store.fetch("u", 5, False)).items
                    break
                except HistoryUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            # Every connection went back to the pool: none is stuck "in use".
            pool = store.client.connection_pool
            assert len(pool._in_use_connections) == 0  # noqa: SLF001
            assert before == after == ["1", "2"]
            return reasons, elapsed, after
        finally:
            await store.client.aclose()

    reasons, elapsed, _ = run(scenario())
    assert set(reasons) == {"timeout"}
    print(f"stalled: batches gave up after {[round(e * 1000, 1) for e in elapsed]} ms")
    assert max(elapsed) < DEADLINE + 1.0  # generous: the figure is printed, not asserted tightly


def test_redis_restarted_on_the_same_port_is_used_again(private_redis: PrivateRedis) -> None:
    async def scenario() -> None:
        store = make_store(private_redis.url, "p")
        try:
            assert (await store.fetch("u", 5, False)).items == []
            private_redis.stop()
            with pytest.raises(HistoryUnavailable):
                await store.fetch("u", 5, False)
            private_redis.start()
            with private_redis.client() as r:
                r.rpush("p:hist:u", "9")
            assert (await store.fetch("u", 5, False)).items == ["9"]
            assert await store.ping()
        finally:
            await store.client.aclose()

    run(scenario())


def test_a_full_pool_makes_requests_wait_not_fail(redis_url: str, redis_prefix: str) -> None:
    with redis.Redis.from_url(redis_url) as r:
        r.rpush(keys(redis_prefix, "u")[0], "1")

    async def scenario() -> list[History]:
        client = open_client(redis_url, deadline_seconds=2.0, max_connections=2)
        store = HistoryStore(client, redis_prefix, 2.0)
        try:
            return list(await asyncio.gather(*(store.fetch("u", 5, False) for _ in range(12))))
        finally:
            await client.aclose()

    assert [h.items for h in run(scenario())] == [["1"]] * 12
