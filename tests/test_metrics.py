"""AUC, GAUC and logloss on hand-computed examples, and AUC against its pairwise definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model_export.metrics import auc, average_ranks, gauc, logloss, sigmoid


def pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The definition: P(score of a positive > score of a negative), ties count one half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def test_auc_perfect_and_reversed() -> None:
    labels = [1, 0, 1, 0]
    assert auc(labels, [0.9, 0.1, 0.8, 0.3]) == 1.0
    assert auc(labels, [0.1, 0.9, 0.2, 0.8]) == 0.0


def test_auc_counts_a_tie_as_one_half() -> None:
    # Pairs (pos, neg): (0.8, 0.4) 1, (0.8, 0.2) 1, (0.4, 0.4) 1/2, (0.4, 0.2) 1 -> 3.5 / 4.
    assert auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.2]) == pytest.approx(0.875)
    assert auc([1, 0], [0.5, 0.5]) == 0.5
    # All scores tied: no ranking information at all.
    assert auc([1, 0, 1, 0, 0], [0.3] * 5) == 0.5


def test_auc_does_not_depend_on_the_order_of_tied_samples() -> None:
    scores = np.array([0.2, 0.5, 0.5, 0.5, 0.9])
    assert auc([0, 1, 0, 0, 1], scores) == auc([0, 0, 0, 1, 1], scores)


def test_auc_single_class_is_nan() -> None:
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))


def test_auc_matches_the_pairwise_definition_with_many_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=400)
    scores = np.round(rng.random(400), 1)  # 11 distinct values: ties everywhere
    assert auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


def test_average_ranks() -> None:
    np.testing.assert_allclose(average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1, 3.5, 2])


def test_gauc_weights_users_by_impressions_and_skips_single_class_users() -> None:
    # user a: pairs (0.9 > 0.5) 1 and (0.9 < 0.95) 0 -> AUC 0.5, 3 impressions
    # user b: (0.3 < 0.7) -> AUC 0, 2 impressions
    # user c: only positives -> no AUC, left out of both sums
    labels = [1, 0, 0, 1, 0, 1, 1]
    scores = [0.9, 0.5, 0.95, 0.3, 0.7, 0.1, 0.2]
    users = ["a", "a", "a", "b", "b", "c", "c"]
    assert gauc(labels, scores, users) == pytest.approx((3 * 0.5 + 2 * 0.0) / 5)
    # Interleaved rows give the same groups.
    order = [6, 0, 3, 1, 5, 4, 2]
    pick = lambda xs: [xs[i] for i in order]  # noqa: E731
    assert gauc(pick(labels), pick(scores), pick(users)) == pytest.approx(0.3)


def test_gauc_differs_from_auc_when_users_have_different_base_rates() -> None:
    # Within each user the ranking is perfect, across users it is not.
    labels = [1, 0, 1, 0]
    scores = [0.3, 0.2, 0.9, 0.8]
    users = [1, 1, 2, 2]
    assert gauc(labels, scores, users) == 1.0
    assert auc(labels, scores) == 0.75


def test_gauc_without_any_two_class_user_is_nan() -> None:
    assert math.isnan(gauc([1, 0], [0.5, 0.4], ["a", "b"]))


def test_logloss() -> None:
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(expected)


def test_logloss_clips_certain_mistakes_to_a_finite_value() -> None:
    value = logloss([0, 1], [1.0, 0.0])
    assert math.isfinite(value)
    assert value == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        auc([1, 0], [0.5])
    with pytest.raises(ValueError, match="shape"):
        gauc([1, 0], [0.5, 0.2], [1])


def test_sigmoid_is_exact_in_the_middle_and_finite_at_the_extremes() -> None:
    z = np.array([-1000.0, -5.0, 0.0, 2.0, 1000.0])
    with np.errstate(over="raise"):
        p = sigmoid(z)
    np.testing.assert_allclose(p[1:4], 1.0 / (1.0 + np.exp(-z[1:4])), rtol=1e-15)
    assert p[0] == 0.0 and p[-1] == 1.0
