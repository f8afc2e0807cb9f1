"""Capped, jittered exponential backoff that retries only errors marked retriable."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bpstream.shared.errors import BpstreamError

T = TypeVar("T")
log = logging.getLogger(__name__)


def backoff_delays(attempts: int, base_s: float = 0.1, cap_s: float = 5.0,
                   rng: random.Random | None = None) -> list[float]:
    """Full-jitter delays: attempt k waits uniform(0, min(cap, base * 2**k))."""
    rand = rng or random.Random()
    return [rand.uniform(0.0, min(cap_s, base_s * 2**k)) for k in range(attempts)]


async def retry_async(
    operation: Callable[[], Awaitable[T]],
    *,
    attempts: int = 5,
    base_s: float = 0.1,
    cap_s: float = 5.0,
    what: str = "operation",
) -> T:
    """Run ``operation``; on a retriable ``BpstreamError`` wait and try again, at most ``attempts`` times."""
    delays = backoff_delays(attempts - 1, base_s, cap_s)
    for attempt in range(attempts):
        try:
            return await operation()
        except BpstreamError as exc:
            if not exc.retriable or attempt == attempts - 1:
                raise
            delay = delays[attempt]
            log.warning("retrying", extra={"what": what, "attempt": attempt + 1, "reason": exc.reason,
                                           "delay_s": round(delay, 3)})
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
