"""Training learns what it should, on synthetic logs whose answer is known (tests/synthetic.py).

- On interest_log() a click depends on whether the candidate's category is among the user's
  recent behaviours: DIN's attention sees that, the BaseModel's sum pooling blurs it.
- On sparse_log() nothing predicts a click, and most test items are unknown to training: any AUC
  away from 0.5 would be an artefact of how unknown items and negatives are drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from synthetic import behavior_log, interest_log, sparse_log

from dinserve.cli import main

FAST = ["--preset", "deepctr", "--batch-size", "256"]


def train(data: Path, out: Path, *extra: str) -> dict:
    assert main(["train", "--data", str(data), "--out", str(out), *FAST, *extra]) == 0
    return dict(json.loads((out / "metrics.json").read_text()))


@pytest.mark.slow
def test_din_learns_what_only_attention_can_see(tmp_path: Path) -> None:
    data = interest_log(tmp_path / "interest.csv")
    report = train(data, tmp_path / "run", "--max-history-length", "20", "--epochs", "15",
                   "--lr", "0.003")
    din, base = report["din"], report["baseline"]
    assert din["auc"] > 0.95, din
    assert din["auc"] - base["auc"] > 0.10, (din["auc"], base["auc"])
    assert din["gauc"] - base["gauc"] > 0.10, (din["gauc"], base["gauc"])


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
def test_a_sparse_catalogue_without_signal_scores_at_chance(tmp_path: Path, sampler: str) -> None:
    data = sparse_log(tmp_path / "sparse.csv")
    report = train(data, tmp_path / "run", "--protocol", "implicit", "--negative-sampler",
                   sampler, "--max-history-length", "10", "--epochs", "3")
    for model in ("din", "baseline"):
        assert abs(report[model]["auc"] - 0.5) < 0.03, (model, report[model]["auc"])


def test_a_behaviour_log_trains_on_the_chosen_types_and_names_ignored_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = behavior_log(tmp_path / "taobao.csv")
    report = train(data, tmp_path / "run", "--protocol", "implicit", "--behavior-column",
                   "behavior", "--history-behaviors", "cart,fav,buy", "--positive-behaviors",
                   "buy", "--max-history-length", "10", "--epochs", "2", "--no-baseline")
    err = capsys.readouterr().err
    assert "ignored columns: price" in err
    assert "implicit: every buy event positive" in err
    training = json.loads((tmp_path / "run" / "training.json").read_text())
    buys = data.read_text().count(",buy,")
    samples = sum(s["samples"] for s in training["splits"].values())
    assert samples == 2 * buys  # one positive per buy, one negative each
    assert 0.0 <= report["din"]["auc"] <= 1.0


def test_an_unused_behavior_column_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = behavior_log(tmp_path / "taobao.csv", users=40)
    train(data, tmp_path / "run", "--max-history-length", "5", "--epochs", "1", "--no-baseline")
    assert "ignored columns: behavior, price" in capsys.readouterr().err
