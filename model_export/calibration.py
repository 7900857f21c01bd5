"""Platt scaling folded into the model's head: calibrated click probabilities at no serving cost.

Early stopping keeps the epoch with the best validation AUC, which ranks well but can be
overconfident: on ml-latest-small the `paper` preset's DIN had a test logloss above that of a
constant 0.5. A logistic fit of the validation labels on the model's own logits,
p = sigmoid(scale * z + shift) (Platt, 1999), corrects the probabilities without moving their
order: with scale > 0 the map is increasing, so AUC and GAUC are unchanged. The two numbers are
folded into the final Linear(·, 1) (weight × scale, bias × scale + shift), so the exported graph is
the same graph with other weights and the service pays nothing for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from model_export import metrics


@dataclass(frozen=True)
class Calibration:
    """The fit on the validation split and whether it was folded into the head."""

    scale: float
    shift: float
    valid_logloss_before: float
    valid_logloss_after: float
    applied: bool  # False when the fit would invert the order or not lower the logloss

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def uncalibrated(self, logits: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
        """Probabilities the model gave before the fold, from the logits it gives after it."""
        z = np.asarray(logits, dtype=np.float64)
        if self.applied:
            z = (z - self.shift) / self.scale
        return metrics.sigmoid(z)


def fit_platt(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(scale, shift) minimising the logloss of sigmoid(scale * logits + shift), from (1, 0)."""
    z, y = logits.detach().double(), labels.detach().double()
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(params[0] * z + params[1], y)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    scale, shift = params.detach().tolist()
    return float(scale), float(shift)


def calibrate(head: nn.Linear, logits: torch.Tensor, labels: torch.Tensor) -> Calibration:
    """Fit on (logits, labels) and fold the fit into `head` when it helps; returns the record."""
    scale, shift = fit_platt(logits, labels)
    y = labels.detach().double().numpy()
    z = logits.detach().double().numpy()
    before = metrics.logloss(y, metrics.sigmoid(z))
    after = metrics.logloss(y, metrics.sigmoid(scale * z + shift))
    applied = bool(np.isfinite(scale) and np.isfinite(shift) and scale > 0 and after < before)
    if applied:
        fold_into_head(head, scale, shift)
    return Calibration(scale, shift, before, after, applied)


def fold_into_head(head: nn.Linear, scale: float, shift: float) -> None:
    """head(x) becomes scale * head(x) + shift, exactly (a single-output Linear)."""
    if head.out_features != 1 or head.bias is None:
        raise ValueError("calibration folds into a Linear(·, 1) head with a bias")
    with torch.no_grad():
        head.weight.mul_(scale)
        head.bias.mul_(scale).add_(shift)
