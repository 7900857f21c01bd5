"""model_export/calibration.py: the Platt fit, when it is folded, and that the fold is exact."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from model_export import metrics
from model_export.calibration import calibrate, fit_platt, fold_into_head


def overconfident(n: int = 20_000, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from sigmoid(t), logits 3t + 1: the right order, three times too sure."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(0.0, 1.5, n)
    labels = (rng.random(n) < metrics.sigmoid(truth)).astype(np.float32)
    return torch.tensor(3.0 * truth + 1.0, dtype=torch.float32), torch.tensor(labels)


def test_the_fit_undoes_a_known_distortion() -> None:
    logits, labels = overconfident()
    scale, shift = fit_platt(logits, labels)
    assert abs(scale - 1 / 3) < 0.02 and abs(shift - (-1 / 3)) < 0.05


def test_a_fold_lowers_the_logloss_and_keeps_the_order() -> None:
    logits, labels = overconfident()
    head = nn.Linear(1, 1)
    with torch.no_grad():
        head.weight.fill_(1.0)
        head.bias.fill_(0.0)
    record = calibrate(head, logits, labels)
    assert record.applied and record.valid_logloss_after < record.valid_logloss_before - 0.05
    with torch.no_grad():
        calibrated = torch.sigmoid(head(logits.unsqueeze(-1)).squeeze(-1)).double().numpy()
    y = labels.numpy()
    assert abs(metrics.logloss(y, calibrated) - record.valid_logloss_after) < 1e-6
    # The order is kept: the same AUC as the raw logits (float32 sigmoid ties its tail at 1.0).
    assert abs(metrics.auc(y, calibrated) - metrics.auc(y, logits.double().numpy())) < 1e-6
    raw = torch.sigmoid(logits.double()).numpy()
    assert np.allclose(record.uncalibrated(np.log(calibrated / (1 - calibrated))), raw, atol=1e-5)


def test_a_fit_that_would_invert_the_order_is_not_folded() -> None:
    logits, labels = overconfident()
    head = nn.Linear(4, 1)
    before = [p.detach().clone() for p in head.parameters()]
    record = calibrate(head, -logits, labels)  # a model that ranks backwards
    assert record.scale < 0 and not record.applied
    assert all(torch.equal(a, b) for a, b in zip(before, head.parameters(), strict=True))


def test_the_fold_is_the_affine_map_of_the_head_output() -> None:
    torch.manual_seed(0)
    head, x = nn.Linear(16, 1), torch.randn(64, 16)
    with torch.no_grad():
        expected = 0.7 * head(x) - 0.25
        fold_into_head(head, 0.7, -0.25)
        assert torch.allclose(head(x), expected, atol=1e-6)
