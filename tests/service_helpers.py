"""Helpers for the service tests: an independent ONNX reference, a real uvicorn process, metrics.

reference_scores() maps raw ids to indices straight from the bundle's TSV files (line i is index
i + 2) and runs model.onnx in its own onnxruntime session: it shares no code with service/, so a
lookup bug there cannot hide behind the same bug here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from dinserve import processes

ROOT = Path(__file__).resolve().parents[1]


def _tokens(path: Path) -> dict[str, int]:
    lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line]
    return {line.split("\t")[0]: i + 2 for i, line in enumerate(lines)}


def reference_scores(
    bundle: Path,
    history: Sequence[str],
    candidates: Sequence[tuple[str, Sequence[str] | None]],
    profile: Mapping[str, str] | None = None,
    context: Mapping[str, str] | None = None,
) -> np.ndarray:
    """Scores from model.onnx run directly on indices computed from the vocabulary files."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    c = manifest["max_categories"]
    items = _tokens(bundle / manifest["vocabularies"]["items"]["file"])
    categories = _tokens(bundle / manifest["vocabularies"]["categories"]["file"])
    item_cats: dict[str, list[str]] = {}
    for line in (bundle / "items.tsv").read_text().split("\n"):
        if line:
            item, _, cats = line.partition("\t")
            item_cats[item] = [x for x in cats.split("|") if x]

    def cat_row(names: Sequence[str]) -> list[int]:
        row = [categories.get(n, 1) for n in list(names)[:c]]
        return row + [0] * (c - len(row))

    history = list(history)[: manifest["max_history_length"]]
    feeds: dict[str, np.ndarray] = {
        "history_items": np.array([items.get(h, 1) for h in history], dtype=np.int64),
        "history_categories": np.array(
            [cat_row(item_cats.get(h, [])) for h in history], dtype=np.int64
        ).reshape(len(history), c),
        "candidate_items": np.array([items.get(i, 1) for i, _ in candidates], dtype=np.int64),
        "candidate_categories": np.array(
            [cat_row(cats if cats is not None else item_cats.get(i, [])) for i, cats in candidates],
            dtype=np.int64,
        ).reshape(len(candidates), c),
    }
    for kind, values in (("user", profile or {}), ("context", context or {})):
        specs = manifest["features"].get(kind) or []
        if specs:
            row = []
            for spec in specs:
                vocab = _tokens(bundle / spec["vocabulary"])
                value = values.get(spec["name"])
                row.append(0 if value is None else vocab.get(value, 1))
            feeds[f"{kind}_features"] = np.array(row, dtype=np.int64)
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    (scores,) = session.run(["ctr"], feeds)
    return np.asarray(scores, dtype=np.float64)


def item_ids(bundle: Path) -> list[str]:
    return list(_tokens(bundle / "items.tsv"))


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, keyed by (name, sorted labels)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(text: str, metric_name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return metric_samples(text).get((metric_name, tuple(sorted(labels.items()))), 0.0)


class ServiceProcess:
    """`python -m service` on a free loopback port: a real uvicorn over real HTTP."""

    def __init__(self, model_dir: Path, redis_url: str, log_path: Path, **env: str) -> None:
        self.cwd = ROOT  # where the interpreter starts, so where `-m service` is found
        self.port = processes.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {**os.environ, **{f"CTR_{k.upper()}": v for k, v in env.items()}}
        self.argv = [sys.executable, "-m", "service", "--model-dir", str(model_dir),
                     "--redis-url", redis_url, "--host", "127.0.0.1", "--port", str(self.port)]
        self.process: subprocess.Popen[bytes] | None = None
        self.http = self.client()  # for the test's own thread; other threads make their own

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        log = self.log_path.open("ab")
        self.process = processes.spawn(self.argv, env=self.env, cwd=self.cwd, stdout=log,
                                       stderr=log)
        log.close()
        outcome = processes.wait_until_answering(self.process, f"{self.url}/healthz", timeout)
        if outcome == "ready":
            return self
        if outcome == "exited":
            raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log()}")
        self.stop()
        raise RuntimeError(f"service did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> int | None:
        if self.process is None:
            return None
        code = processes.stop(self.process, timeout=10.0)
        self.process = None
        self.http.close()
        return code

    def client(self) -> httpx.Client:
        """A keep-alive client; build it once, not per request (httpx loads CA certificates)."""
        return httpx.Client(base_url=self.url, timeout=10.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
