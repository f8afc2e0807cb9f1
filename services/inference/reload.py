"""Model hot reload: watch a models root and swap to a newer complete version between batches.

The watcher only notices a version once its ``metadata.json`` exists (the exporter writes it last), loads it
in a worker thread while the old model keeps scoring, and the service swaps models only between batches:
every window is scored exactly once, by the model named in its estimate's ``model_version``.
A version that fails to load is logged, counted and not retried, and the old model stays in service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from bpstream.shared.errors import ModelError
from bpstream.shared.model.runtime import BpModel, latest_model_dir

log = logging.getLogger(__name__)

#: ``load(version_dir) -> BpModel`` (``bpstream.shared.model.runtime.load_model`` with runtime and device bound).
Loader = Callable[[Path], BpModel]


class ModelManager:
    """Holds the model in service and a newer one being loaded, if any."""

    def __init__(self, source: Path, loader: Loader, *, poll_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source, self.loader, self.poll_s, self.clock = Path(source), loader, poll_s, clock
        self.model: BpModel = loader(latest_model_dir(self.source))
        self.failed: set[Path] = set()
        self.reloads = 0
        self._next_poll = clock() + poll_s
        self._loading: asyncio.Task[BpModel] | None = None
        self._loading_dir: Path | None = None

    @property
    def version(self) -> str:
        return self.model.version

    def newer_version(self) -> Path | None:
        """The newest complete version folder if it differs from the one in service (and did not fail)."""
        try:
            latest = latest_model_dir(self.source)
        except ModelError as exc:
            log.warning("cannot list model versions", extra={"reason": exc.reason})
            return None
        if latest.resolve() == Path(self.model.directory).resolve() or latest in self.failed:
            return None
        return latest

    def poll(self, *, force: bool = False) -> None:
        """Start loading a newer version in a worker thread when one appeared (at most every ``poll_s``)."""
        if self.poll_s <= 0 and not force:
            return
        if self._loading is not None or (not force and self.clock() < self._next_poll):
            return
        self._next_poll = self.clock() + self.poll_s
        candidate = self.newer_version()
        if candidate is not None:
            log.info("loading new model version", extra={"path": str(candidate)})
            self._loading_dir = candidate
            self._loading = asyncio.create_task(asyncio.to_thread(self.loader, candidate))

    def swap_if_ready(self) -> bool:
        """Between batches: put a finished new model into service. True when the model changed."""
        task = self._loading
        if task is None or not task.done():
            return False
        self._loading = None
        directory, self._loading_dir = self._loading_dir, None
        try:
            model = task.result()
        except Exception as exc:  # a broken artefact must not take the service down
            assert directory is not None
            self.failed.add(directory)
            log.error("new model version failed to load; keeping the current one",
                      extra={"path": str(directory), "error": repr(exc)[:300]})
            return False
        old = self.model.version
        self.model = model
        self.reloads += 1
        log.info("model swapped", extra={"from_version": old, "to_version": model.version})
        return True

    async def wait_loaded(self) -> bool:
        """Wait for a load in progress and swap (for tests and an orderly start)."""
        if self._loading is not None:
            with contextlib.suppress(Exception):
                await self._loading
        return self.swap_if_ready()

