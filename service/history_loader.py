"""`dinserve history load`: write every user's history from an interaction log into Redis.

The log is read by service/interaction_log.py, the reader training uses too, and grouped
by InteractionLog.histories(): the same behaviours, newest first, capped at the max history length.
Each user is written as one MULTI/EXEC (DEL, then RPUSH of the capped list, then the profile hash
when asked), so a reader never sees a half-written list and running the load twice leaves the
same state: idempotent. Users are pipelined in batches, one round trip per batch.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError
from redis.typing import EncodableT, FieldT

from dinserve.commands import HistoryLoadOptions
from service.bundle import BundleError, read_manifest, resolve_bundle
from service.config import Settings
from service.history import keys
from service.interaction_log import read_log

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 100
BATCH_USERS = 500  # users per pipeline round trip: ~50k list entries at length 100


@dataclass(frozen=True)
class LoadReport:
    users: int
    entries: int
    profiles: int
    seconds: float


def write_histories(
    client: redis.Redis,
    prefix: str,
    histories: Iterable[Any],
    user_columns: Sequence[str] = (),
    batch_users: int = BATCH_USERS,
) -> LoadReport:
    """Replace each user's list (and profile hash) under prefix; returns what was written.

    `histories` yields objects with user_id, items (newest first, already capped) and profile
    (interaction_log.UserHistory).
    """
    start = time.perf_counter()
    users = entries = profiles = 0
    pipe = client.pipeline(transaction=False)
    pending = 0
    for history in histories:
        hist_key, user_key = keys(prefix, history.user_id)
        # MULTI per user inside a plain pipeline: atomic per user without holding Redis for a
        # whole batch (a batch-wide MULTI would stall the service's reads for its duration).
        pipe.execute_command("MULTI")  # type: ignore[no-untyped-call]
        pipe.delete(hist_key)
        if history.items:
            pipe.rpush(hist_key, *history.items)  # RPUSH keeps order: index 0 = newest
        if user_columns:
            pipe.delete(user_key)
            values = {c: str(history.profile.get(c, "")) for c in user_columns}
            present: dict[FieldT, EncodableT] = {c: v for c, v in values.items() if v != ""}
            # "" = missing: the service then feeds padding, as training did
            if present:
                pipe.hset(user_key, mapping=present)
                profiles += 1
        pipe.execute_command("EXEC")  # type: ignore[no-untyped-call]
        users += 1
        entries += len(history.items)
        pending += 1
        if pending >= batch_users:
            _flush(pipe)
            pending = 0
    if pending:
        _flush(pipe)
    return LoadReport(users, entries, profiles, time.perf_counter() - start)


def _flush(pipe: Any) -> None:
    for reply in pipe.execute(raise_on_error=True):
        if isinstance(reply, Exception):  # an EXEC that aborted carries its error as a value
            raise reply


def bundle_defaults(model_dir: Path) -> tuple[int, list[str]]:
    """(max history length, user-profile feature names) from a bundle's manifest alone.

    Reads manifest.json only: loading the ONNX session would cost time and prove nothing here.
    """
    manifest = read_manifest(resolve_bundle(model_dir))
    return manifest.max_history_length, [f.name for f in manifest.features.user]


def run(options: HistoryLoadOptions) -> int:
    """Handler of `dinserve history load`; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    overrides: dict[str, Any] = {
        name: value
        for name, value in (("redis_url", options.redis_url), ("redis_prefix", options.prefix))
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    max_length: int | None = options.max_length
    user_columns = [c.strip() for c in options.user_columns.split(",") if c.strip()]
    if options.model_dir is not None:
        try:
            bundle_length, bundle_user = bundle_defaults(options.model_dir)
        except BundleError as exc:
            print(f"error: cannot read the bundle at {options.model_dir}: {exc}", file=sys.stderr)
            return 2
        max_length = max_length or bundle_length
        user_columns = user_columns or bundle_user
    max_length = max_length or DEFAULT_MAX_LENGTH

    try:
        log = read_log(options.data, options.format, user_columns=user_columns)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        report = write_histories(
            client, settings.redis_prefix, log.histories(max_length), user_columns
        )
    except (redis.RedisError, OSError) as exc:
        print(f"error: Redis at {settings.redis_location}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    logger.info(
        "loaded %d users, %d history entries (max %d per user), %d profiles into %s under "
        "prefix %r in %.1f s",
        report.users,
        report.entries,
        max_length,
        report.profiles,
        settings.redis_location,
        settings.redis_prefix,
        report.seconds,
    )
    return 0
