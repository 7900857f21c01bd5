"""Every Prometheus metric of the service, defined once, on a registry owned by one app.

A registry per app (not prometheus_client's global one) lets tests run several apps in one process
without "Duplicated timeseries" errors, and makes /metrics show exactly this app's numbers.
Names follow Prometheus conventions: ctr_ prefix, base units, _seconds histograms, _total
counters, low-cardinality labels only (route templates, stages, reasons; never a user or item id).
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Set by `dinserve serve` with more than one worker (service/__main__.py) before the workers start:
# prometheus-client then keeps every value in per-process files under it, and /metrics sums
# them, so a scrape that reaches any worker sees the whole service.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Sub-millisecond resolution at the bottom: the budget per request is ~10 ms (DIN paper, KDD'18).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
STAGES = ("history", "features", "inference")
# Mean click probability of one request's candidates: fine steps where real CTRs live (0.1-10 %)
# and through the middle, where a model trained on ratings (MovieLens) puts them.
SCORE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
                 0.9, 0.95, 0.99)
ITEM_INPUTS = ("candidate", "history")
REJECT_REASONS = ("queue_full", "queue_timeout", "deadline", "body_timeout", "connections")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The metric objects; create one per app and pass it where something is counted."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_DIR_ENV))
        self.worker_cpu_seconds: Counter | None = None
        if not self.multiprocess:  # process_* series describe one process; with workers, none
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)  # python_gc_collections_total{generation}: service/heap.py
        else:
            # What process_cpu_seconds_total says of one process, for the service: each worker
            # adds its own CPU as of its latest request or scrape (count_worker_cpu), and the
            # multiprocess files keep the shares of workers that exited, so it never goes down.
            self.worker_cpu_seconds = Counter(
                "ctr_worker_cpu_seconds",
                "User and system CPU time of the service's worker processes, summed, as of "
                "each worker's latest request",
                registry=r,
            )
        self._cpu_counted = 0.0
        self.request_seconds = Histogram(
            "ctr_request_duration_seconds",
            "HTTP request latency by route template and status",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "ctr_stage_duration_seconds",
            "Time spent in one stage of POST /score",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_cpu_seconds = Histogram(
            "ctr_inference_cpu_seconds",
            "CPU time of one graph call on the thread that ran it; the inference stage's wall "
            "time beyond it was spent waiting for an inference thread or for a core",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.candidates = Histogram(
            "ctr_candidates_per_request",
            "Candidates scored per request",
            buckets=(1, 10, 50, 100, 200, 500, 1000, 2000),
            registry=r,
        )
        self.history_length = Histogram(
            "ctr_history_length",
            "History entries fed to the model per request",
            buckets=(0, 1, 5, 10, 20, 50, 100, 200, 500),
            registry=r,
        )
        # What the model saw and said, for drift: ids it does not know (the catalogue moved on
        # since training) and the level of its scores (a broken feature or history source).
        self.unknown_items = Counter(
            "ctr_unknown_items_total",
            "Item ids not in the model's vocabulary, scored as out-of-vocabulary; divide by "
            "ctr_candidates_per_request_sum or ctr_history_length_sum for the share",
            ["input"],
            registry=r,
        )
        self.mean_score = Histogram(
            "ctr_request_mean_score",
            "Mean click probability of one request's candidates",
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.degraded = Counter(
            "ctr_degraded_requests_total",
            "Requests scored with an empty history because Redis was unavailable",
            ["reason"],
            registry=r,
        )
        self.redis_errors = Counter(
            "ctr_redis_errors_total",
            "History reads that failed: deadline missed or Redis error",
            ["reason"],
            registry=r,
        )
        self.history_skipped = Counter(
            "ctr_history_values_skipped_total",
            "Redis history/profile values dropped: wrong key type or not a usable id",
            ["reason"],
            registry=r,
        )
        self.errors = Counter(
            "ctr_errors_total",
            "Error answers by error code",
            ["code"],
            registry=r,
        )
        self.reloads = Counter(
            "ctr_model_reloads_total",
            "Model load attempts after start, by result",
            ["result"],
            registry=r,
        )
        self.model_info = Gauge(
            "ctr_model_info",
            "The model being served (value 1)",
            ["name", "version"],
            registry=r,
            multiprocess_mode="livemax",  # 1 while any live worker serves that version
        )
        self._model_labels: tuple[str, str] | None = None
        # Admission control (service/overload.py): what was refused or dropped, and how full the
        # gate is. A queue that stays at its cap in ctr_requests_queued means "add replicas".
        self.rejected = Counter(
            "ctr_rejected_requests_total",
            "Requests refused or dropped by admission control, by reason",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "ctr_requests_in_flight", "Gated requests being processed now", registry=r,
            multiprocess_mode="livesum",
        )
        self.queued = Gauge(
            "ctr_requests_queued", "Gated requests waiting for a processing slot", registry=r,
            multiprocess_mode="livesum",
        )
        self.lifo_handovers = Counter(
            "ctr_queue_lifo_handovers_total",
            "Processing slots given to the newest waiter: the queue was standing with requests "
            "that carry deadlines (CTR_QUEUE_LIFO_AFTER_MS)",
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "ctr_queue_wait_seconds",
            "Time an admitted request waited for its processing slot",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage)  # expose zeroed series from the start
        for item_input in ITEM_INPUTS:
            self.unknown_items.labels(item_input)
        for result in ("loaded", "rejected"):
            self.reloads.labels(result)

    def set_model(self, name: str, version: str) -> None:
        """Point ctr_model_info at the model now serving (one series at 1)."""
        if self.multiprocess:
            # Another worker may still report the old version; clear() would not reach the
            # per-process file, so this worker's old series is set to 0 instead.
            if self._model_labels is not None and self._model_labels != (name, version):
                self.model_info.labels(*self._model_labels).set(0)
        else:
            self.model_info.clear()
        self.model_info.labels(name, version).set(1)
        self._model_labels = (name, version)

    def count_worker_cpu(self) -> None:
        """With workers: add this process's CPU since the last call to ctr_worker_cpu_seconds.

        Called on the event loop after every request and before every scrape; ~1 µs.
        """
        if self.worker_cpu_seconds is None:
            return
        now = time.process_time()  # every thread of the process: event loop and graph calls
        self.worker_cpu_seconds.inc(now - self._cpu_counted)
        self._cpu_counted = now

    def exposition(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        self.count_worker_cpu()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def close(self) -> None:
        """At worker exit: its live gauges (in flight, queued, model) stop counting."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())
