"""End to end: `python -m service` (real uvicorn) over real HTTP, real Redis, real bundles.

Fault tests use a redis-server of their own (private_redis): it is paused with CLIENT PAUSE or
stopped and restarted, which must never happen to the shared server. Latencies are recorded and
printed (run with -s to see them); the only bound asserted is deadline + 1 s, far from the figures,
so a busy machine cannot make these tests flaky.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
import redis
from service_helpers import ROOT, ServiceProcess, item_ids, metric, reference_scores

from dinserve import processes
from service.history import keys

if TYPE_CHECKING:
    from conftest import PrivateRedis

DEADLINE_MS = 100
GENEROUS = DEADLINE_MS / 1000 + 1.0  # the asserted latency bound; the real figures are printed


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory: serve(model_dir, redis_url, **CTR settings) -> a started ServiceProcess."""
    started: list[ServiceProcess] = []

    def start(model_dir: Path, redis_url: str, **overrides: Any) -> ServiceProcess:
        settings = {"reload_poll_seconds": "0", "warmup_runs": "1", **overrides}
        log = tmp_path / f"service-{len(started)}.log"
        env = {k: str(v) for k, v in settings.items()}
        service = ServiceProcess(model_dir, redis_url, log, **env)
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.stop()


def score(http: httpx.Client, body: dict[str, Any]) -> tuple[httpx.Response, float]:
    """POST /score on a kept-alive client; returns the answer and its wall time."""
    start = time.perf_counter()
    response = http.post("/score", json=body)
    return response, time.perf_counter() - start


def report(label: str, seconds: list[float]) -> None:
    ms = sorted(s * 1000 for s in seconds)
    print(f"\n{label}: n={len(ms)} median {ms[len(ms) // 2]:.1f} ms, max {ms[-1]:.1f} ms")


# ----------------------------------------------------------------------------------------------
# Scoring


def test_scores_over_http_equal_the_bundle_run_directly(
    serve: Callable[..., ServiceProcess], tiny_bundle: Path, redis_url: str, redis_prefix: str
) -> None:
    ids = item_ids(tiny_bundle)
    history = [ids[i] for i in (9, 2, 33, 2, 58)] + ["not-in-vocab"]
    hist_key, user_key = keys(redis_prefix, "alice")
    with redis.Redis.from_url(redis_url) as r:
        r.rpush(hist_key, *history)
        r.hset(user_key, mapping={"age_bucket": "18-24"})
    svc = serve(tiny_bundle, redis_url, redis_prefix=redis_prefix, redis_deadline_ms=1000)
    candidates = [ids[0], ids[17], "unknown-1", ids[44], ids[17], "unknown-2", ids[5]]
    context = {"device": "ios"}
    response, _ = score(svc.http, {"user_id": "alice", "context": context,
                                  "candidates": [{"item_id": c} for c in candidates]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "1" and body["degraded"] is False
    assert body["history_length"] == len(history)
    want = reference_scores(tiny_bundle, history, [(c, None) for c in candidates],
                            profile={"age_bucket": "18-24"}, context=context)
    np.testing.assert_allclose(body["scores"], want, atol=1e-6, rtol=0)

    # Order: reversed candidates give reversed scores.
    reversed_body = score(svc.http, {"user_id": "alice", "context": context,
                                    "candidates": [{"item_id": c} for c in candidates[::-1]]})
    np.testing.assert_allclose(reversed_body[0].json()["scores"], want[::-1], atol=1e-6)

    # A user with no history at all: empty history, not an error, not degraded.
    empty = score(svc.http, {"user_id": "nobody", "candidates": [{"item_id": ids[0]}]})[0].json()
    assert empty["history_length"] == 0 and empty["degraded"] is False
    np.testing.assert_allclose(empty["scores"], reference_scores(tiny_bundle, [], [(ids[0], None)]),
                               atol=1e-6)

    # The profile reaches the model: the same request for a user without a profile scores
    # differently (and equals the reference without one).
    with redis.Redis.from_url(redis_url) as r:
        r.rpush(keys(redis_prefix, "bob")[0], *history)
    bob = score(svc.http, {"user_id": "bob", "context": context,
                          "candidates": [{"item_id": c} for c in candidates]})[0].json()
    np.testing.assert_allclose(
        bob["scores"],
        reference_scores(tiny_bundle, history, [(c, None) for c in candidates], context=context),
        atol=1e-6,
    )
    assert not np.allclose(bob["scores"], want, atol=1e-7)

    log = svc.log()
    assert str(tiny_bundle) in log and "history_items" in log  # the one startup line


def test_bad_history_data_is_skipped_not_fatal(
    serve: Callable[..., ServiceProcess], plain_bundle: Path, redis_url: str, redis_prefix: str
) -> None:
    ids = item_ids(plain_bundle)
    with redis.Redis.from_url(redis_url) as r:
        r.set(keys(redis_prefix, "wrongtype")[0], "a string, not a list")
        r.rpush(keys(redis_prefix, "garbage")[0], ids[3], b"\xff\xfe\xfd", "", ids[7], b"\xc3")
    svc = serve(plain_bundle, redis_url, redis_prefix=redis_prefix, redis_deadline_ms=1000)
    candidates = [{"item_id": ids[1]}, {"item_id": ids[2]}]
    wrong, seconds = score(svc.http, {"user_id": "wrongtype", "candidates": candidates})
    assert wrong.status_code == 200, wrong.text
    assert wrong.json()["history_length"] == 0 and wrong.json()["degraded"] is False
    garbage, _ = score(svc.http, {"user_id": "garbage", "candidates": candidates})
    assert garbage.status_code == 200
    assert garbage.json()["history_length"] == 2
    np.testing.assert_allclose(
        garbage.json()["scores"],
        reference_scores(plain_bundle, [ids[3], ids[7]], [(ids[1], None), (ids[2], None)]),
        atol=1e-6,
    )
    metrics = svc.http.get("/metrics").text
    assert metric(metrics, "ctr_history_values_skipped_total", reason="wrong_type") == 1
    assert metric(metrics, "ctr_history_values_skipped_total", reason="invalid_value") == 3
    report("wrong-type history key", [seconds])


# ----------------------------------------------------------------------------------------------
# Redis faults


def test_unreachable_redis_degrades_then_recovers_without_restart(
    serve: Callable[..., ServiceProcess], plain_bundle: Path, private_redis: PrivateRedis
) -> None:
    private_redis.stop()  # nothing listens on its port now
    svc = serve(plain_bundle, private_redis.url, redis_prefix="p", redis_deadline_ms=DEADLINE_MS)
    ids = item_ids(plain_bundle)
    body = {"user_id": "u", "candidates": [{"item_id": ids[1]}, {"item_id": ids[2]}]}
    latencies = []
    for _ in range(10):
        response, seconds = score(svc.http, body)
        latencies.append(seconds)
        assert response.status_code == 200, response.text
        assert response.json()["degraded"] is True and response.json()["history_length"] == 0
    np.testing.assert_allclose(
        response.json()["scores"],
        reference_scores(plain_bundle, [], [(ids[1], None), (ids[2], None)]), atol=1e-6,
    )
    report("redis unreachable (degraded)", latencies)
    assert max(latencies) < GENEROUS
    assert svc.http.get("/readyz").status_code == 503

    private_redis.start()  # same port: the service must find it again by itself
    with private_redis.client() as r:
        r.rpush("p:hist:u", ids[5], ids[6])
    recovered_after = wait_until_not_degraded(svc.http, body)
    assert svc.http.get("/readyz").status_code == 200
    print(f"recovered {recovered_after * 1000:.0f} ms after Redis came back")
    metrics = svc.http.get("/metrics").text
    assert metric(metrics, "ctr_degraded_requests_total", reason="connection") >= 10
    assert metric(metrics, "ctr_redis_errors_total", reason="connection") >= 10


def wait_until_not_degraded(
    http: httpx.Client, body: dict[str, Any], timeout: float = 15.0
) -> float:
    start = time.monotonic()
    while True:
        response, _ = score(http, body)
        assert response.status_code == 200, response.text
        if not response.json()["degraded"]:
            assert response.json()["history_length"] > 0
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, "still degraded after Redis came back"
        time.sleep(0.05)


def test_stalled_redis_degrades_within_the_deadline_then_recovers(
    serve: Callable[..., ServiceProcess], plain_bundle: Path, private_redis: PrivateRedis
) -> None:
    ids = item_ids(plain_bundle)
    with private_redis.client() as r:
        r.rpush("p:hist:u", ids[5], ids[6], ids[7])
    svc = serve(plain_bundle, private_redis.url, redis_prefix="p", redis_deadline_ms=DEADLINE_MS)
    body = {"user_id": "u", "candidates": [{"item_id": ids[1]}]}
    assert score(svc.http, body)[0].json()["degraded"] is False

    private_redis.pause(3000)
    paused_at = time.monotonic()
    latencies: list[float] = []
    failures: list[str] = []

    def ranker(http: httpx.Client) -> None:
        for _ in range(4):
            response, seconds = score(http, body)
            latencies.append(seconds)
            if response.status_code != 200 or not response.json()["degraded"]:
                failures.append(f"{response.status_code} {response.text}")

    clients = [svc.client() for _ in range(4)]
    for http in clients:
        http.get("/healthz")  # connected before the stall: measure the service, not the TCP setup
    threads = [threading.Thread(target=ranker, args=(http,)) for http in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for http in clients:
        http.close()
    assert time.monotonic() - paused_at < 3.0, "the stall ended before the requests did"
    assert failures == []
    report(f"redis stalled, deadline {DEADLINE_MS} ms (degraded)", latencies)
    assert max(latencies) < GENEROUS

    # After the pause: back to real histories, same process, same pool.
    time.sleep(max(0.0, 3.0 - (time.monotonic() - paused_at)))
    recovered_after = wait_until_not_degraded(svc.http, body)
    print(f"recovered {recovered_after * 1000:.0f} ms after the pause ended")
    metrics = svc.http.get("/metrics").text
    assert metric(metrics, "ctr_degraded_requests_total", reason="timeout") >= 16


def test_fail_policy_answers_503_and_never_logs_the_password(
    serve: Callable[..., ServiceProcess], plain_bundle: Path, private_redis: PrivateRedis
) -> None:
    private_redis.stop()
    url = private_redis.url.replace("redis://", "redis://:pa55w0rd@")
    svc = serve(plain_bundle, url, redis_prefix="p", redis_deadline_ms=DEADLINE_MS,
                redis_policy="fail")
    ids = item_ids(plain_bundle)
    latencies = []
    for _ in range(5):
        response, seconds = score(svc.http, {"user_id": "u", "candidates": [{"item_id": ids[1]}]})
        latencies.append(seconds)
        assert response.status_code == 503
        assert response.json()["error"] == "history_unavailable"
        assert response.headers["retry-after"] == "1"
    report("redis unreachable (fail policy, 503)", latencies)
    assert svc.http.get("/healthz").status_code == 200
    assert "pa55w0rd" not in svc.log() and "pa55w0rd" not in svc.http.get("/model").text
    assert f"127.0.0.1:{private_redis.port}" in svc.log()


# ----------------------------------------------------------------------------------------------
# Hot reload


def install(src: Path, name_dir: Path, version: str) -> Path:
    """Copy a bundle in as one rename, the way a deploy script should (no half-written version)."""
    staging = name_dir / f".staging-{version}"
    shutil.copytree(src, staging)
    final = name_dir / version
    os.rename(staging, final)
    return final


def test_hot_reload_under_concurrent_requests(
    serve: Callable[..., ServiceProcess], tiny_bundle: Path, plain_bundle: Path, redis_url: str,
    redis_prefix: str, tmp_path: Path,
) -> None:
    name_dir = tmp_path / "models" / "din"
    install(tiny_bundle, name_dir, "1")
    ids = item_ids(tiny_bundle)
    with redis.Redis.from_url(redis_url) as r:
        r.rpush(keys(redis_prefix, "u")[0], ids[3], ids[4])
    svc = serve(tmp_path / "models", redis_url, redis_prefix=redis_prefix, redis_deadline_ms=1000,
                reload_poll_seconds="0.2", admin_token="t0ken")
    body = {"user_id": "u", "candidates": [{"item_id": i} for i in ids[:20]],
            "context": {"device": "web"}}
    stop = threading.Event()
    seen: list[list[tuple[int, str]]] = [[] for _ in range(4)]  # per thread, in request order
    errors: list[str] = []

    def hammer(mine: list[tuple[int, str]]) -> None:
        with svc.client() as http:
            while not stop.is_set():
                try:
                    response = http.post("/score", json=body)
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    continue
                ok = response.status_code == 200
                mine.append((response.status_code, response.json()["model_version"] if ok else ""))

    threads = [threading.Thread(target=hammer, args=(mine,)) for mine in seen]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        # Version 2 has different weights and no context feature: a real model change.
        install(plain_bundle, name_dir, "2")
        wait_for(lambda: svc.http.get("/model").json()["version"] == "2", "version 2")
        time.sleep(0.5)

        # Version 3 is corrupt: refused, logged once, counted; version 2 keeps serving.
        broken = install(tiny_bundle, name_dir, "3")
        with (broken / "items.tsv").open("a") as f:
            f.write("tampered\t\n")
        wait_for(lambda: metric(svc.http.get("/metrics").text,
                                "ctr_model_reloads_total", result="rejected") >= 1, "rejection")
        time.sleep(1.0)  # several more polls: the same broken bundle must not be retried
        refused = svc.http.post("/admin/reload", headers={"Authorization": "Bearer t0ken"})
        assert refused.status_code == 409
        assert "still serving version 2" in refused.json()["message"]
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert errors == []
    answers = [answer for mine in seen for answer in mine]
    assert {status for status, _ in answers} == {200}, [a for a in answers if a[0] != 200][:5]
    versions = [version for _, version in answers]
    assert {"1", "2"} <= set(versions) and "3" not in versions
    for mine in seen:
        # Within one client, a request sent after another was answered by v2 never sees v1 again:
        # the swap is one reference, not a mix. (Across clients, a request pinned to v1 before the
        # swap may finish after one that started on v2: in-flight requests keep their model.)
        order = [version for _, version in mine]
        if "2" in order:
            assert set(order[order.index("2"):]) == {"2"}
    print(f"\nhot reload: {len(answers)} requests, 0 failed, {versions.count('1')} on v1, "
          f"{versions.count('2')} on v2")

    metrics = svc.http.get("/metrics").text
    assert metric(metrics, "ctr_model_reloads_total", result="loaded") == 1
    assert metric(metrics, "ctr_model_reloads_total", result="rejected") == 1
    assert metric(metrics, "ctr_model_info", name="din-plain", version="2") == 1
    assert svc.log().count("model reload refused") == 1
    after = score(svc.http, body)[0].json()
    np.testing.assert_allclose(
        after["scores"],
        reference_scores(plain_bundle, [ids[3], ids[4]], [(i, None) for i in ids[:20]]),
        atol=1e-6,
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------
# Startup


@pytest.mark.parametrize("entry", ["python -m service", "dinserve serve"])
def test_start_without_a_valid_model_exits_non_zero_with_a_clear_message(
    entry: str, tiny_bundle: Path, tmp_path: Path
) -> None:
    argv = ([sys.executable, "-m", "service"] if entry.startswith("python")
            else [sys.executable, "-m", "dinserve", "serve"])
    port = str(processes.free_port())
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = subprocess.run([*argv, "--model-dir", str(empty), "--port", port],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert missing.returncode == 2
    assert "no valid model" in missing.stderr and str(empty) in missing.stderr
    assert "Traceback" not in missing.stderr

    broken = tmp_path / "models" / "m" / "1"
    shutil.copytree(tiny_bundle, broken)
    (broken / "categories.tsv").write_text("Drama\n")
    tampered = subprocess.run([*argv, "--model-dir", str(broken.parent), "--port", port],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert tampered.returncode == 2
    assert "categories.tsv" in tampered.stderr and "sha256" in tampered.stderr
