"""service/connections.py: uvicorn's connection-cap refusals, counted and their warnings bounded.

The refusal itself is tested end to end in tests/test_hostile.py (a real uvicorn with a cap of 4);
here, the filter's bookkeeping on uvicorn's own logger, with the interval passing on demand.
"""

from __future__ import annotations

import logging

import pytest
from service_helpers import metric

from service.connections import UVICORN_LOGGER, UVICORN_REFUSAL, refusals_counted
from service.metrics import Metrics


def refused(metrics: Metrics) -> float:
    return metric(metrics.exposition().decode(), "ctr_rejected_requests_total",
                  reason="connections")


def test_every_refusal_is_counted_and_one_warning_per_interval_carries_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    uvicorn_log = logging.getLogger(UVICORN_LOGGER)
    with caplog.at_level(logging.WARNING, logger=UVICORN_LOGGER), \
            refusals_counted(metrics) as refusals:
        for _ in range(3):
            uvicorn_log.warning(UVICORN_REFUSAL)
        uvicorn_log.warning("something else uvicorn says")  # passes untouched, uncounted
        refusals.last_warning -= refusals.every_seconds  # the interval has passed
        uvicorn_log.warning(UVICORN_REFUSAL)
    assert refused(metrics) == 4
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith("refused 1 request(s) with 503")
    assert messages[1] == "something else uvicorn says"
    assert messages[2].startswith("refused 3 request(s) with 503")  # the two held back, and this
    assert len(messages) == 3


def test_the_filter_leaves_with_the_app(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    with refusals_counted(metrics):
        pass
    with caplog.at_level(logging.WARNING, logger=UVICORN_LOGGER):
        logging.getLogger(UVICORN_LOGGER).warning(UVICORN_REFUSAL)
    assert refused(metrics) == 0
    assert [record.getMessage() for record in caplog.records] == [UVICORN_REFUSAL]
