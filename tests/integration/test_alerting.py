"""The alerting service against the real Kafka: the detector state of a device that fell silent is dropped and
deleted from the compacted ``alerting.state`` topic (a tombstone); a device that comes back starts with a fresh
detector."""

from __future__ import annotations

import asyncio
import time

import pytest
from pipeline_support import wait_until

from bpstream.localservers import ServerEndpoints
from bpstream.services.alerting.service import run_alerting
from bpstream.services.alerting.settings import AlertingSettings
from bpstream.shared.anomaly import AlertDetector
from bpstream.shared.kafka import KafkaProducer
from bpstream.shared.kafka_tools import read_latest_by_key, read_topic
from bpstream.shared.messages import Estimate, encode_json
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import ALERTING_STATE, ESTIMATES, device_key

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

HOP = 2 * 10**9
T0 = (time.time_ns() // HOP) * HOP - 3600 * 10**9
CLINIC = "c-evict"


def _estimate(device: str, i: int) -> Estimate:
    end = T0 + i * HOP
    return Estimate(clinic_id=CLINIC, device_id=device, window_start_ns=end - 8 * 10**9, window_end_ns=end,
                    sbp=121.0, dbp=79.0, sbp_sd=5.0, dbp_sd=3.0, anomaly_prob=0.0, sqi=0.9, quality_ok=True,
                    inputs="ecg+ppg", model_version="v1", received_ns=end)


async def _send(kafka: KafkaSettings, device: str, windows: range) -> None:
    async with KafkaProducer(kafka) as producer:
        await producer.send_many([(ESTIMATES, encode_json(_estimate(device, i)), device_key(CLINIC, device))
                                  for i in windows])


async def test_a_silent_devices_state_is_evicted_with_a_tombstone(servers: ServerEndpoints,
                                                                 kafka_topics: str) -> None:
    kafka = servers.kafka_settings(kafka_topics)  # the test's own reads and writes: the admin
    # 60 s of record time (30 windows); state saved and offsets committed after every batch. The service runs as
    # its own Kafka user.
    settings = AlertingSettings(kafka=servers.kafka_settings(kafka_topics, "alerting"), state_flush_s=0,
                                evict_after_s=60)
    quiet, busy = device_key(CLINIC, "quiet"), device_key(CLINIC, "busy")

    async def saved_keys(expected: set[str]) -> set[str]:
        keys = set(await read_latest_by_key(kafka, ALERTING_STATE))
        return keys if keys == expected else set()

    stop = asyncio.Event()
    task = asyncio.create_task(run_alerting(settings, stop))
    await _send(kafka, "quiet", range(0, 5))
    await _send(kafka, "busy", range(0, 5))
    assert await wait_until(lambda: saved_keys({quiet, busy}), timeout_s=120, what="both devices' state saved")
    # 'busy' goes on for 80 s of record time; 'quiet' sends nothing more.
    await _send(kafka, "busy", range(5, 45))
    assert await wait_until(lambda: saved_keys({busy}), timeout_s=120, what="the silent device's state deleted")
    records = [r for r in await read_topic(kafka, ALERTING_STATE) if r.key == quiet.encode()]
    assert records[-1].value is None, "the silent device's last state record is not a tombstone"
    # The device comes back: a fresh detector, saved again.
    await _send(kafka, "quiet", range(46, 47))
    assert await wait_until(lambda: saved_keys({quiet, busy}), timeout_s=120, what="the returning device's state")
    state = AlertDetector.from_bytes((await read_latest_by_key(kafka, ALERTING_STATE))[quiet])
    assert state.state.last_ns == T0 + 46 * HOP
    stop.set()
    await asyncio.wait_for(task, timeout=60)
