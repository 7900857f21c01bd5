"""The target's own account of a load phase: its /metrics scraped before and after, differenced.

The load tester sees latency from the outside; a dinserve target also says where its time went.
Around each recorded phase `dinserve loadtest` reads the target's Prometheus exposition and
reports, for the requests of that phase: how many the server counted (by status), their mean
server-side time, the mean of each /score stage (history, features, inference), the graph call's
thread CPU, and the server process's CPU per request: what the machine paid per request besides
the client. The differences of two scrapes are exact for counters and histogram sums; they cover
every request the server finished between the scrapes, which after the phase's drain are the
phase's own (the scrape waits for the phase to end).

A target without a Prometheus /metrics (another server, the no-op one) gives None and the run
goes on without the section. With CTR_WORKERS > 1 the service sums its workers' samples and
leaves out process_*; its CPU is then ctr_worker_cpu_seconds_total, every worker's summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
REQUESTS = "ctr_request_duration_seconds"
STAGES = "ctr_stage_duration_seconds"
INFERENCE_CPU = "ctr_inference_cpu_seconds"
ERRORS = "ctr_errors_total"
PROCESS_CPU = "process_cpu_seconds_total"
WORKERS_CPU = "ctr_worker_cpu_seconds_total"  # with CTR_WORKERS > 1, instead of PROCESS_CPU


def metrics_url(target_url: str) -> str:
    """The /metrics of the server behind a scoring URL: same scheme, host and port."""
    parts = urlsplit(target_url)
    return urlunsplit((parts.scheme, parts.netloc, "/metrics", "", ""))


@dataclass(frozen=True)
class Scrape:
    """One read of the exposition: every sample by (name, sorted labels)."""

    samples: dict[tuple[str, Labels], float]
    families: frozenset[str] = frozenset()

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(value for (sample, found), value in self.samples.items()
                   if sample == name and wanted <= set(found))

    def by_label(self, name: str, label: str, **labels: str) -> dict[str, float]:
        wanted = set(labels.items())
        out: dict[str, float] = {}
        for (sample, found), value in self.samples.items():
            if sample == name and wanted <= set(found):
                key = dict(found).get(label)
                if key is not None:
                    out[key] = out.get(key, 0.0) + value
        return out

    def has(self, name: str) -> bool:
        return any(sample == name for sample, _ in self.samples)


def scrape(url: str, timeout: float = 2.0) -> Scrape | None:
    """The target's samples, or None when it has no dinserve exposition at `url`."""
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse_exposition(response.text)


def parse_exposition(text: str) -> Scrape | None:
    """Prometheus text as a Scrape; None unless it is one and holds dinserve's request timing."""
    samples: dict[tuple[str, Labels], float] = {}
    families: set[str] = set()
    try:
        for family in text_string_to_metric_families(text):
            families.add(family.name)
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    except ValueError:  # not the Prometheus text format
        return None
    # By family, not by sample: a service that has served nothing yet has the family but no
    # labelled sample in it.
    return Scrape(samples, frozenset(families)) if REQUESTS in families else None


def phase_summary(before: Scrape, after: Scrape, route: str) -> dict[str, Any] | None:
    """What the server counted for `route` between two scrapes; None when it counted nothing."""

    def delta(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    def mean_ms(name: str, **labels: str) -> float | None:
        count = delta(f"{name}_count", **labels)
        return round(delta(f"{name}_sum", **labels) / count * 1000, 4) if count > 0 else None

    def grown_by(name: str, label: str, **labels: str) -> dict[str, int]:
        """Per value of `label`, how much the counter grew; values that did not grow left out."""
        earlier = before.by_label(name, label, **labels)
        grown = {key: int(n - earlier.get(key, 0.0))
                 for key, n in sorted(after.by_label(name, label, **labels).items())}
        return {key: n for key, n in grown.items() if n > 0}

    by_status = grown_by(f"{REQUESTS}_count", "status", route=route)
    requests = sum(by_status.values())
    if requests == 0:
        return None
    cpu = next((delta(name) for name in (PROCESS_CPU, WORKERS_CPU)
                if after.has(name) and before.has(name)), None)
    return {
        "requests": requests,
        "by_status": by_status,
        "mean_ms": mean_ms(REQUESTS, route=route, status="200"),
        "stages_mean_ms": {stage: mean_ms(STAGES, stage=stage)
                           for stage in ("history", "features", "inference")},
        "inference_cpu_mean_ms": mean_ms(INFERENCE_CPU),
        # All of the server's threads (event loop, graph threads, Redis client; every worker's),
        # over every request it served meanwhile: /metrics scrapes are two among thousands.
        "process_cpu_ms_per_request": round(cpu / requests * 1000, 4) if cpu is not None else None,
        "errors": grown_by(ERRORS, "code"),
    }


def format_summary(server: dict[str, Any]) -> str:
    """One console line, e.g. `server: 1000 requests, 4.14 ms mean (history 0.17, features 0.16,
    inference 3.46), graph CPU 3.32 ms, process CPU 4.11 ms per request`."""
    stages = ", ".join(f"{name} {value:.2f}" for name, value in server["stages_mean_ms"].items()
                       if value is not None)
    parts = [f"server: {server['requests']} requests"]
    if server["mean_ms"] is not None:
        parts.append(f"{server['mean_ms']:.2f} ms mean" + (f" ({stages})" if stages else ""))
    if server["inference_cpu_mean_ms"] is not None:
        parts.append(f"graph CPU {server['inference_cpu_mean_ms']:.2f} ms")
    if server["process_cpu_ms_per_request"] is not None:
        parts.append(f"process CPU {server['process_cpu_ms_per_request']:.2f} ms per request")
    return ", ".join(parts)
