"""The options of the load tools: `dinserve loadtest`, `compare`, `bench`, `ceiling` and `soak`.

One class per command (dinserve/options.py): each field is a flag with its type, default and help,
and the class's docstring is the command's --help description. Two of them are also what the
tools run on: LoadSettings (how bench/loadtest.py's measure() loads a target) is loadtest's own
flags, and SoakSettings is soak's. Flags that commands share are written once: PayloadOptions (the
request bodies of loadtest and compare) and the option functions below (what soak shares with
loadtest's saturation search).

They live in dinserve/, not bench/, because `dinserve --help` lists every command and the images
ship dinserve/ without bench/ (Dockerfile): at the top, this module imports the standard library
alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from dinserve.options import group, option, option_class

DEFAULT_URL = "http://127.0.0.1:8000/score"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "ctr"
SATURATION_SEARCH = "saturation search"


def redis_url_or_default(url: str | None) -> str:
    """--redis-url, else CTR_REDIS_URL (the service's own setting), else the local Redis."""
    return url or os.environ.get("CTR_REDIS_URL", DEFAULT_REDIS_URL)


def prefix_or_default(prefix: str | None) -> str:
    """--prefix, else CTR_REDIS_PREFIX (the service's own setting), else the service's default."""
    return prefix or os.environ.get("CTR_REDIS_PREFIX", DEFAULT_PREFIX)


# ----------------------------------------------------------------------------------------------
# What the command line gives -> the value: each raises ValueError naming its flag.


def _headers(texts: list[str] | tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    from bench.loadhttp import parse_header  # asyncio: not for `--help`

    return tuple(parse_header(text) for text in texts)


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(f) for f in text.split(",") if f.strip())
    except ValueError:
        raise ValueError(f"--fractions must be comma-separated numbers, got {text!r}") from None


def _service_env(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise ValueError(f"--service-env must be CTR_X=VALUE, got {pair!r}")
        env[name] = value
    return env


def _negative_is_none(length: int) -> int | None:
    return None if length < 0 else length


# ----------------------------------------------------------------------------------------------
# Flags soak shares with loadtest: one definition each (`extra`: where loadtest lists it)


def _candidates() -> Any:
    return option(default=200, help="candidates per request (default: %(default)s)")


def _timeout() -> Any:
    return option(
        default=5.0,
        help="seconds from a request's scheduled send until it counts as a timeout "
             "(default: %(default)s)")


def _start_rate(**extra: Any) -> Any:
    return option(default=50.0, help="first saturation-search rate (default: %(default)s)",
                  **extra)


def _step_duration(**extra: Any) -> Any:
    return option(default=4.0, help="seconds per saturation-search step (default: %(default)s)",
                  **extra)


def _p99_limit(default: float, **extra: Any) -> Any:
    # The same flag with each command's own default: soak's search only estimates saturation.
    return option(
        default=default,
        help="a saturation step whose p99 exceeds this fails (default: %(default)s)", **extra)


# ----------------------------------------------------------------------------------------------
# dinserve loadtest and compare


@option_class
class PayloadOptions:
    """The request bodies of `loadtest` and `compare` (bench/loadtest.py prepare_payloads)."""

    users: int = option(
        default=610,
        help="user ids 1..N, or the first N found with --users-from-redis (default: "
             "%(default)s, MovieLens small)")
    users_file: Path | None = option(default=None, help="one user id per line")
    users_from_redis: bool = option(
        default=False, help="take user ids from the <prefix>:hist:* keys in --redis-url")
    candidates: int = _candidates()
    item_ids_from: Path | None = option(
        default=None,
        help="items.tsv, models/<name>/<version>/ or models/<name>/ (the version the service "
             "would serve)")
    item_range: str = option(
        default="1:10000",
        help="numeric item ids LO:HI when --item-ids-from is not given (default: %(default)s)")
    with_categories: bool = option(
        default=False, help="send each candidate's first category from items.tsv")
    context: str | None = option(
        default=None, help="JSON object sent as every request's context")
    distinct_payloads: int = option(
        default=256, help="request bodies built up front and cycled (default: %(default)s)")
    history_length: int | None = option(
        default=None,
        help="first REPLACE the chosen users' histories in Redis with this many random items, "
             "so the service reads histories of this length (staging only)")
    redis_url: str | None = option(
        default=None,
        help="for --history-length / --users-from-redis (default: CTR_REDIS_URL or "
             f"{DEFAULT_REDIS_URL})")
    prefix: str | None = option(
        default=None,
        help=f"the service's key prefix (default: CTR_REDIS_PREFIX or {DEFAULT_PREFIX})")


@option_class
class LoadSettings:
    """How bench/loadtest.py's measure() loads the target: `dinserve loadtest`'s own flags."""

    url: str = option(
        default=DEFAULT_URL,
        help="target; the path defaults to /score (default: %(default)s)")
    rate: float = option(
        default=100.0, help="requests per second in constant mode (default: %(default)s)")
    duration: float = option(
        default=10.0, help="seconds of load in constant mode (default: %(default)s)")
    max_requests: int | None = option(
        default=None, help="cap on requests per phase (default: rate x duration, at most 1M)")
    arrival: Literal["constant", "poisson"] = option(
        default="constant", help="fixed intervals or Poisson arrivals (default: %(default)s)")
    warmup: float = option(
        default=1.0, help="unrecorded seconds at the first rate (default: %(default)s)")
    connections: int = option(
        default=8, help="keep-alive connections opened up front (default: %(default)s)")
    max_connections: int = option(
        default=256,
        help="pool cap; beyond it requests queue in the client and the report counts them "
             "(default: %(default)s)")
    timeout: float = _timeout()
    idle_timeout: float = option(
        default=4.0,
        help="close keep-alive connections idle this long, before the server does (uvicorn "
             "closes them after 5 s) (default: %(default)s)")
    tick_ms: float = option(
        default=1.0,
        help="the sender wakes at most this often and sends what is due; the wait is counted "
             "in latency and reported as dispatch_lag. 0 sends on time but spins a CPU core at "
             "high rates (default: %(default)s)")
    headers: tuple[tuple[str, str], ...] = option(
        default=(), flag="--header", append=True, metavar="'NAME: VALUE'", convert=_headers,
        help="an extra header on every request, e.g. 'X-Request-Deadline-Ms: 50' or "
             "'Authorization: Bearer ...'; repeatable")
    seed: int = option(default=0, help="(default: %(default)s)")
    server_metrics: bool = option(
        default=True, flag="--no-server-metrics",
        help="do not read the target's /metrics around each phase (by default a dinserve "
             "target's own account goes into the report: requests by status, mean server "
             "time, /score stages, graph CPU, process CPU per request)")
    find_saturation: bool = option(
        default=False, group=SATURATION_SEARCH,
        help="step the rate up until the target stops keeping up")
    start_rate: float = _start_rate(group=SATURATION_SEARCH)
    step_factor: float = option(
        default=1.5, group=SATURATION_SEARCH,
        help="rate multiplier per step (default: %(default)s)")
    step_duration: float = _step_duration(group=SATURATION_SEARCH)
    max_rate: float = option(
        default=20_000.0, group=SATURATION_SEARCH, help="(default: %(default)s)")
    max_steps: int = option(default=20, group=SATURATION_SEARCH, help="(default: %(default)s)")
    p99_limit_ms: float = _p99_limit(100.0, group=SATURATION_SEARCH)
    max_error_rate: float = option(
        default=0.01, group=SATURATION_SEARCH,
        help="a step with more errors than this fraction fails (default: %(default)s)")
    track_ratio: float = option(
        default=0.9, group=SATURATION_SEARCH,
        help="a step achieving less than this x offered fails (default: %(default)s)")
    refine: int = option(
        default=2, group=SATURATION_SEARCH,
        help="bisection steps between the last pass and the first failure (default: "
             "%(default)s)")
    fractions: tuple[float, ...] = option(
        default="0.25,0.5,0.75", convert=_fractions, group=SATURATION_SEARCH,
        help="measure at these fractions of saturation; '' skips (default: %(default)s)")
    fraction_duration: float = option(
        default=10.0, group=SATURATION_SEARCH,
        help="seconds per fraction phase (default: %(default)s)")
    pause: float = option(
        default=1.0, group=SATURATION_SEARCH,
        help="seconds between phases, for the target to drain; longer after a phase whose "
             "slowest answer took longer, up to --timeout (default: %(default)s)")

    def __post_init__(self) -> None:
        for name in ("rate", "start_rate", "max_rate", "duration", "step_duration",
                     "fraction_duration"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got "
                                 f"{getattr(self, name)}")
        if self.step_factor <= 1.0:
            raise ValueError(f"--step-factor must be > 1, got {self.step_factor}")
        if not 0 < self.track_ratio <= 1:
            raise ValueError(f"--track-ratio must be in (0, 1], got {self.track_ratio}")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"--fractions must be in (0, 1], got {self.fractions}")


GRAPH_CEILING = "graph ceiling (the service on this machine)"


@option_class
class LoadtestOptions:
    """Send POST /score requests at a constant (or Poisson) arrival rate, whatever the server
    does, and measure each latency from its scheduled send time (no coordinated omission). Writes
    report.json (HDR percentiles, throughput, errors by status) and latency.png into --out.
    --find-saturation steps the rate up until the target stops keeping up, then measures p50/p99
    at fractions of that rate. See docs/performance.md.
    """

    load: LoadSettings = group(factory=LoadSettings)
    noop_server: bool = option(
        default=False,
        help="ignore --url and load a built-in no-op HTTP server: the client's own latency "
             "floor and CPU cost")
    loop: Literal["auto", "uvloop", "asyncio"] = option(
        default="auto", help="client event loop (default: %(default)s = uvloop when installed)")
    payload: PayloadOptions = group(factory=PayloadOptions, title="payload")
    graph_ceiling: Path | None = option(
        default=None, metavar="MODEL_DIR", group=GRAPH_CEILING,
        help="time the bundle's graph alone (`dinserve ceiling`) right before and after the "
             "load, with --ceiling-callers threads at --candidates x --history-length, and "
             "report the throughput as a share of it; only meaningful when the target runs on "
             "this machine")
    ceiling_callers: int | None = option(
        default=None, group=GRAPH_CEILING,
        help="concurrent graph calls (default: the service's inference threads under this "
             "environment's CTR_* settings)")
    ceiling_seconds: float = option(
        default=4.0, group=GRAPH_CEILING,
        help="seconds per ceiling measurement (default: %(default)s)")
    out: Path | None = option(
        default=None, group="output",
        help="report directory (default: reports/loadtest/<UTC time>)")
    no_picture: bool = option(default=False, group="output", help="skip latency.png")


@option_class
class CompareOptions:
    """Closed loop: each round sends one request body to every URL in turn (the order rotates
    between rounds), one request at a time, and records each latency; the first --warmup-rounds
    are not recorded. Prints p50/p90/p99/mean per URL and each p50 as a multiple of the last
    URL's (the reference); --out writes them as JSON. The small-request measurement: /score
    against /bench/noop (CTR_BENCH_ENDPOINTS=true) at 10 candidates, history 50
    (docs/performance.md). Exit 1 when a URL never answered 2xx.
    """

    urls: tuple[str, ...] = option(
        positional=True, nargs="+", metavar="URL",
        help="POST targets; the last one is the reference")
    rounds: int = option(default=2000, help="recorded rounds (default: %(default)s)")
    warmup_rounds: int = option(
        default=200, help="unrecorded rounds first (default: %(default)s)")
    timeout: float = option(
        default=5.0,
        help="seconds before a request counts as a timeout (default: %(default)s)")
    headers: tuple[tuple[str, str], ...] = option(
        default=(), flag="--header", append=True, metavar="'NAME: VALUE'", convert=_headers,
        help="an extra header on every request; repeatable")
    seed: int = option(default=0, help="(default: %(default)s)")
    out: Path | None = option(default=None, help="JSON report path (default: print only)")
    payload: PayloadOptions = group(factory=PayloadOptions, title="payload")

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.warmup_rounds < 0:
            raise ValueError("--rounds must be at least 1 and --warmup-rounds at least 0")


# ----------------------------------------------------------------------------------------------
# dinserve bench and ceiling


@option_class
class BenchOptions:
    """For the reference workloads (W1 paper-scale, W2 DeepCTR-default; DESIGN.md), export one
    random DIN as the serving graph, the naive tiled graph and a variant, and time them
    interleaved in one run with identical onnxruntime settings, next to PyTorch eager and a plain
    MatMul of the serving graph's FLOP count (roofline reference). Prints medians, p99s, ratios
    and score differences; --out writes them as JSON.
    """

    # The names of bench/graph.py's WORKLOADS (tests/test_cli.py checks that they agree).
    workload: tuple[Literal["W1", "W2"], ...] = option(
        default=("W1", "W2"), nargs="+", help="(default: %(default)s)")
    threads: tuple[int, ...] = option(
        default=(1, 2), nargs="+",
        help="onnxruntime intra-op (and torch) thread counts, each measured (default: "
             "%(default)s)")
    repeats: int = option(default=100, help="timed calls per variant (default: %(default)s)")
    warmup: int = option(default=5, help="untimed calls per variant first (default: %(default)s)")
    items: int = option(default=1_000_000, help="item vocabulary (default: %(default)s, W1's)")
    categories: int = option(
        default=10_000, help="category vocabulary (default: %(default)s, W1's)")
    categories_per_item: int = option(
        default=1,
        help="C; the paper's datasets have one category per item (default: %(default)s)")
    no_torch: bool = option(default=False, help="skip the PyTorch eager variants")
    seed: int = option(default=0, help="(default: %(default)s)")
    out: Path | None = option(default=None, help="JSON report path (default: print only)")


@option_class
class CeilingOptions:
    """Load a bundle as `dinserve serve` would (same CTR_* settings, self-check, warm-up) and
    call its graph back to back from each number of --callers threads for --seconds, with one
    request shape. Prints calls/s, CPU per call and call latency per caller count; --out writes
    them as JSON. With as many callers as the service has inference threads, it is the
    throughput the service would reach if HTTP, Redis and the features cost nothing
    (docs/performance.md).
    """

    model_dir: Path = option(
        help="bundle directory, model directory (newest version) or models root")
    candidates: int = option(
        default=200, help="candidates per call (default: %(default)s, W1's)")
    history_length: int | None = option(
        default=None, help="history per call (default: the bundle's max_history_length)")
    callers: tuple[int, ...] = option(
        default=(1, 2), nargs="+",
        help="concurrent caller counts, each measured (default: %(default)s)")
    seconds: float = option(
        default=8.0, help="seconds per caller count (default: %(default)s)")
    seed: int = option(default=0, help="(default: %(default)s)")
    out: Path | None = option(default=None, help="JSON report path (default: print only)")


# ----------------------------------------------------------------------------------------------
# dinserve soak


@option_class
class SoakSettings:
    """What bench/soak.py's soak() runs: `dinserve soak`'s flags but --out."""

    model_dir: Path = option(help="bundle directory or models root to serve")
    redis_url: str = option(
        default=None, convert=redis_url_or_default,
        help="Redis for the service and the seeded histories (default: CTR_REDIS_URL or "
             f"{DEFAULT_REDIS_URL})")
    prefix: str = option(
        default="soak",
        help="the service's key prefix; histories are seeded under it (default: %(default)s)")
    rate: float | None = option(
        default=None,
        help="requests per second; default: --fraction x the measured saturation")
    fraction: float = option(
        default=0.7,
        help="fraction of saturation to offer when --rate is not given (default: %(default)s)")
    duration: float = option(
        default=600.0, help="seconds of recorded load (default: %(default)s)")
    window: float = option(default=30.0, help="seconds per reported window (default: %(default)s)")
    warmup: float = option(
        default=10.0, help="unrecorded seconds of load first (default: %(default)s)")
    users: int = option(
        default=1000, help="distinct user ids soak-0..N-1 (default: %(default)s)")
    candidates: int = _candidates()
    history_length: int | None = option(
        default=50, type=int, convert=_negative_is_none,
        help="REPLACE each soak user's history with this many random items first; -1 leaves "
             "Redis alone (default: %(default)s)")
    max_rss_growth: float = option(
        default=5.0,
        help="pass only if RSS grew less than this percent from the end of the first window "
             "(default: %(default)s)")
    rss_interval: float = option(
        default=1.0, help="seconds between RSS samples (default: %(default)s)")
    step_duration: float = _step_duration()
    start_rate: float = _start_rate()
    p99_limit_ms: float = _p99_limit(250.0)
    timeout: float = _timeout()
    service_env: dict[str, str] = option(
        default=(), append=True, metavar="CTR_X=VALUE", convert=_service_env,
        help="extra environment for the service, repeatable, e.g. CTR_REDIS_DEADLINE_MS=50")

    def __post_init__(self) -> None:
        if self.rate is not None and self.rate <= 0:
            raise ValueError("--rate must be positive")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.window <= 0 or self.duration < self.window:
            raise ValueError("--window must be positive and at most --duration")


@option_class
class SoakOptions:
    """Start the service (`python -m service` on a free loopback port), find its saturation
    throughput with the load tester unless --rate is given, then offer --fraction of it for
    --duration seconds in --window second windows while sampling the service's RSS. Writes
    report.json (per-window p50/p99/errors/RSS; errors, p99 drift and RSS growth overall) into
    --out. Exit 0 when there was no error and RSS grew less than --max-rss-growth percent, 1
    otherwise, 2 when the service did not start. See docs/reliability.md.
    """

    settings: SoakSettings = group()
    out: Path | None = option(
        default=None, help="report directory (default: reports/soak/<UTC time>)")
