"""`dinserve train`: build samples, train DIN and the BaseModel, report test AUC / GAUC / logloss.

Reads top to bottom like nanoGPT's train.py: seed everything, read the log, build the splits
(model_export/data.py), then fit() each model the same way (Adam, BCE-with-logits, early stopping
on validation AUC, the best epoch's weights kept, then Platt scaling fitted on validation and
folded into the head: model_export/calibration.py) and score it once on the test split. The test
split is never looked at before that last step: every choice is made on validation.

Output (--out, model_export/checkpoint.py): checkpoint.pt, the vocabularies, metrics.json (both
models' test metrics, sample counts, epochs, wall time) and training.json (data source, format,
label rule, split sizes, arguments).

Cost (ml-latest-small, defaults: paper preset, L = 50, batch 256, Adam 1e-3, patience 2, on the
shared 2-core machine with little else running): data 1.5 s; DIN ~40 s per epoch, BaseModel ~9 s;
both stop after 4 epochs (best epoch 2), 3.5 min in all. Most of DIN's time is the activation
unit over the B x L (candidate, behaviour) pairs of each batch.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

# OpenMP threads that spin while waiting are ruinous on a shared 2-core machine: measured here with
# other jobs running, one DIN epoch on 2 threads took 340-970 s of wall time (160-320 s of CPU)
# with spinning threads, 120-135 s (47 s of CPU) with passive ones, 155-185 s on 1 thread. Only
# effective when torch is not imported yet, which is the case under `dinserve train`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.utils.deterministic  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dinserve.commands import TrainOptions
from model_export import metrics
from model_export.calibration import Calibration, calibrate
from model_export.checkpoint import Checkpoint, save_checkpoint
from model_export.data import Dataset, SampleOptions, Split, build_dataset
from model_export.din import DIN, DINConfig, SparseFeature, parameter_count, preset_config
from model_export.evaluation import summarise
from service.interaction_log import read_log
from service.vocab import PADDING_INDEX

EVAL_BATCH_SIZE = 1024
EMBEDDING_INIT_STD = 1e-4
TORCH_THREADS = 2  # the machine has 2 cores; more threads only contend

Batch = dict[str, torch.Tensor]


@dataclass
class FitResult:
    model: DIN
    best_epoch: int
    epochs_run: int
    valid_auc: float
    wall_seconds: float
    calibration: Calibration | None = None


def run(options: TrainOptions) -> int:
    """`dinserve train`; torch's global settings are restored afterwards (tests share a process)."""
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,  # type: ignore[attr-defined]
    )
    torch.set_num_threads(TORCH_THREADS)
    # Every op DIN uses has a deterministic CPU kernel, so this only guards against one sneaking
    # in. Filling each new tensor with NaN (its debugging companion) cost ~6% of a step: off.
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    try:
        return train(options)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]  # type: ignore[attr-defined]


def train(options: TrainOptions) -> int:
    started = time.perf_counter()
    seed_everything(options.seed)

    # -- data ----------------------------------------------------------------------------------
    sampling = SampleOptions(
        max_history_length=options.max_history_length,
        label_threshold=options.label_threshold,
        negatives=options.negatives,
        min_count=options.min_count,
        seed=options.seed,
        protocol=options.protocol,
        negative_sampler=options.negative_sampler,
        history_behaviors=tuple(_names(options.history_behaviors)) or None,
        positive_behaviors=tuple(_names(options.positive_behaviors)) or None,
    )
    try:
        log = read_log(
            options.data, options.format, user_columns=_names(options.user_columns),
            context_columns=_names(options.context_columns),
            behavior_column=options.behavior_column,
        )
        if options.max_users is not None:
            log = log.head_users(options.max_users)
        data = build_dataset(log, sampling)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        # Bad input data is the user's to fix: one line naming the file, row and column.
        raise SystemExit(f"dinserve train: {exc}") from exc
    data_seconds = time.perf_counter() - started
    sizes = {name: len(split) for name, split in data.splits().items()}
    print(
        f"data: {log.source} ({log.format}), {data.n_events} events, {data.n_users} users, "
        f"samples {sizes}, label {data.label_rule}, built in {data_seconds:.1f}s",
        file=sys.stderr,
    )
    if log.ignored_columns:
        print(
            f"ignored columns: {', '.join(log.ignored_columns)} (use them with --user-columns, "
            "--context-columns or --behavior-column)",
            file=sys.stderr,
        )
    for name, split in data.splits().items():
        if len(split) == 0 or len(np.unique(split.labels)) < 2:
            raise SystemExit(
                f"dinserve train: the {name} split has {len(split)} samples and needs both "
                "classes; use more data (--max-users) or another --label-threshold"
            )

    config = preset_config(
        options.preset,
        n_items=data.item_table.items.size,
        n_categories=data.categories.size,
        max_categories=sampling.max_categories,
        max_history_length=sampling.max_history_length,
        user_features=tuple(SparseFeature(k, v.size) for k, v in data.user_features.items()),
        context_features=tuple(
            SparseFeature(k, v.size) for k, v in data.context_features.items()
        ),
    )
    tensors = {name: to_tensors(split) for name, split in data.splits().items()}

    # -- every model, once per seed: same data, negatives and schedule ----------------------------
    models = {"din": ("DIN", config)}
    if not options.no_baseline:
        base_config = DINConfig.from_dict({**config.to_dict(), "use_attention": False})
        models["baseline"] = ("BaseModel", base_config)
    seeds = [options.seed + i for i in range(options.seeds)]
    runs: list[dict[str, dict[str, Any]]] = []
    results: dict[str, FitResult] = {}  # the first seed's: the models the checkpoint keeps
    for seed in seeds:
        fitted = {
            key: fit(label if len(seeds) == 1 else f"{label} seed {seed}", model_config,
                     tensors, options, seed)
            for key, (label, model_config) in models.items()
        }
        runs.append({key: test_report(result, tensors["test"]) for key, result in fitted.items()})
        results = results or fitted

    report: dict[str, Any] = {"split": "test", "samples": sizes, **runs[0], "seeds": seeds}
    if len(seeds) > 1:
        report["per_seed"] = runs
        report["summary"] = summarise(runs)
    report["wall_seconds"] = round(time.perf_counter() - started, 2)

    baseline = results.get("baseline")
    save_checkpoint(
        Checkpoint(
            model=results["din"].model,
            item_table=data.item_table,
            categories=data.categories,
            features={**data.user_features, **data.context_features},
            metrics=report,
            training=training_record(options, log.source, log.format, data, data_seconds),
            baseline=baseline.model if baseline is not None else None,
        ),
        options.out,
    )
    print_table(report)
    if "summary" in report:
        print_summary(report["summary"], seeds)
    print(f"wrote {options.out} in {report['wall_seconds']:.0f}s")
    return 0


def test_report(result: FitResult, test: Batch) -> dict[str, Any]:
    """One fitted model's test metrics (and how it was fitted), as metrics.json records them."""
    test_logits = logits(result.model, test).double().numpy()
    probabilities = metrics.sigmoid(test_logits)
    labels = test["labels"].numpy()
    report: dict[str, Any] = {
        "auc": metrics.auc(labels, probabilities),
        "gauc": metrics.gauc(labels, probabilities, test["users"].numpy()),
        "logloss": metrics.logloss(labels, probabilities),
        "valid_auc": result.valid_auc,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "wall_seconds": round(result.wall_seconds, 2),
        "parameters": parameter_count(result.model),
    }
    if result.calibration is not None:
        report["logloss_uncalibrated"] = metrics.logloss(
            labels, result.calibration.uncalibrated(test_logits)
        )
        report["calibration"] = result.calibration.to_dict()
    return report


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_tensors(split: Split) -> Batch:
    arrays = split.arrays()
    batch = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    batch["labels"] = torch.from_numpy(split.labels)
    batch["users"] = torch.from_numpy(split.users)
    batch["lengths"] = torch.from_numpy((split.history_items != 0).sum(axis=1))
    return batch


def take(data: Batch, rows: torch.Tensor | slice) -> Batch:
    """Rows of a split, with history trimmed to the longest real one in the batch.

    Trailing padding is inert (tests/test_din.py proves it), so trimming only saves compute.
    """
    batch = {name: t[rows] for name, t in data.items()}
    length = max(int(batch["lengths"].max()), 1) if len(batch["lengths"]) else 1
    batch["history_items"] = batch["history_items"][:, :length]
    batch["history_categories"] = batch["history_categories"][:, :length]
    return batch


def forward(model: DIN, batch: Batch) -> torch.Tensor:
    """(B,) logits."""
    logits: torch.Tensor = model(
        batch["history_items"], batch["history_categories"],
        batch["candidate_items"], batch["candidate_categories"],
        batch["user_features"], batch["context_features"],
    )
    return logits


@torch.no_grad()
def logits(model: DIN, data: Batch) -> torch.Tensor:
    """(n,) logits for every sample of a split, in order."""
    model.eval()
    n = len(data["labels"])
    out = [
        forward(model, take(data, slice(i, i + EVAL_BATCH_SIZE)))
        for i in range(0, n, EVAL_BATCH_SIZE)
    ]
    return torch.cat(out) if out else torch.zeros(0)


def predict(model: DIN, data: Batch) -> np.ndarray:
    """Click probabilities for every sample of a split, in order."""
    return torch.sigmoid(logits(model, data)).numpy()


def fit(
    name: str,
    config: DINConfig,
    tensors: dict[str, Batch],
    options: TrainOptions,
    seed: int,
) -> FitResult:
    """Train one model; returns it holding its best-validation-AUC weights."""
    started = time.perf_counter()
    seed_everything(seed)  # every model of a seed starts from the same RNG state
    model = DIN(config)
    init_embeddings(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    train, valid = tensors["train"], tensors["valid"]
    n = len(train["labels"])
    order_rng = np.random.default_rng(seed)
    best_auc, best_epoch, stale = -1.0, 0, 0
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    epoch = 0
    for epoch in range(1, options.epochs + 1):
        model.train()
        permutation = torch.from_numpy(order_rng.permutation(n))
        # A final batch of one sample has no batch statistics for Dice; drop it this epoch.
        starts = [s for s in range(0, n, options.batch_size)
                  if min(n - s, options.batch_size) > 1]
        bar = tqdm(
            starts, desc=f"{name} epoch {epoch}", unit="batch", leave=False, file=sys.stderr,
            disable=not sys.stderr.isatty(),
        )
        total = 0.0
        for step, start in enumerate(bar, 1):
            batch = take(train, permutation[start:start + options.batch_size])
            loss = loss_fn(forward(model, batch), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{total / step:.4f}")
        valid_auc = metrics.auc(valid["labels"].numpy(), predict(model, valid))
        improved = valid_auc > best_auc
        print(
            f"{name} epoch {epoch}: train loss {total / max(len(starts), 1):.4f}, "
            f"valid AUC {valid_auc:.4f}{' *' if improved else ''}",
            file=sys.stderr,
        )
        if improved:
            best_auc, best_epoch, stale = valid_auc, epoch, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= options.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    calibration = None
    if not options.no_calibration:
        assert model.mlp.head is not None, "DIN's MLP always ends in a head"
        calibration = calibrate(model.mlp.head, logits(model, valid), valid["labels"])
        outcome = "folded into the head" if calibration.applied else "not applied"
        print(
            f"{name} calibration on validation: logloss {calibration.valid_logloss_before:.4f}"
            f" -> {calibration.valid_logloss_after:.4f} (scale {calibration.scale:.3f}, shift "
            f"{calibration.shift:.3f}), {outcome}",
            file=sys.stderr,
        )
    return FitResult(
        model, best_epoch, epoch, best_auc, time.perf_counter() - started, calibration
    )


def init_embeddings(model: DIN, std: float = EMBEDDING_INIT_STD) -> None:
    """Start every embedding table near zero, padding rows exactly zero.

    PyTorch's default N(0, 1) is far too large for CTR tables: Adam at lr 1e-3 barely moves a row
    seen a few times per epoch, so items never learn their own effect. DeepCTR-Torch and FuxiCTR
    both start from N(0, 1e-4). Measured on ml-latest-small (BaseModel, 4 epochs): validation
    AUC 0.655 -> 0.705 and GAUC 0.558 -> 0.643.
    """
    sparse = (*model.user_tables, *model.context_tables)
    tables = [model.embedding.items, model.embedding.categories]
    tables += [t for t in sparse if isinstance(t, nn.Embedding)]
    with torch.no_grad():
        for table in tables:
            nn.init.normal_(table.weight, std=std)
            table.weight[PADDING_INDEX].zero_()


def training_record(
    options: TrainOptions, source: str, fmt: str, data: Dataset, data_seconds: float
) -> dict[str, Any]:
    """training.json: where the data came from and how the samples were made."""
    splits = {
        name: {"samples": len(s), "positives": int(s.labels.sum()),
               "users": int(len(np.unique(s.users)))}
        for name, s in data.splits().items()
    }
    arguments = asdict(options)
    return {
        "data": source,
        "format": fmt,
        "label_rule": data.label_rule,
        "events": data.n_events,
        "users": data.n_users,
        "splits": splits,
        "split_rule": "per user by time: last ~10% test, previous ~10% validation, rest train",
        "history_rule": "behaviours strictly earlier than the target, newest first",
        "max_history_length": data.options.max_history_length,
        "max_categories": data.options.max_categories,
        "vocabulary_sizes": {
            "items": data.item_table.items.size,
            "categories": data.categories.size,
            **{k: v.size for k, v in {**data.user_features, **data.context_features}.items()},
        },
        "data_seconds": round(data_seconds, 2),
        "torch": torch.__version__,
        "args": json.loads(json.dumps(arguments, default=str)),
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"test split: {report['samples']['test']} samples")
    print(f"{'model':<10} {'AUC':>7} {'GAUC':>7} {'logloss':>8} {'(raw)':>8} {'best/epochs':>11} "
          f"{'seconds':>8}")
    for key, label in (("din", "DIN"), ("baseline", "BaseModel")):
        if key in report:
            m = report[key]
            raw = m.get("logloss_uncalibrated")  # absent with --no-calibration
            print(
                f"{label:<10} {m['auc']:7.4f} {m['gauc']:7.4f} {m['logloss']:8.4f} "
                f"{'' if raw is None else f'{raw:.4f}':>8} "
                f"{m['best_epoch']:>5}/{m['epochs_run']:<5} {m['wall_seconds']:8.1f}"
            )


def print_summary(summary: dict[str, Any], seeds: list[int]) -> None:
    """The multi-seed table: mean ± std per model, then each model's paired difference."""
    labels = {"din": "DIN", "baseline": "BaseModel"}
    print(f"over {len(seeds)} seeds ({seeds[0]}..{seeds[-1]}), mean ± std:")
    print(f"{'model':<10} {'AUC':>16} {'GAUC':>16} {'logloss':>16}")
    for key, table in summary["models"].items():
        cells = " ".join(
            f"{table[m]['mean']:.4f} ± {table[m]['std']:.4f}" for m in ("auc", "gauc", "logloss")
        )
        print(f"{labels.get(key, key):<10} {cells}")
    for key, paired in summary["paired"].items():
        for metric in ("gauc", "auc"):
            d = paired[metric]
            low, high = d["ci"]
            print(f"{labels.get(key, key)} − BaseModel {metric.upper()}: {d['mean']:+.4f} "
                  f"(95% CI {low:+.4f} .. {high:+.4f})")


def _names(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]
