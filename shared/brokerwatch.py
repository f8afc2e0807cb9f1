"""Whether Kafka answers, for a service's ``/readyz``: one probe loop for every service.

While Kafka is down a consumer simply receives nothing and an idle producer sends nothing, so neither notices
the outage. :class:`BrokerWatch` asks the cluster for its metadata every ``interval_s``
(one small request on an admin connection); the broker is *lost* from the first probe that fails or does not
answer within ``timeout_s`` until one succeeds again. A failed connection is dropped and a fresh one opened on
the next probe, so the watch recovers by itself when the broker returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from bpstream.shared.service import Component
from bpstream.shared.settings import KafkaSettings

log = logging.getLogger(__name__)

#: One probe: raises (or hangs) while the broker is lost.
Probe = Callable[[], Awaitable[Any]]


class AdminProbe:
    """The default probe: ``describe_cluster`` on an admin client, replaced after a failure."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._admin: AIOKafkaAdminClient | None = None

    async def __call__(self) -> None:
        if self._admin is None:
            admin = AIOKafkaAdminClient(**self.settings.client_kwargs())
            try:
                await admin.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await admin.close()
                raise
            self._admin = admin
        await self._admin.describe_cluster()

    async def reset(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()


class BrokerWatch(Component):
    """Probes the broker in the background; ``ok`` is false while it is lost."""

    def __init__(self, probe: Probe, *, interval_s: float = 2.0, timeout_s: float = 5.0,
                 on_failure: Callable[[], Awaitable[None]] | None = None) -> None:
        self.probe, self.interval_s, self.timeout_s, self.on_failure = probe, interval_s, timeout_s, on_failure
        self.ok = True
        #: Monotonic time the broker was last lost (None while it answers).
        self.lost_since: float | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_kafka(cls, settings: KafkaSettings, **kwargs: Any) -> BrokerWatch:
        probe = AdminProbe(settings)
        return cls(probe, on_failure=probe.reset, **kwargs)

    async def check(self) -> bool:
        """Probe once and update ``ok``."""
        try:
            await asyncio.wait_for(self.probe(), self.timeout_s)
        except Exception as exc:  # any failure or a hang means the broker cannot serve us now
            if self.ok:
                log.warning("kafka broker lost", extra={"error": repr(exc)[:200]})
                self.lost_since = time.monotonic()
            self.ok = False
            if self.on_failure is not None:
                await self.on_failure()
            return False
        if not self.ok:
            log.info("kafka broker answers again",
                     extra={"lost_s": round(time.monotonic() - (self.lost_since or time.monotonic()), 1)})
        self.ok, self.lost_since = True, None
        return True

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.on_failure is not None:
            await self.on_failure()
