"""Multi-seed evaluation: per-seed test metrics in, mean ± std and paired differences out.

One training run's AUC says little on a data set the size of ml-latest-small: the seed alone moves
DIN − BaseModel GAUC by more than the gap itself. `dinserve train --seeds K` trains every model K
times on the same split, one seed each, and this module summarises the runs: for each model and
metric the mean and sample standard deviation, and for each model against the baseline the paired
difference (the same seed's two runs share their initial RNG state and batch order), with a 95 %
confidence interval from Student's t with K − 1 degrees of freedom. An interval that excludes 0 is
the claim "this model beats the baseline on this protocol", not a single lucky seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from scipy import stats

METRICS = ("auc", "gauc", "logloss")
CONFIDENCE = 0.95


def describe(values: Sequence[float]) -> dict[str, float | int]:
    """mean, sample std (0 for a single value) and count."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to describe")
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def paired_difference(
    model: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """model − baseline per seed: mean, std and the t interval (None below two seeds)."""
    if len(model) != len(baseline):
        raise ValueError(f"paired runs differ in count: {len(model)} and {len(baseline)}")
    differences = [m - b for m, b in zip(model, baseline, strict=True)]
    summary: dict[str, Any] = {**describe(differences), "per_seed": differences}
    n = len(differences)
    if n < 2:
        summary["ci"] = None
        return summary
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * summary["std"] / math.sqrt(n)
    summary["ci"] = [summary["mean"] - half, summary["mean"] + half]
    summary["confidence"] = confidence
    return summary


def summarise(
    runs: Sequence[Mapping[str, Mapping[str, float]]], baseline: str = "baseline"
) -> dict[str, Any]:
    """runs[i][model][metric] -> {"models": {model: {metric: describe}}, "paired": {...}}.

    "paired" holds, for every model other than `baseline` (when the runs have one), each metric's
    paired_difference against it.
    """
    if not runs:
        raise ValueError("no runs to summarise")
    models = list(runs[0])
    table = {
        model: {metric: describe([run[model][metric] for run in runs]) for metric in METRICS}
        for model in models
    }
    paired = {
        model: {
            metric: paired_difference(
                [run[model][metric] for run in runs], [run[baseline][metric] for run in runs]
            )
            for metric in METRICS
        }
        for model in models
        if model != baseline and baseline in models
    }
    return {"models": table, "paired": paired}
