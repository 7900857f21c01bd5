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
                        "user_id,item_id,timestamp[,category][,rating|label] "
                        "(default: %(default)s)")
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
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate (default: %(default)s)")
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
    p.add_argument("--no-calibration", action="store_true",
                   help="keep the raw probabilities (default: Platt scaling on the validation "
                        "split, folded into the head; AUC unchanged)")
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
    p.add_argument("--workers", type=int, default=None,
                   help="service processes sharing the port (default: CTR_WORKERS, else 1); "
                        "see docs/settings.md")
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


def _add_payload_options(p: argparse.ArgumentParser) -> None:
    """The request bodies of `loadtest` and `compare` (bench/loadtest.py prepare_payloads)."""
    g = p.add_argument_group("payload")
    g.add_argument("--users", type=int, default=610,
                   help="user ids 1..N, or the first N found with --users-from-redis "
                        "(default: %(default)s, MovieLens small)")
    g.add_argument("--users-file", default=None, help="one user id per line")
    g.add_argument("--users-from-redis", action="store_true",
                   help="take user ids from the <prefix>:hist:* keys in --redis-url")
    g.add_argument("--candidates", type=int, default=200,
                   help="candidates per request (default: %(default)s)")
    g.add_argument("--item-ids-from", default=None,
                   help="items.tsv, models/<name>/<version>/ or models/<name>/ "
                        "(the version the service would serve)")
    g.add_argument("--item-range", default="1:10000",
                   help="numeric item ids LO:HI when --item-ids-from is not given "
                        "(default: %(default)s)")
    g.add_argument("--with-categories", action="store_true",
                   help="send each candidate's first category from items.tsv")
    g.add_argument("--context", default=None, help="JSON object sent as every request's context")
    g.add_argument("--distinct-payloads", type=int, default=256,
                   help="request bodies built up front and cycled (default: %(default)s)")
    g.add_argument("--history-length", type=int, default=None,
                   help="first REPLACE the chosen users' histories in Redis with this many random "
                        "items, so the service reads histories of this length (staging only)")
    g.add_argument("--redis-url", default=None,
                   help="for --history-length / --users-from-redis (default: CTR_REDIS_URL or "
                        "redis://127.0.0.1:6379/0)")
    g.add_argument("--prefix", default=None,
                   help="the service's key prefix (default: CTR_REDIS_PREFIX or ctr)")


def _add_loadtest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "loadtest",
        help="open-loop load test of a scoring URL (staging), or find its saturation rate",
        description=(
            "Send POST /score requests at a constant (or Poisson) arrival rate, whatever the "
            "server does, and measure each latency from its scheduled send time (no coordinated "
            "omission). Writes report.json (HDR percentiles, throughput, errors by status) and "
            "latency.png into --out. --find-saturation steps the rate up until the target stops "
            "keeping up, then measures p50/p99 at fractions of that rate. See docs/performance.md."
        ),
    )
    p.add_argument("--url", default="http://127.0.0.1:8000/score",
                   help="target; the path defaults to /score (default: %(default)s)")
    p.add_argument("--noop-server", action="store_true",
                   help="ignore --url and load a built-in no-op HTTP server: the client's own "
                        "latency floor and CPU cost")
    p.add_argument("--rate", type=float, default=100.0,
                   help="requests per second in constant mode (default: %(default)s)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds of load in constant mode (default: %(default)s)")
    p.add_argument("--max-requests", type=int, default=None,
                   help="cap on requests per phase (default: rate x duration, at most 1M)")
    p.add_argument("--arrival", choices=["constant", "poisson"], default="constant",
                   help="fixed intervals or Poisson arrivals (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="unrecorded seconds at the first rate (default: %(default)s)")
    p.add_argument("--connections", type=int, default=8,
                   help="keep-alive connections opened up front (default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="pool cap; beyond it requests queue in the client and the report counts "
                        "them (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds from a request's scheduled send until it counts as a timeout "
                        "(default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=4.0,
                   help="close keep-alive connections idle this long, before the server does "
                        "(uvicorn closes them after 5 s) (default: %(default)s)")
    p.add_argument("--tick-ms", type=float, default=1.0,
                   help="the sender wakes at most this often and sends what is due; the wait is "
                        "counted in latency and reported as dispatch_lag. 0 sends on time but "
                        "spins a CPU core at high rates (default: %(default)s)")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="an extra header on every request, e.g. 'X-Request-Deadline-Ms: 50' or "
                        "'Authorization: Bearer ...'; repeatable")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                   help="client event loop (default: %(default)s = uvloop when installed)")
    _add_payload_options(p)
    s = p.add_argument_group("saturation search")
    s.add_argument("--find-saturation", action="store_true",
                   help="step the rate up until the target stops keeping up")
    s.add_argument("--start-rate", type=float, default=50.0, help="(default: %(default)s)")
    s.add_argument("--step-factor", type=float, default=1.5,
                   help="rate multiplier per step (default: %(default)s)")
    s.add_argument("--step-duration", type=float, default=4.0,
                   help="seconds per step (default: %(default)s)")
    s.add_argument("--max-rate", type=float, default=20000.0, help="(default: %(default)s)")
    s.add_argument("--max-steps", type=int, default=20, help="(default: %(default)s)")
    s.add_argument("--p99-limit-ms", type=float, default=100.0,
                   help="a step whose p99 exceeds this fails (default: %(default)s)")
    s.add_argument("--max-error-rate", type=float, default=0.01,
                   help="a step with more errors than this fraction fails (default: %(default)s)")
    s.add_argument("--track-ratio", type=float, default=0.9,
                   help="a step achieving less than this x offered fails (default: %(default)s)")
    s.add_argument("--refine", type=int, default=2,
                   help="bisection steps between the last pass and the first failure "
                        "(default: %(default)s)")
    s.add_argument("--fractions", default="0.25,0.5,0.75",
                   help="measure at these fractions of saturation; '' skips (default: %(default)s)")
    s.add_argument("--fraction-duration", type=float, default=10.0,
                   help="seconds per fraction phase (default: %(default)s)")
    s.add_argument("--pause", type=float, default=1.0,
                   help="seconds between phases, for the target to drain; longer after a phase "
                        "whose slowest answer took longer, up to --timeout (default: %(default)s)")
    c = p.add_argument_group("graph ceiling (the service on this machine)")
    c.add_argument("--graph-ceiling", default=None, metavar="MODEL_DIR",
                   help="time the bundle's graph alone (`dinserve ceiling`) right before and "
                        "after the load, with --ceiling-callers threads at --candidates x "
                        "--history-length, and report the throughput as a share of it; only "
                        "meaningful when the target runs on this machine")
    c.add_argument("--ceiling-callers", type=int, default=None,
                   help="concurrent graph calls (default: the service's inference threads "
                        "under this environment's CTR_* settings)")
    c.add_argument("--ceiling-seconds", type=float, default=4.0,
                   help="seconds per ceiling measurement (default: %(default)s)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None,
                   help="report directory (default: reports/loadtest/<UTC time>)")
    o.add_argument("--no-picture", action="store_true", help="skip latency.png")
    o.add_argument("--no-server-metrics", action="store_true",
                   help="do not read the target's /metrics around each phase (by default a "
                        "dinserve target's own account goes into the report: requests by status, "
                        "mean server time, /score stages, graph CPU, process CPU per request)")
    p.set_defaults(handler="bench.loadtest:run")


def _add_compare(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "compare",
        help="endpoints side by side, one request at a time, the same bodies to each",
        description=(
            "Closed loop: each round sends one request body to every URL in turn (the order "
            "rotates between rounds), one request at a time, and records each latency; the "
            "first --warmup-rounds are not recorded. Prints p50/p90/p99/mean per URL and each "
            "p50 as a multiple of the last URL's (the reference); --out writes them as JSON. "
            "The small-request measurement: /score against /bench/noop (CTR_BENCH_ENDPOINTS=true) "
            "at 10 candidates, history 50 (docs/performance.md). Exit 1 when a URL never "
            "answered 2xx."
        ),
    )
    p.add_argument("urls", nargs="+", metavar="URL",
                   help="POST targets; the last one is the reference")
    p.add_argument("--rounds", type=int, default=2000,
                   help="recorded rounds (default: %(default)s)")
    p.add_argument("--warmup-rounds", type=int, default=200,
                   help="unrecorded rounds first (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds before a request counts as a timeout (default: %(default)s)")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="an extra header on every request; repeatable")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON report path (default: print only)")
    _add_payload_options(p)
    p.set_defaults(handler="bench.compare:run")


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


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="time the serving graph against the tiled graph and PyTorch (same weights)",
        description=(
            "For the reference workloads (W1 paper-scale, W2 DeepCTR-default; DESIGN.md), export "
            "one random DIN as the serving graph, the naive tiled graph and a variant, and time "
            "them interleaved in one run with identical onnxruntime settings, next to PyTorch "
            "eager and a plain MatMul of the serving graph's FLOP count (roofline reference). "
            "Prints medians, p99s, ratios and score differences; --out writes them as JSON."
        ),
    )
    p.add_argument("--workload", nargs="+", default=["W1", "W2"], choices=["W1", "W2"],
                   help="(default: %(default)s)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="onnxruntime intra-op (and torch) thread counts, each measured "
                        "(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=100,
                   help="timed calls per variant (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed calls per variant first (default: %(default)s)")
    p.add_argument("--items", type=int, default=1_000_000,
                   help="item vocabulary (default: %(default)s, W1's)")
    p.add_argument("--categories", type=int, default=10_000,
                   help="category vocabulary (default: %(default)s, W1's)")
    p.add_argument("--categories-per-item", type=int, default=1,
                   help="C; the paper's datasets have one category per item (default: %(default)s)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager variants")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON report path (default: print only)")
    p.set_defaults(handler="bench.graph:run")


def _add_ceiling(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ceiling",
        help="the graph's own ceiling: calls/s of a bundle's serving graph, nothing else running",
        description=(
            "Load a bundle as `dinserve serve` would (same CTR_* settings, self-check, warm-up) "
            "and call its graph back to back from each number of --callers threads for "
            "--seconds, with one request shape. Prints calls/s, CPU per call and call latency "
            "per caller count; --out writes them as JSON. With as many callers as the service "
            "has inference threads, it is the throughput the service would reach if HTTP, Redis "
            "and the features cost nothing (docs/performance.md)."
        ),
    )
    p.add_argument("--model-dir", required=True,
                   help="bundle directory, model directory (newest version) or models root")
    p.add_argument("--candidates", type=int, default=200,
                   help="candidates per call (default: %(default)s, W1's)")
    p.add_argument("--history-length", type=int, default=None,
                   help="history per call (default: the bundle's max_history_length)")
    p.add_argument("--callers", type=int, nargs="+", default=[1, 2],
                   help="concurrent caller counts, each measured (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=8.0,
                   help="seconds per caller count (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON report path (default: print only)")
    p.set_defaults(handler="bench.ceiling:run")


def _add_soak(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "soak",
        help="run the service under steady load for a long time; report errors, p99 drift, RSS",
        description=(
            "Start the service (`python -m service` on a free loopback port), find its saturation "
            "throughput with the load tester unless --rate is given, then offer --fraction of it "
            "for --duration seconds in --window second windows while sampling the service's RSS. "
            "Writes report.json (per-window p50/p99/errors/RSS; errors, p99 drift and RSS growth "
            "overall) into --out. Exit 0 when there was no error and RSS grew less than "
            "--max-rss-growth percent, 1 otherwise, 2 when the service did not start. See "
            "docs/reliability.md."
        ),
    )
    p.add_argument("--model-dir", required=True, help="bundle directory or models root to serve")
    p.add_argument("--redis-url", default=None,
                   help="Redis for the service and the seeded histories (default: CTR_REDIS_URL "
                        "or redis://127.0.0.1:6379/0)")
    p.add_argument("--prefix", default="soak",
                   help="the service's key prefix; histories are seeded under it "
                        "(default: %(default)s)")
    p.add_argument("--rate", type=float, default=None,
                   help="requests per second; default: --fraction x the measured saturation")
    p.add_argument("--fraction", type=float, default=0.7,
                   help="fraction of saturation to offer when --rate is not given "
                        "(default: %(default)s)")
    p.add_argument("--duration", type=float, default=600.0,
                   help="seconds of recorded load (default: %(default)s)")
    p.add_argument("--window", type=float, default=30.0,
                   help="seconds per reported window (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=10.0,
                   help="unrecorded seconds of load first (default: %(default)s)")
    p.add_argument("--users", type=int, default=1000,
                   help="distinct user ids soak-0..N-1 (default: %(default)s)")
    p.add_argument("--candidates", type=int, default=200,
                   help="candidates per request (default: %(default)s)")
    p.add_argument("--history-length", type=int, default=50,
                   help="REPLACE each soak user's history with this many random items first; "
                        "-1 leaves Redis alone (default: %(default)s)")
    p.add_argument("--max-rss-growth", type=float, default=5.0,
                   help="pass only if RSS grew less than this percent from the end of the first "
                        "window (default: %(default)s)")
    p.add_argument("--rss-interval", type=float, default=1.0,
                   help="seconds between RSS samples (default: %(default)s)")
    p.add_argument("--step-duration", type=float, default=4.0,
                   help="seconds per saturation-search step (default: %(default)s)")
    p.add_argument("--start-rate", type=float, default=50.0,
                   help="first saturation-search rate (default: %(default)s)")
    p.add_argument("--p99-limit-ms", type=float, default=250.0,
                   help="a saturation step whose p99 exceeds this fails (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds before a request counts as a timeout (default: %(default)s)")
    p.add_argument("--service-env", action="append", default=[], metavar="CTR_X=VALUE",
                   help="extra environment for the service, repeatable, e.g. "
                        "CTR_REDIS_DEADLINE_MS=50")
    p.add_argument("--out", default=None,
                   help="report directory (default: reports/soak/<UTC time>)")
    p.set_defaults(handler="bench.soak:run")


BUILDERS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_train, _add_export, _add_serve, _add_history, _add_demo, _add_openapi, _add_loadtest,
    _add_compare, _add_bench, _add_ceiling, _add_soak,
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
