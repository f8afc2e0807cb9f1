"""Process entry helper and the shape of long-lived components.

``run_until_signalled`` runs a service's async main until SIGTERM/SIGINT, then lets it drain and exit: the
main receives a ``stop`` event; it finishes the batch in hand, flushes, commits and returns. ``Component`` is
the base of every long-lived part (Kafka clients, the health server, the bridge): explicit ``start`` and
``stop``, and usable as an async context manager that calls them.

>>> import asyncio
>>> async def main(stop: asyncio.Event) -> None:
...     stop.set()
>>> run_until_signalled(main)
"""

from __future__ import annotations

import asyncio
import signal
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self


class Component(ABC):
    """A long-lived component: ``start`` it, ``stop`` it, or use it as ``async with component:``."""

    @abstractmethod
    async def start(self) -> None:
        """Acquire connections and resources; raise if the component cannot work."""

    @abstractmethod
    async def stop(self) -> None:
        """Drain, flush and release everything ``start`` acquired."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` in a fresh event loop; SIGTERM and SIGINT set ``stop``. The process is tuned first
    (:mod:`bpstream.shared.process`: one BLAS thread, the garbage collector frozen after start-up)."""

    from bpstream.shared.process import freeze_after_startup, limit_blas_threads

    limit_blas_threads()

    async def runner() -> None:
        freeze_after_startup()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await main(stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    asyncio.run(runner())
