"""Helpers for the pipeline's integration tests: a run's configuration, InfluxDB queries, waiting."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from bpstream.demo.pipeline import PipelineConfig
from bpstream.localservers import ServerEndpoints
from bpstream.shared import influx_api
from bpstream.shared.settings import InfluxSettings

T = TypeVar("T")

#: A model version trained on simulated signals, whose accuracy there is known (its metadata holds it). The
#: pipeline tests check delivery, estimates and alerts against the simulator's ground truth with it. The product
#: model in models/ is trained on real ICU recordings and does not track the simulator's pressures (its pulse
#: shapes are not real ones): see docs/MODEL_CARD.md.
SIMULATOR_MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "models" / "bp-resnet-lstm" / \
    "20261125-205508-85543a"


def pipeline_config(servers: ServerEndpoints, tag: str, log_dir: Path, *, env: dict[str, str] | None = None,
                    service_env: dict[str, dict[str, str]] | None = None) -> PipelineConfig:
    """A pipeline run of its own: topic prefix ``<tag>.``, a fresh database, inference pinned to
    :data:`SIMULATOR_MODEL` (a version rolled out during the run must not change the results compared), each
    service with its own users on the secured servers."""
    per_service: dict[str, dict[str, str]] = {"inference": {"BPSTREAM_INFERENCE_MODEL_PATH": str(SIMULATOR_MODEL)}}
    for name, values in (service_env or {}).items():
        per_service.setdefault(name, {}).update(values)
    return PipelineConfig(servers=servers, topic_prefix=f"{tag}.", database=f"{tag}_{uuid.uuid4().hex[:8]}",
                          env=dict(env or {}), service_env=per_service, log_dir=log_dir)


async def influx_query(settings: InfluxSettings, query: str) -> list[dict[str, Any]]:
    """Rows of an InfluxQL query on ``settings``' database as dicts (all series concatenated, tags merged in)."""
    return await influx_api.query_rows(settings, query, timeout_s=30)


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


