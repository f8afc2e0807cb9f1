"""Capped, jittered exponential backoff that retries only errors marked retriable: the one backoff formula of
bpstream (Kafka commits and sends, topic creation, InfluxDB writes, notifications, the shared consumer loop).

Attempt ``k`` (from 0) waits ``uniform(0, min(cap, base * 2**k))`` ("full jitter"). ``retry_async`` gives up
after ``attempts`` tries, or, with ``attempts=None``, keeps trying until its ``stop`` event is set and then
raises ``StoppedError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bpstream.shared.errors import BpstreamError, StoppedError

T = TypeVar("T")
log = logging.getLogger(__name__)


def backoff_delay(attempt: int, base_s: float = 0.1, cap_s: float = 5.0, rng: random.Random | None = None) -> float:
    """Full-jitter delay of attempt ``attempt`` (0-based): uniform(0, min(cap, base * 2**attempt))."""
    return (rng or random).uniform(0.0, min(cap_s, base_s * 2 ** min(attempt, 30)))


def backoff_delays(attempts: int, base_s: float = 0.1, cap_s: float = 5.0,
                   rng: random.Random | None = None) -> list[float]:
    """The delays of ``attempts`` consecutive attempts (``backoff_delay`` for k = 0, 1, ...)."""
    rand = rng or random.Random()
    return [backoff_delay(k, base_s, cap_s, rand) for k in range(attempts)]


async def retry_async(
    operation: Callable[[], Awaitable[T]],
    *,
    attempts: int | None = 5,
    base_s: float = 0.1,
    cap_s: float = 5.0,
    what: str = "operation",
    stop: asyncio.Event | None = None,
    on_failure: Callable[[BpstreamError], None] | None = None,
) -> T:
    """Run ``operation``; on a retriable ``BpstreamError`` wait and try again.

    At most ``attempts`` tries (the last error is raised), or without limit when ``attempts`` is None. Once
    ``stop`` is set a retriable failure raises ``StoppedError`` instead of waiting (and ``stop`` cuts a wait
    short). ``on_failure`` sees every retriable failure first (to mark a dependency unavailable, or to raise a
    different error for one that retrying cannot fix).
    """
    attempt = 0
    while True:
        try:
            return await operation()
        except BpstreamError as exc:
            if not exc.retriable:
                raise
            if on_failure is not None:
                on_failure(exc)
            if attempts is not None and attempt >= attempts - 1:
                raise
            if stop is not None and stop.is_set():
                raise StoppedError(f"stopped while retrying {what}") from exc
            delay = backoff_delay(attempt, base_s, cap_s)
            log.warning("retrying", extra={"what": what, "attempt": attempt + 1, "reason": exc.reason,
                                           "delay_s": round(delay, 3)})
            attempt += 1
            if stop is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
