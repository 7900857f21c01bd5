"""Settings: every knob of the online service, read from CTR_* environment variables.

One class, typed fields, defaults that run on a laptop with a local Redis. Nothing is read at
import time: create_app(settings=None) builds a Settings when it is not handed one, and tests pass
Settings(...) directly. docs/settings.md documents every field; tests/test_service_config.py
checks that the table and this class agree.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

RedisPolicy = Literal["degrade", "fail"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
REDIS_SCHEMES = ("redis", "rediss", "unix")
CGROUP_ROOT = Path("/sys/fs/cgroup")  # usable_cores(): a CPU quota, as this process sees it


class Settings(BaseSettings):
    """The service configuration; field `x` is the environment variable `CTR_X`."""

    # hide_input_in_errors: a rejected redis_url would otherwise be echoed, password and all.
    model_config = SettingsConfigDict(
        env_prefix="CTR_", extra="forbid", frozen=True, hide_input_in_errors=True
    )

    # Model
    model_dir: Path = Field(
        default=Path("models"),
        description="a bundle directory, a model-name directory or the models root; the latest "
        "integer version is served",
    )
    history_length: PositiveInt | None = Field(
        default=None,
        description="when set, the bundle's max_history_length must equal it or the service "
        "refuses the bundle",
    )
    warmup_runs: int = Field(
        default=3,
        ge=0,
        description="inference runs on a synthetic request before "
        "a model serves (at start and at every reload)",
    )
    reload_poll_seconds: float = Field(
        default=5.0,
        ge=0,
        description="how often model_dir is checked for a new version; 0 turns polling off",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="bearer token for POST /admin/reload; the endpoint is off when unset",
    )

    # ONNX Runtime. Explicit thread counts: onnxruntime's default takes every core, which fights
    # the event loop and the other replicas on the same host.
    ort_intra_op_threads: int = Field(
        default=1,
        ge=0,
        description="threads inside one operator (0 = onnxruntime's default: one per core)",
    )
    ort_inter_op_threads: int = Field(
        default=1, ge=0, description="threads across operators (0 = default)"
    )
    ort_allow_spinning: bool = Field(
        default=False,
        description="let idle intra-op worker threads spin waiting for work (only matters with "
        "more than one intra-op thread)",
    )
    inline_inference_pairs: int = Field(
        default=1000,
        ge=0,
        description="a graph call of at most this many candidate x history pairs runs on the "
        "event loop instead of the inference threads (0 = always the inference threads)",
    )
    inference_threads: int = Field(
        default=0,
        ge=0,
        description="threads that run graph calls; more calls wait for one in arrival order "
        "(0 = the usable cores divided by the intra-op threads per call and by the workers, at "
        "least 1)",
    )
    ort_graph_optimization: GraphOptimization = Field(
        default="all", description="onnxruntime graph optimisation level"
    )

    # Redis
    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="redis://, rediss:// (TLS) or unix:// URL; credentials go here and are never "
        "logged",
    )
    redis_prefix: str = Field(
        default="ctr",
        min_length=1,
        max_length=64,
        pattern=r"^[^\s]+$",
        description="first part of every key: <prefix>:hist:<user_id>",
    )
    redis_deadline_ms: PositiveFloat = Field(
        default=25.0, description="budget for the one history round trip, connecting included"
    )
    redis_policy: RedisPolicy = Field(
        default="degrade",
        description="when Redis misses the deadline or is down: `degrade` scores with an empty "
        "history and answers degraded=true; `fail` answers 503",
    )
    redis_max_connections: PositiveInt = Field(
        default=256,
        description="connection pool size; a request beyond it waits for a free connection "
        "(within the deadline)",
    )

    # Request limits
    max_candidates: PositiveInt = Field(default=1000, description="candidates per request")
    max_user_id_length: PositiveInt = Field(default=128, description="characters in user_id")
    max_body_bytes: PositiveInt = Field(
        default=1_048_576,
        description="request body size, checked before parsing (chunked bodies too)",
    )

    # Overload and slow clients (service/overload.py; docs/reliability.md). Only POST /score is
    # gated: probes, /metrics and /model answer even when scoring is saturated.
    max_in_flight: PositiveInt = Field(
        # 2 x the cores of the reference machine: enough to overlap one request's Redis wait and
        # parsing with another's inference, while past saturation the in-flight work stays
        # ~50 ms per core instead of ~0.5 s with 32 (docs/performance.md).
        default=4,
        description="POST /score requests processed at once; more wait in the admission queue",
    )
    max_queued: int = Field(
        default=64,
        ge=0,
        description="requests allowed to wait for a slot; beyond it a 503 `overloaded` with "
        "Retry-After at once (0 = no queue)",
    )
    queue_timeout_ms: PositiveFloat = Field(
        default=200.0,
        description="longest wait in the admission queue before a 503 `overloaded`",
    )
    queue_lifo_after_ms: NonNegativeFloat = Field(
        # About two W1 graph calls on the reference machine: a queue that old is no longer
        # jitter (docs/performance.md, "Overload: oldest first against adaptive LIFO").
        default=20.0,
        description="once the oldest queued request with an X-Request-Deadline-Ms has waited "
        "this long, a freed slot goes to the newest instead (adaptive LIFO: under overload the "
        "requests served are those that can still make their deadlines); requests without a "
        "deadline keep their turn; 0 = newest first whenever the oldest has a deadline",
    )
    body_timeout_ms: PositiveFloat = Field(
        default=5000.0,
        description="time allowed to receive a request body; a slower client gets 408 and its "
        "connection is closed",
    )
    max_connections: int = Field(
        # Below the usual soft limit of 1,024 open files (Docker's default among others), so
        # that a crowd of connections meets this 503 rather than failing accept() (EMFILE).
        default=1000,
        ge=0,
        description="open HTTP connections per process, idle keep-alive ones included; a "
        "request that arrives on a connection beyond them is answered 503 before its body is "
        "read and the connection closed; bounds the memory of bodies being received (with "
        "CTR_MAX_BODY_BYTES); 0 = no cap",
    )
    keep_alive_seconds: PositiveFloat = Field(
        default=75.0,
        description="how long an idle keep-alive connection stays open; keep it above the "
        "callers' and load balancers' pool idle timeouts, so that they close first",
    )
    shutdown_timeout_seconds: PositiveFloat = Field(
        default=30.0,
        description="on SIGTERM, how long requests in flight may take to finish before they are "
        "cancelled",
    )

    # Benchmarking (docs/performance.md)
    bench_endpoints: bool = Field(
        default=False,
        description="serve POST /bench/noop: /score's parsing and limits without Redis or "
        "inference, the reference for measuring the request path",
    )

    # HTTP server
    host: str = Field(default="127.0.0.1", description="address uvicorn binds")
    port: int = Field(
        default=8000, ge=0, le=65535, description="port uvicorn binds (0 = any free port)"
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="service processes sharing the port (uvicorn workers), each with its own "
        "model, Redis pool and admission limits; /metrics sums them (docs/operations.md)",
    )
    log_level: LogLevel = Field(default="info", description="root log level")
    access_log: bool = Field(default=True, description="uvicorn's one line per request")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in REDIS_SCHEMES:
            # The message must not echo the URL: it may hold a password.
            raise ValueError(f"scheme must be one of {REDIS_SCHEMES}, got {scheme!r}")
        return value

    @property
    def redis_location(self) -> str:
        """The Redis URL without credentials, safe for logs and /model."""
        return redact_url(self.redis_url.get_secret_value())

    @property
    def inference_thread_count(self) -> int:
        """inference_threads, or with 0 this worker's share of the graph calls the cores hold.

        The workers share the cores: with 2 workers on 2 cores each runs one call at a time, not
        two (four calls time-slicing two cores stretch every one of them).
        """
        if self.inference_threads:
            return self.inference_threads
        cores = usable_cores()
        per_call = self.ort_intra_op_threads or cores  # 0: onnxruntime's one thread per core
        return max(1, cores // (per_call * self.workers))

    @property
    def redis_deadline_seconds(self) -> float:
        return self.redis_deadline_ms / 1000.0


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota, at least 1.

    The quota is what `docker run --cpus 2` or a Kubernetes CPU limit sets: the affinity still
    lists every core of the host, and as many busy threads as host cores would be throttled by
    the quota in turns of the CFS period (100 ms by default), which is latency for everyone.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed per period by the cgroup under root, None when unlimited or not readable.

    cgroup v2 `cpu.max` ("<quota> <period>" or "max <period>"), else v1 `cpu/cpu.cfs_quota_us`
    over `cpu/cpu.cfs_period_us` (quota -1 = unlimited). The root is /sys/fs/cgroup as this
    process sees it: in a container with its own cgroup namespace (Docker's and Kubernetes'
    default on cgroup v2) that is the container's cgroup.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else _ratio(quota, period)
    except (OSError, ValueError):
        pass
    try:
        quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
        period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    try:
        return None if int(quota) < 0 else _ratio(quota, period)
    except ValueError:
        return None


def _ratio(quota: str, period: str) -> float | None:
    """quota / period in CPUs; None unless both are positive (ValueError if not integers)."""
    q, p = int(quota), int(period)
    return q / p if q > 0 and p > 0 else None


def redact_url(url: str) -> str:
    """scheme://host:port/path with any user and password removed."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return f"{parts.scheme}://{netloc}{parts.path}"
