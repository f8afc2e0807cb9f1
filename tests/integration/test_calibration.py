"""Cuff calibration in the live system, against the real Mosquitto and Kafka: a reading sent over MQTT (the
bridge as a real process) and one sent with ``bpstream calibrate`` each recalibrate the next estimates of their
own device only, and the calibrations survive an inference restart (``calibration.state`` + ``cuff``)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pipeline_support import SIMULATOR_MODEL, wait_until
from test_bridge import BridgeProcess, Publisher

from bpstream.localservers import ServerEndpoints
from bpstream.services.inference.service import run_inference
from bpstream.services.inference.settings import InferenceSettings
from bpstream.shared.kafka import KafkaProducer
from bpstream.shared.kafka_tools import read_latest_by_key, read_topic
from bpstream.shared.messages import Estimate, Window, decode_calibration, decode_estimate, encode_window
from bpstream.shared.model.calibration import IntervalSpec
from bpstream.shared.model.metadata import ModelMetadata
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import CALIBRATION_STATE, ESTIMATES, WINDOWS, mqtt_cuff_topic

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]
HOP = 2 * 10**9
#: Window times near now: the bridge refuses cuff readings far from its clock.
T0 = (time.time_ns() // HOP) * HOP - 600 * 10**9


def _window(clinic: str, device: str, i: int) -> Window:
    rng = np.random.default_rng(hash((device, i)) % 2**32)
    samples = rng.standard_normal((2, 1000)).astype("<f4")
    return Window(clinic_id=clinic, device_id=device, start_ns=T0 + i * HOP - 8 * 10**9, end_ns=T0 + i * HOP,
                  sample_rate=125.0, channels=("ecg", "ppg"), n_samples=1000, samples=samples.tobytes(),
                  sqi={"ecg": 0.9, "ppg": 0.9}, quality_ok=True, heart_rate_bpm=70.0, received_ns=T0 + i * HOP)


async def _produce(kafka: KafkaSettings, clinic: str, devices: list[str], windows: range) -> None:
    async with KafkaProducer(kafka) as producer:
        await producer.send_many([(WINDOWS, encode_window(_window(clinic, d, i)), d)
                                  for i in windows for d in devices])


async def _estimates(kafka: KafkaSettings, n: int) -> dict[tuple[str, int], Estimate]:
    async def check() -> dict[tuple[str, int], Estimate]:
        found = {(e.device_id, e.window_end_ns): e
                 for e in (decode_estimate(r.value or b"") for r in await read_topic(kafka, ESTIMATES))}
        return found if len(found) >= n else {}

    return await wait_until(check, timeout_s=180, what=f"{n} estimates")


async def _calibrated(kafka: KafkaSettings, key: str, cuff_id: str) -> None:
    async def check() -> bool:
        saved = await read_latest_by_key(kafka, CALIBRATION_STATE)
        return key in saved and decode_calibration(saved[key]).cuff_id == cuff_id

    await wait_until(check, timeout_s=120, what=f"the calibration of {key} from {cuff_id}")


@pytest.fixture
def bridge(bridge_env: dict[str, str], tmp_path: Path) -> Iterator[BridgeProcess]:
    process = BridgeProcess(bridge_env, tmp_path / "bridge.log")
    process.start()
    yield process
    process.ensure_stopped()


async def test_cuff_readings_via_mqtt_and_cli_calibrate_their_own_device_and_survive_a_restart(
        servers: ServerEndpoints, service_env: dict[str, str], kafka_topics: str, clinic: str,
        bridge: BridgeProcess) -> None:
    kafka = servers.kafka_settings(kafka_topics)  # the test's own reads and writes (admin)
    # Pinned to a model version without fitted calibration gains (gain 1: calibrated = cuff + change), so the
    # expected values below do not depend on the product model's gains (about 0, docs/MODEL_CARD.md).
    settings = InferenceSettings(kafka=servers.kafka_settings(kafka_topics, "inference"), device="cpu",
                                 batch_max_size=32, batch_max_wait_ms=50,
                                 calibration_window_s=10.0, reload_poll_s=0, model_path=SIMULATOR_MODEL)
    devices = ["dev-a", "dev-b"]
    await _produce(kafka, clinic, devices, range(30))
    stop = asyncio.Event()
    task = asyncio.create_task(run_inference(settings, stop))
    first = await _estimates(kafka, 60)
    assert {e.mode for e in first.values()} == {"uncalibrated"}

    # dev-a: a cuff reading over MQTT at the time of window 10 (its windows are already scored: the
    # reference comes from the buffered outputs of windows 5..15).
    publisher = Publisher(servers.mqtt_settings("cuff"))  # a clinic's cuff station
    try:
        body = {"sbp": 150.0, "dbp": 95.0, "time": (T0 + 10 * HOP) / 1e9, "cuff_id": "mqtt-cuff"}
        publisher.publish(mqtt_cuff_topic(clinic, "dev-a"), json.dumps(body).encode())
    finally:
        publisher.close()
    await _calibrated(kafka, f"{clinic}/dev-a", "mqtt-cuff")
    await _produce(kafka, clinic, devices, range(30, 40))
    second = await _estimates(kafka, 80)
    reference_a = np.mean([first[("dev-a", T0 + i * HOP)].raw_sbp for i in range(5, 16)])
    # The serving model's calibration gain, from its metadata (1 for the pinned version: no fitted gains).
    gain = IntervalSpec.from_dict(ModelMetadata.read(SIMULATOR_MODEL).intervals).gain_sbp
    assert gain == 1.0
    for i in range(30, 40):
        a, b = second[("dev-a", T0 + i * HOP)], second[("dev-b", T0 + i * HOP)]
        assert (a.mode, a.calibration_cuff_id) == ("calibrated", "mqtt-cuff")
        assert a.raw_sbp is not None
        assert a.sbp == pytest.approx(150.0 + gain * (a.raw_sbp - reference_a), abs=0.05)
        assert (b.mode, b.sbp) == ("uncalibrated", b.raw_sbp)  # the other device is untouched

    # dev-b: a reading from the command line, at the time of window 20.
    command = [sys.executable, "-m", "bpstream", "calibrate", "--clinic", clinic, "--device", "dev-b", "--sbp", "118",
               "--dbp", "76", "--time", str((T0 + 20 * HOP) / 1e9), "--cuff-id", "cli-cuff"]
    cli = await asyncio.to_thread(subprocess.run, command, env={**os.environ, **service_env}, capture_output=True,
                                  text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    await _calibrated(kafka, f"{clinic}/dev-b", "cli-cuff")
    await _produce(kafka, clinic, devices, range(40, 50))
    third = await _estimates(kafka, 100)
    for i in range(40, 50):
        a, b = third[("dev-a", T0 + i * HOP)], third[("dev-b", T0 + i * HOP)]
        assert (a.calibration_cuff_id, b.calibration_cuff_id) == ("mqtt-cuff", "cli-cuff")
        assert a.sbp == pytest.approx(150.0 + gain * ((a.raw_sbp or 0.0) - reference_a), abs=0.05)
    stop.set()
    await asyncio.wait_for(task, timeout=60)

    # Restarted, inference rebuilds both calibrations from Kafka: the same references, no new cuff needed.
    stop = asyncio.Event()
    task = asyncio.create_task(run_inference(settings, stop))
    await _produce(kafka, clinic, devices, range(50, 55))
    fourth = await _estimates(kafka, 110)
    stop.set()
    await asyncio.wait_for(task, timeout=60)
    for i in range(50, 55):
        a, b = fourth[("dev-a", T0 + i * HOP)], fourth[("dev-b", T0 + i * HOP)]
        assert (a.mode, a.calibration_cuff_id, b.mode, b.calibration_cuff_id) == (
            "calibrated", "mqtt-cuff", "calibrated", "cli-cuff")
        assert a.sbp == pytest.approx(150.0 + gain * ((a.raw_sbp or 0.0) - reference_a), abs=0.05)
    saved = {k: decode_calibration(v) for k, v in (await read_latest_by_key(kafka, CALIBRATION_STATE)).items()}
    b_reference = np.mean([first[("dev-b", T0 + i * HOP)].raw_sbp for i in range(15, 26)])
    assert saved[f"{clinic}/dev-b"].reference_sbp == pytest.approx(b_reference, abs=0.01)
    assert bridge.terminate() == 0


async def test_alerting_raises_crisis_on_a_cuff_reading_and_a_contradicting_one_resolves_it(
        servers: ServerEndpoints, kafka_topics: str) -> None:
    from bpstream.services.alerting.service import run_alerting
    from bpstream.services.alerting.settings import AlertingSettings
    from bpstream.shared.messages import CuffReading, decode_alert, encode_json
    from bpstream.shared.topics import ALERTS, CUFF, cuff_key

    kafka = servers.kafka_settings(kafka_topics)  # the test's own reads and writes (admin)
    settings = AlertingSettings(kafka=servers.kafka_settings(kafka_topics, "alerting"), state_flush_s=0)
    now = time.time_ns()

    async def send(sbp: float, dbp: float, at_ns: int, cuff_id: str) -> None:
        reading = CuffReading(clinic_id="c1", device_id="dev-c", sbp=sbp, dbp=dbp, time_ns=at_ns, cuff_id=cuff_id,
                              received_ns=time.time_ns())
        async with KafkaProducer(kafka) as producer:
            await producer.send(CUFF, encode_json(reading), key=cuff_key("c1", "dev-c"))

    async def alerts(n: int) -> list[tuple[str, str, str, str | None]]:
        async def check() -> list[tuple[str, str, str, str | None]]:
            found = [decode_alert(r.value or b"") for r in await read_topic(kafka, ALERTS)]
            return [(a.kind, a.state, a.basis, a.cuff_id) for a in found] if len(found) >= n else []

        return await wait_until(check, timeout_s=120, what=f"{n} alerts")

    stop = asyncio.Event()
    task = asyncio.create_task(run_alerting(settings, stop))
    await send(196.0, 104.0, now - 5 * 10**9, "cuff-1")
    assert await alerts(1) == [("crisis", "raised", "cuff", "cuff-1")]
    await send(150.0, 92.0, now, "cuff-2")
    assert await alerts(3) == [("crisis", "raised", "cuff", "cuff-1"), ("crisis", "resolved", "cuff", "cuff-2"),
                               ("stage2", "raised", "cuff", "cuff-2")]
    stop.set()
    await asyncio.wait_for(task, timeout=60)
