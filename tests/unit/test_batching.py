"""Batches bounded by size and by maximum wait (used by inference and the writer)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from bpstream.shared.batching import collect_batch

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Source:
    """Delivers scripted arrivals: ``(time, items)``; a fetch advances the clock to the next arrival."""

    def __init__(self, clock: FakeClock, arrivals: list[tuple[float, list[int]]]) -> None:
        self.clock, self.arrivals = clock, arrivals
        self.timeouts: list[float] = []

    async def fetch(self, timeout_s: float, max_items: int) -> Sequence[int]:
        self.timeouts.append(timeout_s)
        if self.arrivals and self.arrivals[0][0] <= self.clock.now + timeout_s:
            at, items = self.arrivals[0]
            self.clock.now = max(self.clock.now, at)
            taken, rest = items[:max_items], items[max_items:]
            if rest:
                self.arrivals[0] = (at, rest)
            else:
                self.arrivals.pop(0)
            return taken
        self.clock.now += timeout_s
        return []


async def test_full_batch_leaves_without_waiting() -> None:
    clock = FakeClock()
    source = Source(clock, [(0.0, list(range(10)))])
    batch = await collect_batch(source.fetch, max_size=4, max_wait_s=1.0, clock=clock)
    assert batch == [0, 1, 2, 3]
    assert clock.now == 0.0


async def test_partial_batch_leaves_after_max_wait_from_first_item() -> None:
    clock = FakeClock()
    source = Source(clock, [(0.1, [1]), (0.3, [2]), (5.0, [3])])
    batch = await collect_batch(source.fetch, max_size=100, max_wait_s=0.5, clock=clock)
    assert batch == [1, 2]
    assert clock.now == pytest.approx(0.6)


async def test_idle_poll_returns_empty_so_the_caller_can_do_periodic_work() -> None:
    clock = FakeClock()
    source = Source(clock, [])
    assert await collect_batch(source.fetch, max_size=10, max_wait_s=0.5, idle_poll_s=0.25, clock=clock) == []
    assert source.timeouts == [0.25]


async def test_zero_wait_takes_what_is_there() -> None:
    clock = FakeClock()
    source = Source(clock, [(0.0, [1, 2]), (0.0, [3])])
    assert await collect_batch(source.fetch, max_size=10, max_wait_s=0.0, clock=clock) == [1, 2]
