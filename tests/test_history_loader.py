"""`dinserve history load`: a log into Redis lists, capped, idempotent, with profiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from dinserve.cli import main
from service.history import keys

LOG = """user_id,item_id,timestamp,category,age
u1,10,100,A,30
u1,11,200,B,30
u1,12,300,A|B,31
u1,13,300,,31
u2,10,50,A,
u3,20,10,,55
u3,21,20,,55
u3,22,30,,55
u3,23,40,,55
u3,24,50,,55
"""


def write_log(tmp_path: Path) -> Path:
    path = tmp_path / "log.csv"
    path.write_text(LOG)
    return path


def lists(url: str, prefix: str) -> dict[str, list[str]]:
    with redis.Redis.from_url(url, decode_responses=True) as r:
        return {user: r.lrange(keys(prefix, user)[0], 0, -1) for user in ("u1", "u2", "u3")}


def test_loads_newest_first_capped_and_idempotent(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    log = write_log(tmp_path)
    argv = ["history", "load", "--data", str(log), "--redis-url", redis_url,
            "--prefix", redis_prefix, "--max-length", "3"]
    assert main(argv) == 0
    first = lists(redis_url, redis_prefix)
    # Equal timestamps keep file order (the later line is newer): 13 before 12.
    assert first == {"u1": ["13", "12", "11"], "u2": ["10"], "u3": ["24", "23", "22"]}

    with redis.Redis.from_url(redis_url) as r:  # stale state a second load must replace
        r.rpush(keys(redis_prefix, "u2")[0], "stale", "entries")
    assert main(argv) == 0
    assert lists(redis_url, redis_prefix) == first
    with redis.Redis.from_url(redis_url) as r:
        assert not r.exists(keys(redis_prefix, "u1")[1])  # no --user-columns: no profile hash


def test_profile_columns_and_bundle_defaults(
    tmp_path: Path, redis_url: str, redis_prefix: str, tiny_bundle: Path
) -> None:
    log = write_log(tmp_path)
    assert main(["history", "load", "--data", str(log), "--redis-url", redis_url,
                 "--prefix", redis_prefix, "--user-columns", "age"]) == 0
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        # The profile is the value at the user's latest event; an empty value is left out.
        assert r.hgetall(keys(redis_prefix, "u1")[1]) == {"age": "31"}
        assert r.hgetall(keys(redis_prefix, "u2")[1]) == {}
        assert r.llen(keys(redis_prefix, "u3")[0]) == 5  # default cap 100 without a bundle

    # With --model-dir: the cap is the bundle's max history length, the profile columns are the
    # bundle's user features.
    long_log = tmp_path / "long.csv"
    rows = "".join(f"u9,{i},{i},,25-34\n" for i in range(40))
    long_log.write_text("user_id,item_id,timestamp,category,age_bucket\n" + rows)
    assert main(["history", "load", "--data", str(long_log), "--redis-url", redis_url,
                 "--prefix", redis_prefix, "--model-dir", str(tiny_bundle.parent)]) == 0
    cap = json.loads((tiny_bundle / "manifest.json").read_text())["max_history_length"]
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        newest = [str(i) for i in range(39, 39 - cap, -1)]
        assert r.lrange(keys(redis_prefix, "u9")[0], 0, -1) == newest
        assert r.hgetall(keys(redis_prefix, "u9")[1]) == {"age_bucket": "25-34"}


def test_errors_are_one_line_and_non_zero(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["history", "load", "--data", str(tmp_path / "absent.csv"),
                 "--redis-url", redis_url]) == 2
    assert "not found" in capsys.readouterr().err
    log = write_log(tmp_path)
    assert main(["history", "load", "--data", str(log), "--redis-url",
                 "redis://127.0.0.1:1/0", "--prefix", "x"]) == 1
    assert "Redis at redis://127.0.0.1:1/0" in capsys.readouterr().err
