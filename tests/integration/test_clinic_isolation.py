"""Two clinics' devices with the same id through the whole pipeline on the real servers: nothing mixes.

Clinic A's ``dup-000`` goes into crisis, clinic B's ``dup-000`` stays normotensive; both start at the same device
time with the same sequence numbers, so state keyed by device id alone would take B's chunks for duplicates of
A's (or mix their windows and alert episodes). Each clinic must get exactly its own windows and alerts.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_sync
from pipeline_support import pipeline_config

from bpstream.demo.pipeline import Pipeline, stored_alerts, stored_estimates
from bpstream.localservers import ServerEndpoints
from bpstream.shared import influx_api
from bpstream.shared.modelspec import HOP_SECONDS

pytestmark = pytest.mark.integration

NS = 1_000_000_000
LOG_ROOT = Path(__file__).resolve().parents[2] / "reports" / "test-logs"


async def _run(servers: ServerEndpoints) -> dict[str, Any]:
    from bpstream.simulators.fleet import FleetConfig, mqtt_connection, run_fleet

    prefix = f"iso{uuid.uuid4().hex[:6]}."
    tag = prefix.rstrip(".")
    config = pipeline_config(servers, tag, LOG_ROOT / "isolation" / tag)
    clinics = {"a": f"{tag}-a", "b": f"{tag}-b"}
    common = dict(**mqtt_connection(servers.mqtt_settings("simulator")), devices=1, duration_s=70.0, speed=2.0,
                  seed=11, start_time_ns=time.time_ns(), crisis_onset_s=10.0, device_prefix="dup")
    async with Pipeline(config) as pipeline:
        await pipeline.start()
        reports = await asyncio.gather(
            run_fleet(FleetConfig(**common, clinic_id=clinics["a"], scenarios=("crisis",))),  # type: ignore[arg-type]
            run_fleet(FleetConfig(**common, clinic_id=clinics["b"],  # type: ignore[arg-type]
                                  scenarios=("normotensive",))))
        await pipeline.wait_drained(min_raw=sum(r.published for r in reports), key_prefixes=("dup",), timeout_s=600)
        await asyncio.sleep(3)
        out = {"config": config, "reports": dict(zip("ab", reports, strict=True)),
               "estimates": {k: await stored_estimates(config, c) for k, c in clinics.items()},
               "alerts": {k: await stored_alerts(config, c) for k, c in clinics.items()}}
    return out


@pytest.fixture(scope="module")
def isolated(servers: ServerEndpoints) -> Any:
    result = run_sync(lambda: _run(servers))
    yield result
    run_sync(lambda: influx_api.execute(
        result["config"].influx(), f"DROP DATABASE {influx_api.quote_identifier(result['config'].database)}"))


def test_each_clinic_gets_every_window_of_its_own_device_once(isolated: dict[str, Any]) -> None:
    for clinic in "ab":
        rows = isolated["estimates"][clinic]
        assert {r["device"] for r in rows} == {"dup-000"}
        ends = sorted(int(r["time"]) for r in rows)
        assert len(ends) >= 25 and set(np.diff(ends)) == {int(HOP_SECONDS * NS)}, clinic


def test_alerts_stay_with_their_clinic(isolated: dict[str, Any]) -> None:
    raised = [a for a in isolated["alerts"]["a"] if a["kind"] == "crisis" and a["state"] == "raised"]
    assert len(raised) == 1
    assert not isolated["alerts"]["b"], isolated["alerts"]["b"]
    # The two devices' pressures differ: B's estimates were not computed from A's signal.
    mean = {c: float(np.mean([r["sbp"] for r in isolated["estimates"][c][-10:] if r.get("quality_ok")]))
            for c in "ab"}
    assert mean["a"] > mean["b"] + 20, mean
