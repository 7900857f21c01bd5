"""Requests refused over CTR_MAX_CONNECTIONS: counted in /metrics, their warnings bounded.

uvicorn enforces the cap itself (`limit_concurrency`, service/__main__.py) and answers such a
request with its own 503 before the app sees it. The one trace it leaves is a warning on the
"uvicorn.error" logger per refused request, which under a flood of connections would also flood
the log. RefusalLog is a filter on that logger: it counts each refusal in
ctr_rejected_requests_total{reason="connections"} and lets one warning through per interval,
saying how many were refused since the last one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from service.metrics import Metrics

UVICORN_LOGGER = "uvicorn.error"
# What uvicorn logs for a request refused over limit_concurrency (its protocols/http modules);
# tests/test_hostile.py fails if a uvicorn release words it differently.
UVICORN_REFUSAL = "Exceeded concurrency limit."
WARN_EVERY_SECONDS = 10.0


class RefusalLog(logging.Filter):
    """Counts uvicorn's refusals and keeps one warning per `every_seconds` of them."""

    def __init__(self, metrics: Metrics, every_seconds: float = WARN_EVERY_SECONDS) -> None:
        super().__init__()
        self.metrics = metrics
        self.every_seconds = every_seconds
        self.unreported = 0
        self.last_warning = -float("inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != UVICORN_REFUSAL:
            return True
        self.metrics.rejected.labels("connections").inc()
        self.unreported += 1
        now = time.monotonic()
        if now - self.last_warning < self.every_seconds:
            return False
        record.msg = (
            "refused %d request(s) with 503: more connections open than CTR_MAX_CONNECTIONS "
            "(next warning in %g s at the earliest; ctr_rejected_requests_total counts them all)"
        )
        record.args = (self.unreported, self.every_seconds)
        self.unreported = 0
        self.last_warning = now
        return True


@contextmanager
def refusals_counted(metrics: Metrics) -> Iterator[RefusalLog]:
    """RefusalLog on uvicorn's logger for as long as the app runs."""
    refusals = RefusalLog(metrics)
    logger = logging.getLogger(UVICORN_LOGGER)
    logger.addFilter(refusals)
    try:
        yield refusals
    finally:
        logger.removeFilter(refusals)
