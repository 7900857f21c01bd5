"""The `dinserve` command line: one entry point, one subcommand per job.

Only argument parsing lives here. Each subcommand's work is imported when it runs, so
`dinserve serve` and `dinserve --help` never import torch (only train/export/bench need it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

DEFAULT_DATA = "data/ml-latest-small"
DEFAULT_MODELS = "models"


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        help="train a DIN and its BaseModel on an interaction log",
        description=(
            "Train the reference DIN (and the paper's BaseModel, the same network with sum "
            "pooling, for comparison) on a MovieLens folder or an interaction-log file. Writes "
            "checkpoint.pt (weights + config, loadable with weights_only=True), the vocabularies "
            "and metrics.json (test AUC, GAUC, logloss of both models) into --out."
        ),
    )
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="MovieLens folder (ratings.csv + movies.csv) or a CSV/Parquet log with "
                        "user_id,item_id,timestamp[,category][,rating|label] (default: %(default)s)")
    p.add_argument("--format", default="auto", choices=["auto", "movielens", "csv", "parquet"],
                   help="input format; auto detects it from the path (default: %(default)s)")
    p.add_argument("--out", default="runs/din", help="output directory (default: %(default)s)")
    p.add_argument("--preset", default="paper", choices=["paper", "deepctr", "seed"],
                   help="network sizes, see docs/model.md (default: %(default)s)")
    p.add_argument("--max-history-length", type=int, default=50,
                   help="behaviours kept per sample, newest first (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="upper bound (default: %(default)s)")
    p.add_argument("--patience", type=int, default=2,
                   help="epochs without validation-AUC gain before stopping (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=2018, help="(default: %(default)s)")
    p.add_argument("--label-threshold", type=float, default=4.0,
                   help="rating >= threshold is a positive (DIN paper's MovieLens protocol; "
                        "default: %(default)s)")
    p.add_argument("--negatives", type=int, default=1,
                   help="sampled negatives per positive for implicit logs without labels "
                        "(default: %(default)s)")
    p.add_argument("--min-count", type=int, default=1,
                   help="tokens seen fewer times map to out-of-vocabulary (default: %(default)s)")
    p.add_argument("--user-columns", default="",
                   help="comma-separated extra log columns that are user-profile features")
    p.add_argument("--context-columns", default="",
                   help="comma-separated extra log columns that are request-context features")
    p.add_argument("--max-users", type=int, default=None,
                   help="keep only the first N users (quick runs and tests)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip training the BaseModel")
    p.set_defaults(handler="model_export.train:run")


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained checkpoint to a self-checking ONNX bundle",
        description=(
            "Export the serving graph (history once per request, candidates broadcast inside the "
            "graph) to MODELS_DIR/<name>/<version>/ with manifest.json, vocabularies and golden "
            "cases. Runs the ONNX-vs-PyTorch parity check first and exits non-zero, writing "
            "nothing, when any score differs by more than --tolerance."
        ),
    )
    p.add_argument("--checkpoint", default="runs/din",
                   help="directory written by `dinserve train` (default: %(default)s)")
    p.add_argument("--out", default=DEFAULT_MODELS, help="models directory (default: %(default)s)")
    p.add_argument("--name", default=None,
                   help="bundle name (default: din-<preset>)")
    p.add_argument("--version", default=None,
                   help="bundle version, a positive integer (default: latest + 1)")
    p.add_argument("--naive", action="store_true",
                   help="also write model_naive.onnx, the same weights with history tiled to "
                        "[N, L], for benchmarks")
    p.add_argument("--tolerance", type=float, default=1e-5,
                   help="max |ONNX − PyTorch| allowed (default: %(default)s)")
    p.set_defaults(handler="model_export.export:run")


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the scoring service (flags override CTR_* environment settings)",
        description="Serve POST /score over HTTP. Every setting is documented in docs/settings.md.",
    )
    p.add_argument("--model-dir", default=None, help="bundle directory or models root")
    p.add_argument("--redis-url", default=None, help="redis:// or rediss:// URL")
    p.add_argument("--host", default=None,
                   help="address to bind (default: CTR_HOST, else 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=None,
                   help="port to bind (default: CTR_PORT, else 8000)")
    p.set_defaults(handler="service.__main__:run_cli")


def _add_history(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("history", help="manage behaviour histories in Redis")
    hsub = p.add_subparsers(dest="history_command", required=True, metavar="{load}")
    load = hsub.add_parser(
        "load",
        help="bulk-load users' histories from an interaction log",
        description=(
            "Write <prefix>:hist:<user_id> (Redis LIST, newest first, capped at the max history "
            "length) for every user in the log, pipelined. Idempotent: each list is replaced."
        ),
    )
    load.add_argument("--data", default=DEFAULT_DATA, help="same formats as `dinserve train`")
    load.add_argument("--format", default="auto", choices=["auto", "movielens", "csv", "parquet"],
                      help="input format; auto detects it from the path (default: %(default)s)")
    load.add_argument("--redis-url", default=None, help="default: CTR_REDIS_URL or local Redis")
    load.add_argument("--prefix", default=None, help="key prefix (default: CTR_REDIS_PREFIX)")
    load.add_argument("--model-dir", default=None,
                      help="bundle to take the max history length and profile features from")
    load.add_argument("--max-length", type=int, default=None,
                      help="cap per user (default: the bundle's max history length, else 100)")
    load.add_argument("--user-columns", default="",
                      help="comma-separated log columns written to the <prefix>:user:<id> hash")
    load.set_defaults(handler="service.history_loader:run")


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="train, export, load histories and serve the MovieLens demo; prints a curl",
        description=(
            "One command from a checkout to a running service: trains a DIN on --data into "
            "WORKDIR/runs/demo and exports it to WORKDIR/models/demo (both skipped when they "
            "exist), uses the Redis at REDIS_URL if it answers PING or else starts a "
            "redis-server on a free loopback port, loads every user's history, starts "
            "`dinserve serve`, waits until /readyz answers and prints a ready-to-paste curl. "
            "Ctrl-C (or SIGTERM) stops everything it started. Other CTR_* settings (e.g. "
            "CTR_REDIS_PREFIX) pass through to the service and the history loader."
        ),
    )
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="MovieLens folder or interaction log, as for `dinserve train` "
                        "(default: %(default)s)")
    p.add_argument("--format", default="auto", choices=["auto", "movielens", "csv", "parquet"],
                   help="input format (default: %(default)s)")
    p.add_argument("--workdir", default=".",
                   help="where runs/demo, models/ and .demo/ (logs) live (default: %(default)s)")
    p.add_argument("--models", default=None,
                   help="models root for the bundle (default: WORKDIR/models)")
    p.add_argument("--retrain", action="store_true",
                   help="train and export again even if a model exists")
    p.add_argument("--preset", default=None, choices=["paper", "deepctr", "seed"],
                   help="network sizes for training (default: train's default)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs upper bound (default: train's default)")
    p.add_argument("--max-users", type=int, default=None,
                   help="train on the first N users only: a quick model for tests")
    p.add_argument("--baseline", action="store_true",
                   help="also train the BaseModel for comparison (doubles training time)")
    p.add_argument("--redis-url", default=None,
                   help="Redis to use when it answers PING (default: $REDIS_URL; when unset or "
                        "not answering, the demo starts its own redis-server)")
    p.add_argument("--host", default=None,
                   help="address the service binds (default: $CTR_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="port the service binds; the demo exits if it is taken; 0 = any free "
                        "port (default: $CTR_PORT or 8000)")
    p.add_argument("--ready-timeout", type=float, default=120.0,
                   help="seconds to wait for /readyz (default: %(default)s)")
    p.add_argument("--setup-only", action="store_true",
                   help="build or reuse the model and load the histories into --redis-url, then "
                        "exit without serving (docker-compose's model job)")
    p.set_defaults(handler="dinserve.demo:run")


def _add_openapi(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "openapi",
        help="write the service's OpenAPI document (docs/openapi.json)",
        description="Build the app (no model, no Redis needed) and write its OpenAPI JSON.",
    )
    p.add_argument("--out", default="docs/openapi.json",
                   help="output file, - for stdout (default: %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when --out differs from the app's schema")
    p.set_defaults(handler="dinserve.openapi:run")


BUILDERS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_train, _add_export, _add_serve, _add_history, _add_demo, _add_openapi,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinserve",
        description="Deep Interest Network CTR scoring: train, export, serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for build in BUILDERS:
        build(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, _, func_name = args.handler.partition(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
