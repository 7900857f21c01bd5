"""Hot reload: the reference to the serving model, and the only code that replaces it.

ModelHolder.model is read once per request and kept by that request, so a swap never changes the
model under a request already running: it finishes on the object it started with, and the old
session is freed when the last such request drops it. A new bundle is loaded, checked, self-tested
and warmed up in a worker thread, off the event loop and off the request path; only then is the
one attribute reassigned (a single store, atomic for every reader on the loop).

Triggers: a poll of the model directory every `reload_poll_seconds` (a newer version, or a
different one after the newest was removed: a rollback by deletion) and POST /admin/reload. A
bundle that fails its checks is refused, the old model keeps serving, and the failure is logged
and counted once: the poller remembers the rejected bundle's file signature and only tries it again
when its files change.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio.to_thread

from service.config import Settings
from service.errors import BundleRejected
from service.metrics import Metrics
from service.model import CTRModel, bundle_signature, locate_bundle

logger = logging.getLogger(__name__)

Outcome = Literal["loaded", "unchanged"]


@dataclass(frozen=True)
class ReloadResult:
    outcome: Outcome
    version: str
    previous: str


class ModelHolder:
    """Owns the serving CTRModel and swaps it for a newer verified one."""

    def __init__(self, model: CTRModel, settings: Settings, metrics: Metrics) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._rejected: dict[Path, tuple[tuple[str, int, int], ...]] = {}
        self._last_problem: str | None = None
        metrics.set_model(model.name, model.version)

    async def reload(self, force: bool = False) -> ReloadResult:
        """Serve the latest bundle under the model dir if it differs; BundleRejected if it fails.

        force re-loads even the bundle already serving, or one rejected before.
        """
        async with self._lock:  # one load at a time; a second caller waits and sees the result
            current = self.model
            try:
                target = locate_bundle(self.settings.model_dir)
            except BundleRejected as exc:
                self._reject_once(str(exc))
                raise
            if target == current.directory and not force:
                return ReloadResult("unchanged", current.version, current.version)
            signature = bundle_signature(target)
            if not force and self._rejected.get(target) == signature:
                # Judged already and unchanged since: keep quiet, keep serving.
                raise BundleRejected(
                    f"{target} was refused before and has not changed; still serving version "
                    f"{current.version}"
                )
            try:
                loaded = await anyio.to_thread.run_sync(CTRModel.load, target, self.settings)
            except BundleRejected as exc:
                self._rejected[target] = signature
                self.metrics.reloads.labels("rejected").inc()
                self._reject_once(f"{exc}")
                raise BundleRejected(
                    f"{exc.message}; still serving version {current.version}"
                ) from exc
            self.model = loaded
            self._rejected.pop(target, None)
            self._last_problem = None
            self.metrics.reloads.labels("loaded").inc()
            self.metrics.set_model(loaded.name, loaded.version)
            logger.info(
                "model reloaded: %s version %s -> %s (%s)",
                loaded.name,
                current.version,
                loaded.version,
                loaded.directory,
            )
            return ReloadResult("loaded", loaded.version, current.version)

    async def poll(self, interval_seconds: float) -> None:
        """Run until cancelled: every interval, load the latest bundle if it is a new one."""
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.reload()
            except BundleRejected:
                pass  # logged and counted by reload(); the old model keeps serving
            except Exception:  # a bug here must not end polling for the life of the process
                logger.exception("model reload poll failed")

    def _reject_once(self, problem: str) -> None:
        if problem != self._last_problem:
            logger.error("model reload refused, old model keeps serving: %s", problem)
            self._last_problem = problem
