"""`python -m service` and `dinserve serve`: configure logging, load the model, run uvicorn.

The model is loaded and verified here, before uvicorn starts, so that a missing or broken bundle
ends the process with exit status 2 and one clear line on stderr instead of a lifespan traceback.
The verified model is handed to create_app(), which does not load it a second time. Flags override
the CTR_* environment (docs/settings.md).

With CTR_WORKERS > 1 this process becomes uvicorn's supervisor: it checks the model once, then
starts the workers, each of which builds its own app (and loads the model again) from the
environment; the flags are passed on as CTR_* variables, and prometheus-client's multiprocess
directory is created here and removed at exit. SIGTERM drains every worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from types import FrameType
from typing import Any

import anyio
import uvicorn
from pydantic import SecretStr, ValidationError
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from dinserve.commands import ServeOptions
from dinserve.options import OptionError, add_options, description, read_options, usage_error
from service.app import StartupError, create_app, load_initial_model
from service.config import Settings
from service.metrics import MULTIPROCESS_DIR_ENV

logger = logging.getLogger("service")

EXIT_CONFIG = 2  # invalid settings or no valid model: nothing to retry until someone fixes it
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    """`python -m service` takes the flags of `dinserve serve`, from the same ServeOptions."""
    parser = argparse.ArgumentParser(prog="python -m service",
                                     description=description(ServeOptions))
    add_options(parser, ServeOptions)
    return parser


# Each flag overrides the setting of the same name.
FLAG_SETTINGS = tuple(field.name for field in dataclasses.fields(ServeOptions))


def settings_from_options(options: ServeOptions) -> Settings:
    """Settings from the environment, with the flags that were given taking precedence."""
    overrides: dict[str, Any] = {
        name: value for name in FLAG_SETTINGS if (value := getattr(options, name)) is not None
    }
    return Settings(**overrides)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)


def run_cli(options: ServeOptions) -> int:
    """Handler of `dinserve serve`; returns the process exit status."""
    try:
        settings = settings_from_options(options)
    except ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level)
    try:
        model = anyio.run(load_initial_model, settings)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if settings.workers > 1:
        del model  # each worker loads its own; this one only proved the bundle is servable
        return _run_workers(settings)
    # log_config=None: logging stays as configure_logging() set it.
    server = uvicorn.Server(server_config(settings, create_app(settings, model=model),
                                          log_config=None))
    # uvicorn re-raises the signal it handled once its graceful shutdown is over; under the
    # default SIGTERM disposition that kills the process (status -15), so an orderly drain would
    # look like a crash to the orchestrator. With a no-op handler a drained SIGTERM exits 0.
    signal.signal(signal.SIGTERM, _drained)
    server.run()
    return 0 if server.started else 1


def server_config(settings: Settings, app: Any, **extra: Any) -> uvicorn.Config:
    """uvicorn's configuration of the service, one process or several."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        lifespan="on",
        # SIGTERM: stop accepting, let requests in flight finish (at most this long), then the
        # lifespan shutdown. docs/reliability.md, tests/test_faults.py.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_seconds),
        # uvicorn's 5 s default closes idle connections that a caller's pool still holds: a
        # request sent on one as it closes is reset (the keep-alive race; bench/soak.py saw
        # 20 such resets in 10 minutes). The side that closes first should be the caller.
        timeout_keep_alive=math.ceil(settings.keep_alive_seconds),
        # uvicorn refuses a request when its open connections (the request's own included) or
        # running requests reach limit_concurrency, so N connections served means N + 1.
        limit_concurrency=settings.max_connections + 1 if settings.max_connections else None,
        **extra,
    )


def _run_workers(settings: Settings) -> int:
    """settings.workers uvicorn workers on one socket, each creating its app from CTR_*."""
    # The flags reach the workers as the CTR_* variables they stand for.
    for name in FLAG_SETTINGS:
        value = getattr(settings, name)
        plain = value.get_secret_value() if isinstance(value, SecretStr) else value
        os.environ[f"CTR_{name.upper()}"] = str(plain)
    metrics_dir = tempfile.mkdtemp(prefix="dinserve-metrics-")
    os.environ[MULTIPROCESS_DIR_ENV] = metrics_dir
    # Workers are fresh interpreters (spawn): uvicorn applies this logging config in each.
    log_config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": LOG_FORMAT}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain",
                                "stream": "ext://sys.stderr"}},
        "root": {"level": settings.log_level.upper(), "handlers": ["stderr"]},
    }
    config = server_config(settings, "service.app:create_app", factory=True,
                           workers=settings.workers, log_config=log_config)
    logger.info("starting %d workers on %s:%d", settings.workers, settings.host, settings.port)
    try:
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()  # until SIGTERM/SIGINT, or until a worker fails to start
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    failed = [w.pid for w in supervisor.processes if w.exitcode == STARTUP_FAILURE]
    if failed:
        print(f"error: worker(s) {failed} failed to start; see the log above", file=sys.stderr)
        return 1
    return 0


def _drained(signum: int, frame: FrameType | None) -> None:
    """Receives uvicorn's re-raised SIGTERM after the drain: nothing left to do."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        options = read_options(ServeOptions, parser.parse_args(argv))
    except OptionError as exc:
        return usage_error(parser, exc)
    return run_cli(options)


if __name__ == "__main__":
    sys.exit(main())
