"""Process entry helper: run a service's async main until SIGTERM/SIGINT, then let it drain and exit.

The service's main receives a ``stop`` event; it finishes the batch in hand, flushes, commits and returns.

>>> import asyncio
>>> async def main(stop: asyncio.Event) -> None:
...     stop.set()
>>> run_until_signalled(main)
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` in a fresh event loop; SIGTERM and SIGINT set ``stop``."""

    async def runner() -> None:
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
