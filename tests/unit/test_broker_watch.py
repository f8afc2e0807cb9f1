"""The processor's broker watch, without Kafka: lost from the first failed or hanging probe, back by itself
at the first probe that answers (the Kafka outage itself is in test_broker_faults.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from bpstream.shared.brokerwatch import BrokerWatch

pytestmark = pytest.mark.unit


class FlakyBroker:
    def __init__(self) -> None:
        self.mode = "up"
        self.resets = 0

    async def probe(self) -> None:
        if self.mode == "down":
            raise ConnectionRefusedError("broker down")
        if self.mode == "hang":
            await asyncio.Event().wait()

    async def reset(self) -> None:
        self.resets += 1


def test_lost_while_probes_fail_or_hang_and_ready_again_by_itself() -> None:
    async def scenario() -> list[bool]:
        broker = FlakyBroker()
        watch = BrokerWatch(broker.probe, interval_s=0.01, timeout_s=0.05, on_failure=broker.reset)
        seen = []
        for mode in ("up", "down", "down", "hang", "up", "up"):
            broker.mode = mode
            await watch.check()
            seen.append(watch.ok)
        assert broker.resets == 3
        return seen

    assert asyncio.run(scenario()) == [True, False, False, False, True, True]


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never met")


def test_the_background_loop_follows_the_broker() -> None:
    async def scenario() -> None:
        broker = FlakyBroker()
        async with BrokerWatch(broker.probe, interval_s=0.01, timeout_s=0.05) as watch:
            broker.mode = "down"
            await _until(lambda: not watch.ok)
            assert watch.lost_since is not None
            broker.mode = "up"
            await _until(lambda: watch.ok)
            assert watch.lost_since is None

    asyncio.run(asyncio.wait_for(scenario(), 10))
