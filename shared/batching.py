"""Batches bounded by size and by maximum wait, shared by the inference and writer services.

``collect_batch`` keeps fetching until it holds ``max_size`` items or ``max_wait_s`` have passed since the
first item arrived (a lone message waits at most ``max_wait_s``; a burst leaves as soon as the batch is
full). It takes the fetch function and the clock as arguments, so it is tested without a broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

#: ``fetch(timeout_s, max_items)`` returns up to ``max_items`` items, waiting at most ``timeout_s``.
Fetch = Callable[[float, int], Awaitable[Sequence[T]]]


async def collect_batch(
    fetch: Fetch[T],
    *,
    max_size: int,
    max_wait_s: float,
    idle_poll_s: float = 0.5,
    stop: asyncio.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[T]:
    """Collect one batch: at most ``max_size`` items, at most ``max_wait_s`` after the first one.

    Returns an empty list after ``idle_poll_s`` without any item, or once ``stop`` is set, so the caller's
    loop can do periodic work (reload a model, report lag) and notice shutdown.
    """
    if max_size < 1:
        raise ValueError("max_size must be at least 1")
    batch: list[T] = []
    deadline: float | None = None
    while len(batch) < max_size:
        if stop is not None and stop.is_set() and not batch:
            break
        if deadline is None:
            timeout = idle_poll_s
        else:
            timeout = deadline - clock()
            if timeout <= 0:
                break
        items = await fetch(timeout, max_size - len(batch))
        if items:
            if deadline is None:
                deadline = clock() + max_wait_s
            batch.extend(items)
        elif deadline is None:
            break  # idle: hand control back to the caller
    return batch
