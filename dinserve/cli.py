"""The `dinserve` command line: one entry point, one subcommand per job.

Only the table of commands and the parsing live here. Each command's flags are declared once, by
its options class (dinserve/commands.py, bench/options.py), and its handler receives that typed
object. Handlers are imported when their command runs, so `dinserve serve` and `dinserve --help`
never import torch (only train/export/bench need it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dinserve.commands import (
    DemoOptions,
    ExportOptions,
    HistoryLoadOptions,
    OpenapiOptions,
    ServeOptions,
    TrainOptions,
)
from dinserve.options import OptionError, add_options, description, read_options, usage_error


@dataclass(frozen=True)
class Command:
    """A subcommand: the options class that declares its flags and the handler that runs it."""

    name: str
    options: type[Any]
    handler: str  # "module:function", taking an instance of `options`, returning the exit status
    help: str  # its line in the parent command's --help

    def add_to(self, commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        parser = commands.add_parser(self.name, help=self.help,
                                     description=description(self.options))
        add_options(parser, self.options)
        parser.set_defaults(_command=self, _parser=parser)

    def run(self, options: Any) -> int:
        module_name, _, func_name = self.handler.partition(":")
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(options) or 0)


@dataclass(frozen=True)
class CommandGroup:
    """A subcommand that only holds subcommands, e.g. `dinserve history load`."""

    name: str
    help: str
    commands: tuple[Command, ...]

    def add_to(self, commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        parser = commands.add_parser(self.name, help=self.help)
        names = ",".join(command.name for command in self.commands)
        sub = parser.add_subparsers(dest=f"{self.name}_command", required=True,
                                    metavar=f"{{{names}}}")
        for command in self.commands:
            command.add_to(sub)


COMMANDS: tuple[Command | CommandGroup, ...] = (
    Command("train", TrainOptions, "model_export.train:run",
            "train a DIN and its BaseModel on an interaction log"),
    Command("export", ExportOptions, "model_export.export:run",
            "export a trained checkpoint to a self-checking ONNX bundle"),
    Command("serve", ServeOptions, "service.__main__:run_cli",
            "run the scoring service (flags override CTR_* environment settings)"),
    CommandGroup("history", "manage behaviour histories in Redis", (
        Command("load", HistoryLoadOptions, "service.history_loader:run",
                "bulk-load users' histories from an interaction log"),
    )),
    Command("demo", DemoOptions, "dinserve.demo:run",
            "train, export, load histories and serve the MovieLens demo; prints a curl"),
    Command("openapi", OpenapiOptions, "dinserve.openapi:run",
            "write the service's OpenAPI document (docs/openapi.json)"),
)


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
            "Issue 5's small-request line: /score against /bench/noop (CTR_BENCH_ENDPOINTS=true) "
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


# Not yet declared as options classes: handlers of these take the argparse namespace.
BUILDERS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_loadtest, _add_compare, _add_bench, _add_ceiling, _add_soak,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinserve",
        description="Deep Interest Network CTR scoring: train, export, serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_to(sub)
    for build in BUILDERS:
        build(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    namespace = build_parser().parse_args(argv)
    if "handler" in namespace:
        module_name, _, func_name = namespace.handler.partition(":")
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(namespace) or 0)
    command: Command = namespace._command
    try:
        options = read_options(command.options, namespace)
    except OptionError as exc:
        return usage_error(namespace._parser, exc)
    return command.run(options)


if __name__ == "__main__":
    sys.exit(main())
