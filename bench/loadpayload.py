"""What `dinserve loadtest` sends: user ids, candidate items, request bodies, seeded histories.

Bodies are built once before the run (a fixed set of distinct /score requests, cycled) so the
client spends nothing on JSON while it measures. Users come from a count (ids 1..N, MovieLens
style), a file, or the service's Redis keys; items from a bundle's items.tsv (docs/bundle.md) or
a numeric range. For history-length experiments the same users get synthetic histories of a
chosen length written under the service's key scheme, `<prefix>:hist:<user_id>` (a Redis LIST of
raw item ids, newest first; docs/bundle.md and DESIGN.md), so the service reads real lengths.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from service.bundle import ITEMS_FILE, version_dirs
from service.history import keys

SEED_PIPELINE_CHUNK = 500


def history_key(prefix: str, user_id: str) -> str:
    """The service's history key for one user, spelled by service/history.py."""
    return keys(prefix, user_id)[0]


@dataclass(frozen=True)
class Item:
    item_id: str
    category: str  # the first of the item's categories, "" when it has none


def resolve_items_file(path: str | Path) -> Path:
    """items.tsv itself, a bundle version directory, or a bundle name directory (the version the
    service would serve from it).

    Raises FileNotFoundError naming the path when none of these holds an items.tsv.
    """
    p = Path(path)
    if p.is_file():
        return p
    if (p / ITEMS_FILE).is_file():
        return p / ITEMS_FILE
    versions = version_dirs(p)  # the service's rule: the version it would serve comes first
    for _, version in reversed(versions):
        if (version / ITEMS_FILE).is_file():
            return version / ITEMS_FILE
    raise FileNotFoundError(f"no items.tsv at {p} (give the file, models/<name>/<version>/ "
                            "or models/<name>/)")


def read_items(path: str | Path) -> list[Item]:
    """Items of a bundle's items.tsv: `<raw id>\\t<cat>|<cat>|...` per line."""
    items: list[Item] = []
    with open(resolve_items_file(path), encoding="utf-8") as f:
        for line in f:
            raw_id, _, cats = line.rstrip("\n").partition("\t")
            if raw_id:
                items.append(Item(raw_id, cats.split("|", 1)[0]))
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def items_from_range(spec: str) -> list[Item]:
    """Items with numeric ids from "LO:HI" (HI exclusive) and no category."""
    lo_text, sep, hi_text = spec.partition(":")
    if not sep:
        raise ValueError(f"--item-range must be LO:HI, got {spec!r}")
    lo, hi = int(lo_text), int(hi_text)
    if hi <= lo:
        raise ValueError(f"--item-range {spec!r} is empty")
    return [Item(str(i), "") for i in range(lo, hi)]


def read_users_file(path: str | Path) -> list[str]:
    """One user id per line; blank lines and # comments skipped."""
    users = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    users = [u for u in users if u and not u.startswith("#")]
    if not users:
        raise ValueError(f"{path}: no user ids")
    return users


def users_from_redis(redis_url: str, prefix: str, limit: int) -> list[str]:
    """Up to `limit` user ids that have a history under `prefix` (SCAN, never KEYS)."""
    import redis

    head = history_key(prefix, "")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        users: list[str] = []
        for key in client.scan_iter(match=f"{head}*", count=1000):
            users.append(key[len(head):])
            if len(users) >= limit:
                break
    finally:
        client.close()
    if not users:
        raise ValueError(f"no keys {head}* in Redis: load histories first (dinserve history load)")
    return sorted(users)


def seed_histories(redis_url: str, prefix: str, users: Sequence[str], items: Sequence[Item],
                   length: int, seed: int = 0) -> int:
    """Replace each user's history with `length` random items; returns the number of users.

    Overwrites what `dinserve history load` wrote for those users: meant for staging.
    """
    import redis

    rng = random.Random(seed)
    ids = [item.item_id for item in items]
    client = redis.Redis.from_url(redis_url)
    try:
        for start in range(0, len(users), SEED_PIPELINE_CHUNK):
            pipe = client.pipeline(transaction=False)
            for user in users[start:start + SEED_PIPELINE_CHUNK]:
                key = history_key(prefix, user)
                pipe.delete(key)
                if length > 0:
                    pipe.rpush(key, *(rng.choice(ids) for _ in range(length)))
            pipe.execute()
    finally:
        client.close()
    return len(users)


def build_bodies(users: Sequence[str], items: Sequence[Item], candidates: int, distinct: int,
                 *, with_categories: bool = False, context: dict[str, Any] | None = None,
                 seed: int = 0) -> list[bytes]:
    """`distinct` JSON bodies for POST /score, each a random user and `candidates` items."""
    if candidates < 1 or distinct < 1:
        raise ValueError("candidates and distinct must be >= 1")
    if not users or not items:
        raise ValueError("need at least one user and one item")
    rng = random.Random(seed)
    bodies: list[bytes] = []
    for _ in range(distinct):
        # Distinct candidates when the catalogue allows it, as a ranking stage would send.
        chosen = (rng.sample(items, candidates) if candidates <= len(items)
                  else [rng.choice(items) for _ in range(candidates)])
        cands: list[dict[str, str]] = []
        for item in chosen:
            cand = {"item_id": item.item_id}
            if with_categories and item.category:
                cand["category"] = item.category
            cands.append(cand)
        body: dict[str, Any] = {"user_id": rng.choice(users), "candidates": cands}
        if context:
            body["context"] = context
        bodies.append(orjson.dumps(body))
    return bodies
