"""`dinserve train` end to end on small slices of real data: files, metrics, determinism, logs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from dinserve.cli import main
from model_export.checkpoint import load_checkpoint

MOVIELENS = Path(__file__).resolve().parents[1] / "data" / "ml-latest-small"
QUICK = ["--max-users", "30", "--epochs", "1", "--max-history-length", "10"]


def train(out: Path, *extra: str, data: Path = MOVIELENS) -> None:
    assert main(["train", "--data", str(data), "--out", str(out), *QUICK, *extra]) == 0


@pytest.fixture(scope="module")
def movielens_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(out)
    return out


def test_checkpoint_loads_without_pickle(movielens_run: Path) -> None:
    payload = torch.load(movielens_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert payload["config"]["use_attention"] is True
    assert payload["baseline"]["config"]["use_attention"] is False
    assert payload["config"]["max_history_length"] == 10
    assert payload["config"]["preset"] == "paper"
    ckpt = load_checkpoint(movielens_run)
    assert ckpt.baseline is not None
    assert ckpt.config.n_items == ckpt.item_table.items.size
    assert ckpt.config.n_categories == ckpt.categories.size
    lines = (movielens_run / "items.tsv").read_text().count("\n")
    assert lines == len(ckpt.item_table.items.tokens)


def test_metrics_report_both_models_on_the_test_split(movielens_run: Path) -> None:
    report = json.loads((movielens_run / "metrics.json").read_text())
    assert report["split"] == "test"
    assert report["samples"]["test"] > 0 and report["samples"]["train"] > report["samples"]["test"]
    for model in ("din", "baseline"):
        m = report[model]
        for key in ("auc", "gauc"):
            assert 0.0 <= m[key] <= 1.0, (model, key)
        assert math.isfinite(m["logloss"]) and m["logloss"] > 0
        assert m["epochs_run"] == 1 and m["best_epoch"] == 1
        assert m["parameters"] > 0 and m["wall_seconds"] >= 0
    assert report["din"]["parameters"] > report["baseline"]["parameters"]  # the attention unit
    for model in ("din", "baseline"):
        fit = report[model]["calibration"]
        assert math.isfinite(report[model]["logloss_uncalibrated"])
        if fit["applied"]:  # folded only when it keeps the order and lowers validation logloss
            assert fit["scale"] > 0 and fit["valid_logloss_after"] < fit["valid_logloss_before"]
        else:
            assert report[model]["logloss"] == report[model]["logloss_uncalibrated"]


def test_calibration_changes_only_the_head_and_by_its_recorded_fit(
    movielens_run: Path, tmp_path: Path
) -> None:
    train(tmp_path, "--no-baseline", "--no-calibration")
    calibrated = torch.load(movielens_run / "checkpoint.pt", weights_only=True)["state_dict"]
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state_dict"]
    report = json.loads((movielens_run / "metrics.json").read_text())["din"]
    fit = report["calibration"]
    assert fit["applied"]  # this slice's DIN is overconfident on validation
    for name, tensor in raw.items():
        if not name.startswith("mlp.head."):
            assert torch.equal(tensor, calibrated[name]), name
    scale, shift = fit["scale"], fit["shift"]
    assert torch.allclose(calibrated["mlp.head.weight"], raw["mlp.head.weight"] * scale, atol=1e-6)
    assert torch.allclose(calibrated["mlp.head.bias"], raw["mlp.head.bias"] * scale + shift,
                          atol=1e-6)
    unscaled = json.loads((tmp_path / "metrics.json").read_text())["din"]
    assert "calibration" not in unscaled
    assert abs(unscaled["logloss"] - report["logloss_uncalibrated"]) < 1e-5
    assert abs(unscaled["auc"] - report["auc"]) < 1e-4  # the order is kept


def test_training_record(movielens_run: Path) -> None:
    record = json.loads((movielens_run / "training.json").read_text())
    assert record["format"] == "movielens"
    assert record["data"].endswith("ratings.csv")
    assert record["label_rule"] == "rating >= 4"
    assert record["users"] == 30
    assert set(record["splits"]) == {"train", "valid", "test"}
    assert record["args"]["max_users"] == 30 and record["args"]["preset"] == "paper"


def test_a_fixed_seed_reproduces_the_weights(movielens_run: Path, tmp_path: Path) -> None:
    train(tmp_path, "--no-baseline")
    first = torch.load(movielens_run / "checkpoint.pt", weights_only=True)["state_dict"]
    again = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert again["baseline"] is None
    for name, tensor in first.items():
        assert torch.equal(tensor, again["state_dict"][name]), name
    assert "baseline" not in json.loads((tmp_path / "metrics.json").read_text())


def generic_log(path: Path, with_rating: bool) -> Path:
    """The first users of MovieLens as a generic log with a user and a context column."""
    genres: dict[str, str] = {}
    with (MOVIELENS / "movies.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            genres[row["movieId"]] = row["genres"]
    with (MOVIELENS / "ratings.csv").open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if int(r["userId"]) <= 12]
    header = ["user_id", "item_id", "timestamp", "category", "age_bucket", "hour"]
    if with_rating:
        header.append("rating")
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            user, ts = int(r["userId"]), int(r["timestamp"])
            line = [f"user-{user}", f"m{r['movieId']}", ts, genres[r["movieId"]],
                    f"{user % 5}", str(ts // 3600 % 24)]
            writer.writerow(line + ([r["rating"]] if with_rating else []))
    return path


@pytest.mark.parametrize("with_rating", [True, False], ids=["rating", "implicit"])
def test_generic_csv_with_user_and_context_columns_trains(
    tmp_path: Path, with_rating: bool
) -> None:
    data = generic_log(tmp_path / "log.csv", with_rating)
    out = tmp_path / "run"
    train(out, "--user-columns", "age_bucket", "--context-columns", "hour", data=data)
    ckpt = load_checkpoint(out)
    assert [f.name for f in ckpt.config.user_features] == ["age_bucket"]
    assert [f.name for f in ckpt.config.context_features] == ["hour"]
    assert ckpt.config.user_features[0].vocab_size == 5 + 2  # padding and OOV
    assert set(ckpt.features["age_bucket"].tokens) == {"0", "1", "2", "3", "4"}
    assert (out / "feature_hour.tsv").is_file()
    record = json.loads((out / "training.json").read_text())
    assert record["format"] == "csv"
    assert record["label_rule"].startswith("rating" if with_rating else "implicit")
    report = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= report["din"]["auc"] <= 1.0 and 0.0 <= report["baseline"]["gauc"] <= 1.0


def test_missing_column_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "log.csv"
    bad.write_text("user_id,item_id,time\nu,a,1\n")
    with pytest.raises(SystemExit, match=r"log\.csv: missing column 'timestamp'"):
        main(["train", "--data", str(bad), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_seeds_train_every_model_once_per_seed_and_summarise_the_pairs(tmp_path: Path) -> None:
    train(tmp_path / "two", "--seeds", "2", "--seed", "5")
    report = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert report["seeds"] == [5, 6]
    assert len(report["per_seed"]) == 2
    assert report["din"] == report["per_seed"][0]["din"]  # the checkpoint's model: the first seed
    assert report["per_seed"][0]["din"]["auc"] != report["per_seed"][1]["din"]["auc"]
    paired = report["summary"]["paired"]["din"]["gauc"]
    per_seed = [run["din"]["gauc"] - run["baseline"]["gauc"] for run in report["per_seed"]]
    assert paired["per_seed"] == pytest.approx(per_seed)
    low, high = paired["ci"]
    assert low <= paired["mean"] <= high
    # The first seed's run is the run a single-seed command gives.
    train(tmp_path / "one", "--seed", "5")
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert single["din"]["auc"] == report["din"]["auc"]
    assert "summary" not in single
