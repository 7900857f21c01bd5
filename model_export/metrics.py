"""Offline ranking metrics: AUC, GAUC (DIN paper Eq. 10) and logloss, in numpy only.

AUC is computed from ranks with tied scores sharing their average rank, so a tie between a
positive and a negative counts one half (the Mann-Whitney U statistic), and the result does not
depend on the order of tied samples.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

LOGLOSS_EPSILON = 1e-7


def average_ranks(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks; tied values get the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve; NaN when labels hold a single class."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1) > 0.5
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = float(average_ranks(s)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def gauc(labels: ArrayLike, scores: ArrayLike, users: ArrayLike) -> float:
    """Group AUC (DIN paper Eq. 10): per-user AUC weighted by the user's impression count.

    Users whose labels are all one class have no AUC and are left out of both sums. NaN when no
    user has both classes.
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    u = np.asarray(users).reshape(-1)
    if not (y.shape == s.shape == u.shape):
        raise ValueError(f"labels {y.shape}, scores {s.shape}, users {u.shape} differ in shape")
    order = np.argsort(u, kind="mergesort")
    sorted_users = u[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    ends = np.r_[starts[1:], len(u)]
    weighted = weights = 0.0
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        rows = order[start:end]
        value = auc(y[rows], s[rows])
        if np.isnan(value):
            continue
        weighted += (end - start) * value
        weights += end - start
    return weighted / weights if weights else float("nan")


def logloss(labels: ArrayLike, probabilities: ArrayLike, epsilon: float = LOGLOSS_EPSILON) -> float:
    """Mean binary cross-entropy; probabilities clipped to [ε, 1 − ε] so it stays finite."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probabilities, dtype=np.float64).reshape(-1), epsilon, 1.0 - epsilon)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and probabilities {p.shape} differ in shape")
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


def sigmoid(logits: ArrayLike) -> NDArray[np.float64]:
    """Click probabilities of logits, in float64; exp(-log(1 + e^-z)) never overflows."""
    z = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))
