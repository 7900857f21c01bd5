"""model_export/evaluation.py: the multi-seed summary and the paired interval."""

from __future__ import annotations

import math

import pytest

from model_export.evaluation import describe, paired_difference, summarise


def test_describe_gives_mean_and_sample_std() -> None:
    assert describe([1.0, 2.0, 3.0, 4.0]) == {
        "mean": 2.5, "std": pytest.approx(math.sqrt(5 / 3)), "n": 4,
    }
    assert describe([0.7]) == {"mean": 0.7, "std": 0.0, "n": 1}
    with pytest.raises(ValueError):
        describe([])


def test_the_paired_interval_is_students_t_on_the_per_seed_differences() -> None:
    model = [0.70, 0.72, 0.71, 0.73, 0.70]
    baseline = [0.69, 0.70, 0.70, 0.71, 0.69]
    result = paired_difference(model, baseline)
    differences = [0.01, 0.02, 0.01, 0.02, 0.01]
    assert result["per_seed"] == pytest.approx(differences)
    assert result["mean"] == pytest.approx(0.014)
    # t(0.975, 4) = 2.7764 (any t table); std of the differences = sqrt(0.0003 / 10)
    half = 2.7764 * math.sqrt(0.00003) / math.sqrt(5)
    assert result["ci"] == pytest.approx([0.014 - half, 0.014 + half], abs=1e-5)
    assert result["ci"][0] > 0  # this model beats its baseline on every seed


def test_an_interval_needs_two_seeds_and_the_runs_must_pair() -> None:
    assert paired_difference([0.7], [0.6])["ci"] is None
    with pytest.raises(ValueError, match="count"):
        paired_difference([0.7, 0.8], [0.6])


def test_noise_around_zero_gives_an_interval_that_holds_zero() -> None:
    result = paired_difference([0.70, 0.69, 0.71, 0.70], [0.69, 0.70, 0.70, 0.71])
    lo, hi = result["ci"]
    assert lo < 0 < hi


def test_summarise_tables_every_model_and_pairs_each_with_the_baseline() -> None:
    runs = [
        {"din": {"auc": 0.70 + i / 100, "gauc": 0.60 + i / 100, "logloss": 0.5},
         "baseline": {"auc": 0.69, "gauc": 0.60, "logloss": 0.5}}
        for i in range(3)
    ]
    summary = summarise(runs)
    assert set(summary["models"]) == {"din", "baseline"}
    assert summary["models"]["din"]["auc"]["mean"] == pytest.approx(0.71)
    assert set(summary["paired"]) == {"din"}
    assert summary["paired"]["din"]["gauc"]["mean"] == pytest.approx(0.01)
    assert summarise([{"din": runs[0]["din"]}])["paired"] == {}
