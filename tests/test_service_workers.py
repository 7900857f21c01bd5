"""CTR_WORKERS=2: two real uvicorn worker processes behind one port, with summed /metrics.

A real `python -m service` (the supervisor) over real HTTP and a real Redis. Proves: both workers
start and load the model, the cores are divided between their inference threads, every answer
is correct whichever worker gave it, any scrape of /metrics reports the requests and the CPU of
the whole service, and SIGTERM stops the supervisor with status 0 and leaves no worker behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import redis
from service_helpers import ServiceProcess, item_ids, metric, reference_scores

from service.config import usable_cores
from service.history import keys


def worker_pids(supervisor: int) -> list[int]:
    """Children of the supervisor that are uvicorn workers (multiprocessing spawn children)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                          if ":\t" in line)
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == supervisor and b"spawn_main" in cmdline:
            found.append(int(status.parent.name))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process, from /proc/<pid>/stat (clock ticks)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; utime, stime: 14th, 15th
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_two_workers_serve_one_port_with_summed_metrics_and_drain_on_sigterm(
    serve: Callable[..., ServiceProcess], plain_bundle: Path, redis_url: str, redis_prefix: str
) -> None:
    ids = item_ids(plain_bundle)
    history, wanted = ids[2:12], ids[20:25]
    with redis.Redis.from_url(redis_url) as r:
        r.rpush(keys(redis_prefix, "u1")[0], *history)
    svc = serve(plain_bundle, redis_url, redis_prefix=redis_prefix, workers=2,
                redis_deadline_ms=1000)
    deadline = time.monotonic() + 60
    while svc.log().count("Application startup complete") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert svc.log().count("Application startup complete") == 2, svc.log()
    assert svc.process is not None
    workers = worker_pids(svc.process.pid)
    assert len(workers) == 2, workers
    # The workers divide the cores between them: each runs its share of graph calls at once.
    share = max(1, usable_cores() // 2)
    assert svc.log().count(f"; {share} inference thread(s);") == 2, svc.log()

    expected = reference_scores(plain_bundle, history, [(i, None) for i in wanted])
    body = {"user_id": "u1", "candidates": [{"item_id": i} for i in wanted]}

    def one(_: int) -> list[float]:
        with httpx.Client(base_url=svc.url, timeout=10.0) as client:  # a connection each
            answer = client.post("/score", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["history_length"] == len(history)
        return list(answer.json()["scores"])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(40)))
    for scores in results:
        np.testing.assert_allclose(scores, expected, atol=1e-6)

    # Each scrape on a new connection may reach either worker; every one sees all 40 requests.
    for _ in range(6):
        text = httpx.get(f"{svc.url}/metrics", timeout=10.0).text
        assert metric(text, "ctr_request_duration_seconds_count",
                      method="POST", route="/score", status="200") == 40
        assert metric(text, "ctr_model_info", name="din-plain", version="1") == 1
        assert metric(text, "ctr_requests_in_flight") == 0

    # process_cpu_seconds_total would describe one worker; the service's CPU is both workers',
    # each counted up to its latest request or scrape (so at most what /proc says, less a tick).
    counted = metric(httpx.get(f"{svc.url}/metrics", timeout=10.0).text,
                     "ctr_worker_cpu_seconds_total")
    spent = [cpu_seconds(pid) for pid in workers]
    assert max(spent) < counted <= sum(spent) + 0.05, (counted, spent)

    assert svc.stop() == 0
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
