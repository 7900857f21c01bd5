"""The options of `dinserve train`, `export`, `serve`, `history load`, `demo` and `openapi`.

One class per command (dinserve/options.py): each field is a flag with its type, default and help,
and the class's docstring is the command's --help description. The handlers receive these
objects; `python -m service` builds its parser from ServeOptions too. The load tools' options are
in dinserve/bench_commands.py. `dinserve --help` reads this module, in images that ship only
dinserve/ and service/: it imports the standard library alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from dinserve.options import option, option_class

DEFAULT_DATA = Path("data/ml-latest-small")
DEFAULT_MODELS = Path("models")

# Copies, because their modules import numpy and torch: the log formats that read_log() accepts,
# and model_export/din.py's PRESETS (tests/test_cli.py checks that the presets agree).
Format = Literal["auto", "movielens", "csv", "parquet"]
Preset = Literal["paper", "deepctr", "seed"]
# model_export/data.py's PROTOCOLS and SAMPLERS.
Protocol = Literal["auto", "explicit", "implicit"]
Sampler = Literal["uniform", "popularity"]


@option_class
class TrainOptions:
    """Train the reference DIN (and the paper's BaseModel, the same network with sum pooling, for
    comparison) on a MovieLens folder or an interaction-log file. Writes checkpoint.pt (weights +
    config, loadable with weights_only=True), the vocabularies and metrics.json (test AUC, GAUC,
    logloss of both models) into --out. With --seeds K every model is trained K times on the same
    split (seeds --seed, --seed + 1, ...) and metrics.json adds mean ± std and the paired
    DIN − BaseModel difference with its 95 % interval; the checkpoint keeps the first seed's model.
    """

    data: Path = option(
        default=DEFAULT_DATA,
        help="MovieLens folder (ratings.csv + movies.csv) or a CSV/Parquet log with "
             "user_id,item_id,timestamp[,category][,rating|label] (default: %(default)s)")
    format: Format = option(
        default="auto", help="input format; auto detects it from the path (default: %(default)s)")
    out: Path = option(default=Path("runs/din"), help="output directory (default: %(default)s)")
    preset: Preset = option(
        default="paper", help="network sizes, see docs/model.md (default: %(default)s)")
    max_history_length: int = option(
        default=50, help="behaviours kept per sample, newest first (default: %(default)s)")
    epochs: int = option(default=20, help="upper bound (default: %(default)s)")
    patience: int = option(
        default=2,
        help="epochs without validation-AUC gain before stopping (default: %(default)s)")
    batch_size: int = option(default=256, help="(default: %(default)s)")
    lr: float = option(default=1e-3, help="Adam learning rate (default: %(default)s)")
    seed: int = option(
        default=2018,
        help="seed of the first training run and of the negative sampling (default: %(default)s)")
    seeds: int = option(
        default=1,
        help="train every model this many times, seeds --seed, --seed + 1, ..., on the same split "
             "and negatives; report mean ± std and the paired difference (default: %(default)s)")
    protocol: Protocol = option(
        default="auto",
        help="explicit: labels from the label column, else rating >= --label-threshold (the DIN "
             "paper's MovieLens protocol); implicit: every behaviour is a positive against "
             "--negatives sampled items, ratings and labels ignored (the DIN authors' Amazon "
             "protocol); auto: explicit when the log has labels or ratings (default: "
             "%(default)s; docs/model.md)")
    label_threshold: float = option(
        default=4.0,
        help="rating >= threshold is a positive (explicit protocol; default: %(default)s)")
    negatives: int = option(
        default=1,
        help="sampled negatives per positive, implicit protocol (default: %(default)s)")
    negative_sampler: Sampler = option(
        default="uniform",
        help="uniform over the items of the positive's split, or popularity-weighted (harder); "
             "both skip the user's own items (default: %(default)s)")
    behavior_column: str | None = option(
        default=None,
        help="log column holding each event's behaviour type (e.g. pv, cart, fav, buy)")
    history_behaviors: str = option(
        default="",
        help="comma-separated behaviour types that enter histories (default: every type)")
    positive_behaviors: str = option(
        default="",
        help="comma-separated behaviour types that are positives, implicit protocol (default: "
             "every type)")
    min_count: int = option(
        default=1, help="tokens seen fewer times map to out-of-vocabulary (default: %(default)s)")
    user_columns: str = option(
        default="", help="comma-separated extra log columns that are user-profile features")
    context_columns: str = option(
        default="", help="comma-separated extra log columns that are request-context features")
    max_users: int | None = option(
        default=None, help="keep only the first N users (quick runs and tests)")
    no_baseline: bool = option(default=False, help="skip training the BaseModel")
    no_calibration: bool = option(
        default=False,
        help="keep the raw probabilities (default: Platt scaling on the validation split, "
             "folded into the head; AUC unchanged)")

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")
        if self.negatives < 1:
            raise ValueError(f"--negatives must be at least 1, got {self.negatives}")


@option_class
class ExportOptions:
    """Export the serving graph (history once per request, candidates broadcast inside the graph)
    to MODELS_DIR/<name>/<version>/ with manifest.json, vocabularies and golden cases. Runs the
    ONNX-vs-PyTorch parity check first and exits non-zero, writing nothing, when any score
    differs by more than --tolerance.
    """

    checkpoint: Path = option(
        default=Path("runs/din"),
        help="directory written by `dinserve train` (default: %(default)s)")
    out: Path = option(default=DEFAULT_MODELS, help="models directory (default: %(default)s)")
    name: str | None = option(default=None, help="bundle name (default: din-<preset>)")
    version: str | None = option(
        default=None, help="bundle version, a positive integer (default: latest + 1)")
    naive: bool = option(
        default=False,
        help="also write model_naive.onnx, the same weights with history tiled to [N, L], for "
             "benchmarks")
    tolerance: float = option(
        default=1e-5, help="max |ONNX − PyTorch| allowed (default: %(default)s)")


@option_class
class ServeOptions:
    """Serve POST /score over HTTP. Every setting is documented in docs/settings.md."""

    # Each field overrides the service Settings field of the same name (service/__main__.py).
    model_dir: Path | None = option(default=None, help="bundle directory or models root")
    redis_url: str | None = option(default=None, help="redis:// or rediss:// URL")
    host: str | None = option(
        default=None,
        help="address to bind (default: CTR_HOST, else 127.0.0.1; 0.0.0.0 for all)")
    port: int | None = option(default=None, help="port to bind (default: CTR_PORT, else 8000)")
    workers: int | None = option(
        default=None,
        help="service processes sharing the port (default: CTR_WORKERS, else 1); see "
             "docs/settings.md")


@option_class
class HistoryLoadOptions:
    """Write <prefix>:hist:<user_id> (Redis LIST, newest first, capped at the max history length)
    for every user in the log, pipelined. Idempotent: each list is replaced.
    """

    data: Path = option(default=DEFAULT_DATA, help="same formats as `dinserve train`")
    format: Format = option(
        default="auto", help="input format; auto detects it from the path (default: %(default)s)")
    redis_url: str | None = option(default=None, help="default: CTR_REDIS_URL or local Redis")
    prefix: str | None = option(default=None, help="key prefix (default: CTR_REDIS_PREFIX)")
    model_dir: Path | None = option(
        default=None, help="bundle to take the max history length and profile features from")
    max_length: int | None = option(
        default=None,
        help="cap per user (default: the bundle's max history length, else 100)")
    user_columns: str = option(
        default="", help="comma-separated log columns written to the <prefix>:user:<id> hash")

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"--max-length must be at least 1, got {self.max_length}")


@option_class
class DemoOptions:
    """One command from a checkout to a running service: trains a DIN on --data into
    WORKDIR/runs/demo and exports it to WORKDIR/models/demo (both skipped when they exist), uses
    the Redis at REDIS_URL if it answers PING or else starts a redis-server on a free loopback
    port, loads every user's history, starts `dinserve serve`, waits until /readyz answers and
    prints a ready-to-paste curl. Ctrl-C (or SIGTERM) stops everything it started. Other CTR_*
    settings (e.g. CTR_REDIS_PREFIX) pass through to the service and the history loader.
    """

    data: Path = option(
        default=DEFAULT_DATA,
        help="MovieLens folder or interaction log, as for `dinserve train` (default: %(default)s)")
    format: Format = option(default="auto", help="input format (default: %(default)s)")
    workdir: Path = option(
        default=Path("."),
        help="where runs/demo, models/ and .demo/ (logs) live (default: %(default)s)")
    models: Path | None = option(
        default=None, help="models root for the bundle (default: WORKDIR/models)")
    retrain: bool = option(
        default=False, help="train and export again even if a model exists")
    preset: Preset | None = option(
        default=None, help="network sizes for training (default: train's default)")
    protocol: Protocol = option(
        default="implicit",
        help="what a positive is, as for `dinserve train` (default: %(default)s, the reference "
             "protocol: every rating a positive against one sampled movie; docs/model.md)")
    epochs: int = option(
        default=2,
        help="training epochs upper bound; two keep the first run near 90 s on 2 cores, a third "
             "adds about 0.015 validation AUC (default: %(default)s)")
    max_users: int | None = option(
        default=None, help="train on the first N users only: a quick model for tests")
    baseline: bool = option(
        default=False,
        help="also train the BaseModel for comparison (doubles training time)")
    redis_url: str | None = option(
        default=None,
        help="Redis to use when it answers PING (default: $REDIS_URL; when unset or not "
             "answering, the demo starts its own redis-server)")
    host: str | None = option(
        default=None, help="address the service binds (default: $CTR_HOST or 127.0.0.1)")
    port: int | None = option(
        default=None,
        help="port the service binds; the demo exits if it is taken; 0 = any free port "
             "(default: $CTR_PORT or 8000)")
    ready_timeout: float = option(
        default=120.0, help="seconds to wait for /readyz (default: %(default)s)")
    setup_only: bool = option(
        default=False,
        help="build or reuse the model and load the histories into --redis-url, then exit "
             "without serving (docker-compose's model job)")


@option_class
class OpenapiOptions:
    """Build the app (no model, no Redis needed) and write its OpenAPI JSON."""

    out: str = option(
        default="docs/openapi.json", help="output file, - for stdout (default: %(default)s)")
    check: bool = option(
        default=False, help="write nothing; exit 1 when --out differs from the app's schema")
