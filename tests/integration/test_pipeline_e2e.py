"""The whole pipeline on the real local servers, driven by the simulator (one run shared by these tests).

Two fleets stream the same simulated patients (same seed and start time) through bridge -> processor ->
inference -> alerting -> writer: fleet ``clean`` over a perfect network, fleet ``rough`` with duplicated and
reordered chunks. Meanwhile malformed payloads are published on a device topic. Each test then checks one
promise against what InfluxDB and Kafka hold.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_sync
from pipeline_support import SIMULATOR_MODEL, pipeline_config

from bpstream.demo.pipeline import Pipeline, PipelineConfig, by_device, stored_alerts, stored_estimates
from bpstream.localservers import ServerEndpoints
from bpstream.shared import influx_api
from bpstream.shared.anomaly import AlertConfig
from bpstream.shared.kafka_tools import read_topic
from bpstream.shared.messages import decode_dead_letter
from bpstream.shared.model.metadata import ModelMetadata
from bpstream.shared.modelspec import HOP_SECONDS, WINDOW_SECONDS
from bpstream.shared.mqtt import configure_client
from bpstream.shared.settings import MqttSettings
from bpstream.shared.topics import SIGNALS_DLQ, mqtt_signals_topic

pytestmark = pytest.mark.integration

SCENARIOS = ("crisis", "normotensive", "normotensive", "stage2")
DURATION_S = 100.0
SPEED = 2.0
CRISIS_ONSET_S = 30.0
NS = 1_000_000_000
#: Service logs of these runs (kept after the test for diagnosis; ``reports/`` is git-ignored).
LOG_ROOT = Path(__file__).resolve().parents[2] / "reports" / "test-logs"
MALFORMED = (b"", b"BP", b"hello, not a chunk", b"BP\x01" + bytes(60))


@dataclass(slots=True)
class RunResult:
    config: PipelineConfig
    clinics: dict[str, str]
    fleets: dict[str, Any]
    estimates: dict[str, dict[str, list[dict[str, Any]]]]
    alerts: dict[str, list[dict[str, Any]]]
    dead_letters: list[Any]
    start_ns: int


async def _publish_malformed(settings: MqttSettings, clinic: str) -> None:
    import paho.mqtt.client as mqtt

    def publish() -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"malformed-{uuid.uuid4().hex[:6]}",
                             protocol=mqtt.MQTTv5)
        configure_client(client, settings)
        client.connect(settings.host, settings.port)
        client.loop_start()
        try:
            for payload in MALFORMED:
                client.publish(mqtt_signals_topic(clinic, "broken-dev"), payload, qos=1).wait_for_publish(30)
        finally:
            client.loop_stop()
            client.disconnect()

    await asyncio.sleep(10)  # mid-stream
    await asyncio.to_thread(publish)


async def _run(servers: ServerEndpoints, log_dir: Path) -> RunResult:
    from bpstream.simulators.fleet import FleetConfig, mqtt_connection, run_fleet

    prefix = f"e2e{uuid.uuid4().hex[:6]}."
    config = pipeline_config(servers, prefix.rstrip("."), log_dir / prefix.rstrip("."))
    tag = prefix.rstrip(".")
    clinics = {"clean": f"{tag}-clean", "rough": f"{tag}-rough"}
    start_ns = time.time_ns()
    common = dict(**mqtt_connection(servers.mqtt_settings("simulator")), devices=len(SCENARIOS),
                  duration_s=DURATION_S, speed=SPEED, scenarios=SCENARIOS, seed=11, start_time_ns=start_ns,
                  crisis_onset_s=CRISIS_ONSET_S)
    clean = FleetConfig(**common, clinic_id=clinics["clean"], device_prefix=f"{tag}-c")  # type: ignore[arg-type]
    # The rough clinic's devices send through two gateways (ChunkBatch messages of up to 4 chunks), so its chunks
    # reach the processor as the bridge's per-partition batch records, duplicates and reordering included.
    rough = FleetConfig(**common, clinic_id=clinics["rough"], device_prefix=f"{tag}-r",  # type: ignore[arg-type]
                        duplicate_rate=0.1, reorder_rate=0.1, connections=2, gateway_batch=4)
    async with Pipeline(config) as pipeline:
        await pipeline.start()
        reports = await asyncio.gather(run_fleet(clean), run_fleet(rough),
                                       _publish_malformed(servers.mqtt_settings("simulator"), clinics["clean"]))
        fleets = {"clean": reports[0], "rough": reports[1]}
        published = sum(f.published for f in fleets.values())
        await pipeline.wait_drained(min_raw=published, key_prefixes=(f"{tag}-c", f"{tag}-r"), timeout_s=600)
        await asyncio.sleep(3)  # the writer's last batch and pipeline sample
        estimates = {name: dict(by_device(await stored_estimates(config, clinic))) for name, clinic in clinics.items()}
        alerts = {name: await stored_alerts(config, clinic) for name, clinic in clinics.items()}
        dead = [decode_dead_letter(r.value or b"") for r in await read_topic(config.kafka(), SIGNALS_DLQ)]
    return RunResult(config, clinics, fleets, estimates, alerts, dead, start_ns)


@pytest.fixture(scope="module")
def run(servers: ServerEndpoints) -> Iterator[RunResult]:
    result = run_sync(lambda: _run(servers, LOG_ROOT / "e2e"))
    yield result
    run_sync(lambda: influx_api.execute(
        result.config.influx(), f"DROP DATABASE {influx_api.quote_identifier(result.config.database)}"))


def _window_ends(rows: list[dict[str, Any]]) -> list[int]:
    return sorted(int(r["time"]) for r in rows)


def test_every_window_of_every_patient_is_estimated_once(run: RunResult) -> None:
    for name, fleet in run.fleets.items():
        assert set(run.estimates[name]) == set(fleet.device_ids), name
        for device, rows in run.estimates[name].items():
            ends = _window_ends(rows)
            first_t0 = min(t0 for _seq, t0, _label in fleet.truth.chunks(device))
            last_end = max(t0 for _seq, t0, _label in fleet.truth.chunks(device)) + NS
            assert set(np.diff(ends)) == {int(HOP_SECONDS * NS)}, f"{device}: missing or extra windows"
            assert ends[0] - first_t0 <= (WINDOW_SECONDS + HOP_SECONDS) * NS
            assert last_end - ends[-1] <= 2 * HOP_SECONDS * NS
            assert all(r["model_version"] for r in rows)


def test_crisis_patient_raises_exactly_one_crisis_alert_within_budget_and_normal_patients_none(
        run: RunResult) -> None:
    config = AlertConfig()
    # Budget in device time after the true pressure crosses the crisis threshold: a window to fill, the
    # smoothing median to turn, then `persistence` consecutive windows.
    budget_ns = int((WINDOW_SECONDS + (config.persistence + config.smoothing_windows) * HOP_SECONDS) * NS)
    for name, fleet in run.fleets.items():
        by_scenario = dict(zip(fleet.device_ids, SCENARIOS, strict=True))
        crisis_device = next(d for d, s in by_scenario.items() if s == "crisis")
        crisis = [a for a in run.alerts[name] if a["device"] == crisis_device and a["kind"] == "crisis"]
        raised = [a for a in crisis if a["state"] == "raised"]
        assert len({a["alert_id"] for a in crisis}) == 1 and len(raised) == 1, crisis
        assert raised[0]["severity"] == "critical"
        beat_t, beat_sbp, beat_dbp = fleet.truth.beats(crisis_device)
        crossed = beat_t[(beat_sbp > 180.0) | (beat_dbp > 120.0)]
        assert len(crossed), "the simulated crisis never crossed 180/120"
        assert int(raised[0]["time"]) - int(crossed[0]) <= budget_ns
        for device, scenario in by_scenario.items():
            if scenario == "normotensive":
                assert not [a for a in run.alerts[name] if a["device"] == device], device


def test_estimates_track_ground_truth_within_the_validated_error(run: RunResult) -> None:
    fleet = run.fleets["clean"]
    versions = {str(r["model_version"]) for rows in run.estimates["clean"].values() for r in rows}
    assert len(versions) == 1, versions
    # The validated error of the version that produced these estimates (a newer one may have been committed).
    metadata = ModelMetadata.read(SIMULATOR_MODEL.parent / versions.pop())
    validated = metadata.validation_metrics["calibration_free"]
    errors: dict[str, list[float]] = {"sbp": [], "dbp": []}
    for device, rows in run.estimates["clean"].items():
        for row in rows:
            if not row.get("quality_ok"):
                continue
            end = int(row["time"])
            true_sbp, true_dbp = fleet.truth.between(device, end - int(WINDOW_SECONDS * NS), end)
            if math.isfinite(true_sbp):
                errors["sbp"].append(abs(float(row["sbp"]) - true_sbp))
                errors["dbp"].append(abs(float(row["dbp"]) - true_dbp))
    for key in ("sbp", "dbp"):
        assert len(errors[key]) > 0.8 * sum(len(r) for r in run.estimates["clean"].values())
        mae = float(np.mean(errors[key]))
        # Same model, other (simulated) subjects and a few hundred windows: allow the sampling spread.
        allowed = 1.5 * float(validated[key]["mae"]) + 2.0
        assert mae <= allowed, f"{key} MAE {mae:.1f} mmHg > {allowed:.1f} (validated {json.dumps(validated[key])})"


def test_duplicated_and_reordered_chunks_do_not_change_the_results(run: RunResult) -> None:
    clean, rough = run.estimates["clean"], run.estimates["rough"]
    for i in range(len(SCENARIOS)):
        c_rows = sorted(clean[run.fleets["clean"].device_ids[i]], key=lambda r: int(r["time"]))
        r_rows = sorted(rough[run.fleets["rough"].device_ids[i]], key=lambda r: int(r["time"]))
        assert [int(r["time"]) for r in c_rows] == [int(r["time"]) for r in r_rows]
        for c, r in zip(c_rows, r_rows, strict=True):
            assert c["quality_ok"] == r["quality_ok"]
            if c["quality_ok"]:
                assert abs(c["sbp"] - r["sbp"]) < 0.05 and abs(c["dbp"] - r["dbp"]) < 0.05
    strip = lambda rows: sorted((a["kind"], a["state"], int(a["time"])) for a in rows)  # noqa: E731
    assert strip(run.alerts["clean"]) == strip(run.alerts["rough"])
    assert sum(len(v) for v in run.fleets["rough"].duplicates.values()) > 0
    assert sum(len(v) for v in run.fleets["rough"].reordered.values()) > 0


def test_malformed_payloads_land_in_the_dlq_while_the_stream_goes_on(run: RunResult) -> None:
    ours = [d for d in run.dead_letters if d.stage == "bridge" and "broken-dev" in d.source]
    assert sorted(d.payload for d in ours) == sorted(MALFORMED)
    assert all(d.reason for d in ours)
    # The stream went on: the clean fleet's windows are all there (checked in detail above).
    assert len(run.estimates["clean"]) == len(SCENARIOS)
