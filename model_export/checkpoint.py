"""A training run's output directory: weights + frozen config, vocabularies, metrics.

    <run>/checkpoint.pt      {"format_version", "config", "state_dict", "baseline": {...} | None}
    <run>/items.tsv, categories.tsv, feature_<name>.tsv     (docs/bundle.md formats)
    <run>/metrics.json       test AUC / GAUC / logloss for DIN and the BaseModel
    <run>/training.json      data source, label rule, sample counts, arguments

checkpoint.pt holds only tensors and plain containers, so torch.load(weights_only=True) reads it:
no arbitrary pickle is ever executed when a checkpoint is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_export.din import DIN, DINConfig
from service.bundle import CATEGORIES_FILE, ITEMS_FILE
from service.vocab import ItemTable, Vocabulary

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
TRAINING_FILE = "training.json"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A trained DIN with everything needed to export and serve it."""

    model: DIN
    item_table: ItemTable
    categories: Vocabulary
    features: dict[str, Vocabulary]  # user and context features by name
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    baseline: DIN | None = None

    @property
    def config(self) -> DINConfig:
        return self.model.config


def feature_file(name: str) -> str:
    return f"feature_{name}.tsv"


def save_checkpoint(ckpt: Checkpoint, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "config": ckpt.model.config.to_dict(),
        "state_dict": ckpt.model.state_dict(),
        "baseline": None,
    }
    if ckpt.baseline is not None:
        payload["baseline"] = {
            "config": ckpt.baseline.config.to_dict(),
            "state_dict": ckpt.baseline.state_dict(),
        }
    torch.save(payload, run_dir / CHECKPOINT_FILE)
    ckpt.item_table.save(run_dir / ITEMS_FILE)
    ckpt.categories.save(run_dir / CATEGORIES_FILE)
    for name, vocab in ckpt.features.items():
        vocab.save(run_dir / feature_file(name))
    (run_dir / METRICS_FILE).write_text(json.dumps(ckpt.metrics, indent=2) + "\n")
    (run_dir / TRAINING_FILE).write_text(json.dumps(ckpt.training, indent=2) + "\n")


def _restore(entry: dict[str, Any]) -> DIN:
    model = DIN(DINConfig.from_dict(entry["config"]))
    model.load_state_dict(entry["state_dict"])
    return model.eval()


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Load a run directory; raises FileNotFoundError / ValueError with the path in the message."""
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dinserve train --out {run_dir}` first")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {payload.get('format_version')!r}")
    model = _restore(payload)
    config = model.config
    features = {
        f.name: Vocabulary.load(run_dir / feature_file(f.name))
        for f in (*config.user_features, *config.context_features)
    }
    metrics_path, training_path = run_dir / METRICS_FILE, run_dir / TRAINING_FILE
    return Checkpoint(
        model=model,
        item_table=ItemTable.load(run_dir / ITEMS_FILE),
        categories=Vocabulary.load(run_dir / CATEGORIES_FILE),
        features=features,
        metrics=json.loads(metrics_path.read_text()) if metrics_path.is_file() else {},
        training=json.loads(training_path.read_text()) if training_path.is_file() else {},
        baseline=_restore(payload["baseline"]) if payload.get("baseline") else None,
    )
