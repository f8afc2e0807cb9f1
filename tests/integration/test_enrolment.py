"""Enrolment by the simulator, against the real servers: the fleet's cuff readings travel over MQTT through the
bridge (a real process) to the ``cuff`` topic, and inference (a real process, fed by the real processor)
calibrates the estimates of the enrolled patients only.

One run, three patients of the same physiology (normotensive) and different cuff plans:

* ``normotensive``: enrolled at 10 s and re-calibrated every 30 s (readings at 10, 40, 70 s);
* ``stale_calibration``: enrolled at 10 s, never re-calibrated; inference runs with a 30 s maximum age here;
* ``missing_enrolment``: never enrolled.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import run_sync
from pipeline_support import SIMULATOR_MODEL, wait_until

from bpstream.demo.pipeline import Pipeline, PipelineConfig
from bpstream.localservers import ServerEndpoints
from bpstream.shared import influx_api
from bpstream.shared.kafka_tools import read_topic
from bpstream.shared.messages import CuffReading, Estimate, decode_cuff, decode_estimate
from bpstream.shared.topics import CUFF, ESTIMATES

pytestmark = pytest.mark.integration

SCENARIOS = ("normotensive", "stale_calibration", "missing_enrolment")
DURATION_S = 80.0
SPEED = 4.0
ENROL_AT_S = 10.0
RECALIBRATE_EVERY_S = 30.0
CALIBRATION_WINDOW_S = 10.0
MAX_AGE_S = 30.0
NS = 1_000_000_000
LOG_ROOT = Path(__file__).resolve().parents[2] / "reports" / "test-logs" / "enrolment"


@dataclass(slots=True)
class EnrolmentRun:
    devices: list[str]
    fleet: Any
    cuffs: list[CuffReading]
    estimates: dict[str, list[Estimate]]
    config: PipelineConfig


async def _run(servers: ServerEndpoints) -> EnrolmentRun:
    from bpstream.simulators.fleet import FleetConfig, mqtt_connection, run_fleet

    prefix = f"enrol{uuid.uuid4().hex[:6]}."
    tag = prefix.rstrip(".")
    config = PipelineConfig(servers=servers, topic_prefix=prefix, database=f"enrol_{uuid.uuid4().hex[:8]}",
        log_dir=LOG_ROOT / tag,
        service_env={"inference": {"BPSTREAM_INFERENCE_MODEL_PATH": str(SIMULATOR_MODEL),
                                   "BPSTREAM_INFERENCE_CALIBRATION_WINDOW_S": str(CALIBRATION_WINDOW_S),
                                   "BPSTREAM_INFERENCE_CALIBRATION_MAX_AGE_S": str(MAX_AGE_S)}})
    # Device clocks in the past: at 4x the device time would otherwise run ahead of the bridge's clock, which
    # refuses cuff readings from the future.
    fleet_cfg = FleetConfig(**mqtt_connection(servers.mqtt_settings("simulator")),
                            devices=len(SCENARIOS), duration_s=DURATION_S,
                            speed=SPEED, scenarios=SCENARIOS, seed=5, clinic_id=tag, device_prefix=f"{tag}-d",
                            start_time_ns=time.time_ns() - round(DURATION_S * NS), enrol=True,
                            enrol_at_s=ENROL_AT_S, recalibrate_every_s=RECALIBRATE_EVERY_S)
    async with Pipeline(config) as pipeline:
        await pipeline.start(("bridge", "processor", "inference"))
        fleet = await run_fleet(fleet_cfg)
        last_end = {d: max(t0 for _s, t0, _l in fleet.truth.chunks(d)) + NS for d in fleet.device_ids}

        async def all_estimated() -> dict[str, list[Estimate]]:
            found: dict[str, list[Estimate]] = {}
            for record in await read_topic(config.kafka(), ESTIMATES):
                estimate = decode_estimate(record.value or b"")
                found.setdefault(estimate.device_id, []).append(estimate)
            done = all(d in found and max(e.window_end_ns for e in found[d]) >= last_end[d] - 4 * NS
                       for d in fleet.device_ids)
            return found if done else {}

        estimates = await wait_until(all_estimated, timeout_s=300, what="the estimates of every window")
        cuffs = [decode_cuff(r.value or b"") for r in await read_topic(config.kafka(), CUFF)]
    by_device = {d: sorted({e.window_end_ns: e for e in rows}.values(), key=lambda e: e.window_end_ns)
                 for d, rows in estimates.items()}
    return EnrolmentRun(fleet.device_ids, fleet, [c for c in cuffs if c.clinic_id == tag], by_device, config)


@pytest.fixture(scope="module")
def run(servers: ServerEndpoints) -> Iterator[EnrolmentRun]:
    result = run_sync(lambda: _run(servers))
    yield result
    run_sync(lambda: influx_api.execute(
        result.config.influx(), f"DROP DATABASE {influx_api.quote_identifier(result.config.database)}"))


def test_the_fleets_cuff_readings_reach_the_cuff_topic_as_published(run: EnrolmentRun) -> None:
    enrolled, stale, missing = run.devices
    published = {(c.device_id, c.time_ns): (c.sbp, c.dbp) for c in run.fleet.truth.cuffs}
    arrived = {(c.device_id, c.time_ns): (c.sbp, c.dbp) for c in run.cuffs}
    assert arrived == published
    per_device = {d: sorted(t for dev, t in arrived if dev == d) for d in run.devices}
    start = {d: min(t0 for _s, t0, _l in run.fleet.truth.chunks(d)) for d in run.devices}
    # at 10, 40 and 70 s of device time, reported in whole seconds (so up to 1 s earlier)
    assert [math.ceil((t - start[enrolled]) / NS) for t in per_device[enrolled]] == [10, 40, 70]
    assert [math.ceil((t - start[stale]) / NS) for t in per_device[stale]] == [10]
    assert per_device[missing] == []
    # each reading is the true pressure it measured plus the simulated cuff's error
    for cuff in run.fleet.truth.cuffs:
        assert abs(cuff.sbp - cuff.true_sbp) < 5 * 5.0 and abs(cuff.dbp - cuff.true_dbp) < 5 * 5.0


def test_an_enrolled_patients_estimates_become_calibrated_on_its_readings(run: EnrolmentRun) -> None:
    enrolled = run.devices[0]
    cuffs = sorted(c.time_ns for c in run.fleet.truth.cuffs if c.device_id == enrolled)
    rows = [e for e in run.estimates[enrolled] if e.quality_ok]
    # before the enrolment reading's reference could be formed: uncalibrated
    assert all(e.mode == "uncalibrated" for e in rows if e.window_end_ns < cuffs[0])
    # once every window up to cuff + calibration window is scored: calibrated on one of the fleet's readings
    after = [e for e in rows if e.window_end_ns >= cuffs[0] + (CALIBRATION_WINDOW_S + 4) * NS]
    assert after and all(e.mode == "calibrated" and e.calibration_cuff_id == "sim-cuff" for e in after)
    assert {e.calibration_ns for e in after} <= set(cuffs)
    # the re-calibration at 40 s replaced the enrolment's calibration without a restart
    assert {e.calibration_ns for e in after} >= {cuffs[0], cuffs[1]}
    assert all(e.calibration_ns == cuffs[1] for e in after if e.window_end_ns >= cuffs[1] + 14 * NS
               and e.window_end_ns < cuffs[2])
    for e in after:
        assert e.sbp_lo is not None and e.sbp_hi is not None and e.sbp_lo < e.sbp < e.sbp_hi


def test_a_stale_calibration_is_withheld_and_a_missing_enrolment_stays_uncalibrated(run: EnrolmentRun) -> None:
    _, stale, missing = run.devices
    (cuff,) = [c.time_ns for c in run.fleet.truth.cuffs if c.device_id == stale]
    rows = [e for e in run.estimates[stale] if e.quality_ok]
    calibrated = [e for e in rows if e.mode == "calibrated"]
    assert calibrated and all(e.calibration_ns == cuff for e in calibrated)
    for e in calibrated:
        assert e.calibration_age_s is not None
        if e.calibration_age_s > MAX_AGE_S:  # withheld (an out-of-range input is named first when both hold)
            assert e.withheld in {"calibration_stale", "out_of_distribution"}
    assert any(e.withheld == "calibration_stale" for e in calibrated)
    never = run.estimates[missing]
    assert never and all(e.mode == "uncalibrated" and e.calibration_ns is None and e.calibration_age_s is None
                         for e in never)
    assert not any(e.withheld == "calibration_stale" for e in never)
