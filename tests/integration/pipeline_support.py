"""Helpers for the pipeline's integration tests: InfluxDB queries, Kafka produce/consume, waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from bpstream.shared import influx_api
from bpstream.shared.settings import InfluxSettings

T = TypeVar("T")

#: A model version trained on simulated signals, whose accuracy there is known (its metadata holds it). The
#: pipeline tests check delivery, estimates and alerts against the simulator's ground truth with it. The product
#: model in models/ is trained on real ICU recordings and does not track the simulator's pressures (its pulse
#: shapes are not real ones): see docs/MODEL_CARD.md.
SIMULATOR_MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "models" / "bp-resnet-lstm" / \
    "20261125-205508-85543a"


async def influx_query(url: str, database: str, query: str) -> list[dict[str, Any]]:
    """Rows of an InfluxQL query as dicts (all series concatenated, tags merged in), through influxdb-client."""
    return await influx_api.query_rows(InfluxSettings(url=url, database=database), query, timeout_s=30)


async def wait_until(check: Callable[[], Awaitable[T]], *, timeout_s: float, what: str,
                     interval_s: float = 1.0) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after a generous deadline."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; last value: {last!r}")


