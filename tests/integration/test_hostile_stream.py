"""The hostile stream of issue 13 through the whole pipeline on the real servers, driven by the simulator.

One simulated crisis patient publishes: 30 s of normal signal, then one chunk with seq 10^12 dated 2061, then
12 s with its clock 1 h ahead, then (clock right again) crisis-level signal for 120 s. Before the fix the
future-dated chunks made every later chunk "late": no window, no alert. Now the bridge dead-letters the
anomalies (counted, with their reason) and the windows after them are all there, with the crisis alert.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_sync
from pipeline_support import pipeline_config

from bpstream.demo.pipeline import Pipeline, PipelineConfig, stored_alerts, stored_estimates
from bpstream.localservers import ServerEndpoints
from bpstream.shared import influx_api
from bpstream.shared.devicetime import DEVICE_TIME_AHEAD
from bpstream.shared.kafka_tools import read_topic
from bpstream.shared.messages import SignalChunk, decode_dead_letter, encode_chunk
from bpstream.shared.modelspec import HOP_SECONDS, WINDOW_SECONDS
from bpstream.shared.mqtt import ssl_context
from bpstream.shared.settings import MqttSettings
from bpstream.shared.topics import SIGNALS_DLQ, mqtt_signals_topic
from bpstream.simulators.cohort import build_cohort
from bpstream.simulators.mqtt_async import AsyncMqttConnection

pytestmark = pytest.mark.integration

NS = 1_000_000_000
NORMAL_S, JUMP_S, CRISIS_S = 30, 12, 120
SPEED = 3.0
FORGED_SEQ = 10**12
YEAR_2061_NS = 2_871_000_000 * NS
LOG_ROOT = Path(__file__).resolve().parents[2] / "reports" / "test-logs"


@dataclass(slots=True)
class Hostile:
    config: PipelineConfig
    clinic: str
    device: str
    start_ns: int
    crossed_ns: int
    estimates: list[dict[str, Any]]
    alerts: list[dict[str, Any]]
    dead: list[Any]


async def _publish(settings: MqttSettings, clinic: str, device: str, start_ns: int) -> tuple[int, int]:
    """Publish the hostile stream in (accelerated) real time; return (chunks sent, first crisis chunk time)."""
    password = settings.password.get_secret_value() if settings.password else None
    total = NORMAL_S + JUMP_S + CRISIS_S
    engine = build_cohort(["crisis"], 1, 11, float(total + 5), crisis_onset_s=float(NORMAL_S + JUMP_S)).engine
    conn = AsyncMqttConnection(f"hostile-{uuid.uuid4().hex[:6]}", settings.host, settings.port,
                               username=settings.username, password=password, tls=ssl_context(settings))
    await conn.connect()
    topic = mqtt_signals_topic(clinic, device)
    loop = asyncio.get_running_loop()
    wall0 = loop.time()
    crossed_ns = 0
    sent = 0

    def send(seq: int, t0_ns: int, samples: np.ndarray) -> None:
        nonlocal sent
        conn.publish(topic, encode_chunk(SignalChunk(clinic, device, seq, t0_ns, 125.0, ("ecg", "ppg"), samples)))
        sent += 1

    for k in range(total):
        await asyncio.sleep(max(0.0, wall0 + k / SPEED - loop.time()))
        block = engine.step(1.0)
        samples = np.stack([block.ecg[0], block.ppg[0]]).astype(np.float32)
        t0 = start_ns + k * NS
        if k == NORMAL_S:
            send(FORGED_SEQ, YEAR_2061_NS, samples)
        if NORMAL_S <= k < NORMAL_S + JUMP_S:
            t0 += 3600 * NS
        elif not crossed_ns and ((block.beat_sbp > 180).any() or (block.beat_dbp > 120).any()):
            crossed_ns = t0
        send(k, t0, samples)
    assert await conn.drain(60.0), "the broker did not acknowledge every chunk"
    await conn.disconnect()
    return sent, crossed_ns


async def _run(servers: ServerEndpoints) -> Hostile:
    prefix = f"hs{uuid.uuid4().hex[:6]}."
    tag = prefix.rstrip(".")
    config = pipeline_config(servers, tag, LOG_ROOT / "hostile" / tag)
    clinic, device = f"{tag}-clinic", f"{tag}-dev-000"
    # Device time starts a minute in the past, so the accelerated stream never runs ahead of the wall clock
    # by more than the bridge's bound (the +1 h segment and the 2061 chunk do).
    start_ns = time.time_ns() - 60 * NS
    async with Pipeline(config) as pipeline:
        await pipeline.start()
        sent, crossed_ns = await _publish(servers.mqtt_settings("simulator"), clinic, device, start_ns)
        await pipeline.wait_drained(min_raw=sent - 1 - JUMP_S, key_prefixes=(device,), timeout_s=600)
        await asyncio.sleep(3)  # the writer's last batch
        estimates = await stored_estimates(config, clinic)
        alerts = await stored_alerts(config, clinic)
        dead = [decode_dead_letter(r.value or b"") for r in await read_topic(config.kafka(), SIGNALS_DLQ)]
    return Hostile(config, clinic, device, start_ns, crossed_ns, estimates, alerts, dead)


@pytest.fixture(scope="module")
def hostile(servers: ServerEndpoints) -> Any:
    result = run_sync(lambda: _run(servers))
    yield result
    run_sync(lambda: influx_api.execute(
        result.config.influx(), f"DROP DATABASE {influx_api.quote_identifier(result.config.database)}"))


def test_windows_after_the_anomaly_are_stored(hostile: Hostile) -> None:
    hop, win = int(HOP_SECONDS * NS), int(WINDOW_SECONDS * NS)
    resumed = hostile.start_ns + (NORMAL_S + JUMP_S) * NS  # first honest chunk after the anomaly
    end = hostile.start_ns + (NORMAL_S + JUMP_S + CRISIS_S) * NS
    expected = set(range(-(-(resumed + win) // hop) * hop, end + 1, hop))
    stored = {int(r["time"]) for r in hostile.estimates if r["device"] == hostile.device}
    assert len(stored & expected) >= 0.95 * len(expected), (len(stored & expected), len(expected))
    # Nothing was stored at the forged times.
    assert all(t < end + hop for t in stored)


def test_the_anomalies_are_dead_letters_with_their_reason(hostile: Hostile) -> None:
    ours = [d for d in hostile.dead if hostile.device in d.source]
    assert len(ours) == 1 + JUMP_S
    assert {(d.stage, d.reason) for d in ours} == {("bridge", DEVICE_TIME_AHEAD)}


def test_service_logs_name_no_device_clinic_or_reading(hostile: Hostile) -> None:
    logs = {path.name: path.read_text() for path in hostile.config.log_dir.glob("*.log")}
    assert set(logs) >= {"bridge.log", "processor.log", "inference.log", "alerting.log", "writer.log"}
    assert any('"msg": "alert"' in text for text in logs.values())  # the alert was logged, pseudonymously
    for name, text in logs.items():
        assert hostile.device not in text and hostile.clinic not in text, name
        assert '"sbp"' not in text and '"dbp"' not in text, name


async def _dlq_retention(config: PipelineConfig) -> str:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from bpstream.shared.topics import topic_name

    admin = AIOKafkaAdminClient(**config.kafka().client_kwargs())
    await admin.start()
    try:
        name = topic_name(SIGNALS_DLQ, config.topic_prefix)
        (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
        entries = {e[0]: e[1] for resource in response.resources for e in resource[4]}
        return str(entries["retention.ms"])
    finally:
        await admin.close()


def test_dead_letters_are_kept_for_the_configured_retention(hostile: Hostile) -> None:
    assert run_sync(lambda: _dlq_retention(hostile.config)) == str(7 * 24 * 3600 * 1000)


def test_the_crisis_is_alerted_within_a_minute_of_device_time(hostile: Hostile) -> None:
    raised = [a for a in hostile.alerts if a["kind"] == "crisis" and a["state"] == "raised"]
    assert hostile.crossed_ns, "the simulated crisis never crossed 180/120"
    assert len(raised) == 1, hostile.alerts
    assert int(raised[0]["time"]) - hostile.crossed_ns <= 60 * NS
