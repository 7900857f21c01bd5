"""`dinserve compare`: endpoints side by side, one request at a time, the same bodies to each.

The small-request measurement compares POST /score with a no-op endpoint that parses the same
payload (/bench/noop, CTR_BENCH_ENDPOINTS=true), measured in the same run. Open-loop load would
measure queueing as much as the endpoints, so this is a closed loop: each round sends one body to
every URL, one request at a time, in an order that rotates from round to round (no URL always
goes first after the client's own work between rounds), and records each latency. The first
--warmup-rounds are not recorded. Ratios are of medians, against the last URL (the reference).

The payloads are loadtest's (bench/loadtest.py prepare_payloads: users, items, seeded histories).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np

from bench.loadreport import write_json
from bench.loadtest import prepare_payloads
from dinserve.bench_commands import CompareOptions


@dataclass
class EndpointResult:
    """One URL's recorded requests: latencies of its 2xx answers, the rest counted by status."""

    url: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def summary(self, reference_p50: float | None) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms)
        p50 = float(np.percentile(lat, 50)) if lat.size else None
        row: dict[str, Any] = {"url": self.url, "ok": int(lat.size), "errors": self.errors}
        for name, q in (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99)):
            row[name] = round(float(np.percentile(lat, q)), 4) if lat.size else None
        row["mean_ms"] = round(float(lat.mean()), 4) if lat.size else None
        row["p50_ratio"] = (round(p50 / reference_p50, 4)
                            if p50 is not None and reference_p50 else None)
        return row


def compare(urls: list[str], bodies: list[bytes], rounds: int, warmup_rounds: int,
            headers: dict[str, str], timeout: float) -> list[EndpointResult]:
    """rounds + warmup_rounds rounds; round i sends bodies[i % len] to every URL, rotated by i."""
    results = [EndpointResult(url) for url in urls]
    clients = [httpx.Client(headers={"content-type": "application/json", **headers},
                            timeout=timeout) for _ in urls]
    try:
        for i in range(warmup_rounds + rounds):
            body = bodies[i % len(bodies)]
            for k in range(len(urls)):
                j = (i + k) % len(urls)
                start = time.perf_counter()
                try:
                    status = clients[j].post(urls[j], content=body).status_code
                except httpx.TimeoutException:
                    status = None
                except httpx.TransportError:
                    status = 0
                elapsed_ms = (time.perf_counter() - start) * 1e3
                if i < warmup_rounds:
                    continue
                if status is not None and 200 <= status < 300:
                    results[j].latencies_ms.append(elapsed_ms)
                else:
                    reason = "timeout" if status is None else "connection" if status == 0 \
                        else str(status)
                    results[j].errors[reason] = results[j].errors.get(reason, 0) + 1
    finally:
        for client in clients:
            client.close()
    return results


@dataclass(frozen=True)
class CompareReport:
    urls: list[str]
    reference: str
    rounds: int
    warmup_rounds: int
    payload: dict[str, Any]
    results: list[dict[str, Any]]


def run(options: CompareOptions) -> int:
    """The `dinserve compare` handler: 0 when every URL answered 2xx at least once, else 1."""
    bodies, payload = prepare_payloads(options.payload, options.seed)
    results = compare(list(options.urls), bodies, options.rounds, options.warmup_rounds,
                      dict(options.headers), options.timeout)
    reference = results[-1]
    ref_p50 = (float(np.percentile(reference.latencies_ms, 50))
               if reference.latencies_ms else None)
    rows = [r.summary(ref_p50) for r in results]
    report = CompareReport(urls=list(options.urls), reference=reference.url,
                           rounds=options.rounds, warmup_rounds=options.warmup_rounds,
                           payload=payload, results=rows)
    print(f"compare: {options.rounds} rounds of {payload['candidates']} candidates, one request at "
          f"a time; ratios of p50 against {reference.url}")
    for row in rows:
        if row["ok"]:
            ratio = f" ({row['p50_ratio']:.2f}x)" if row["p50_ratio"] is not None else ""
            print(f"  {row['url']}: p50 {row['p50_ms']:.3f} ms, p90 {row['p90_ms']:.3f}, "
                  f"p99 {row['p99_ms']:.3f}, mean {row['mean_ms']:.3f}{ratio}"
                  f"{_errors(row['errors'])}")
        else:
            print(f"  {row['url']}: no 2xx answer{_errors(row['errors'])}")
    if options.out:
        write_json(asdict(report), options.out)
        print(f"report: {options.out}")
    return 0 if all(row["ok"] for row in rows) else 1


def _errors(errors: dict[str, int]) -> str:
    return ", errors " + ", ".join(f"{k}={v}" for k, v in sorted(errors.items())) if errors \
        else ""
