"""The bridge against the real Mosquitto and Kafka: forwarding byte for byte, dead-lettering, and no loss when
the bridge is killed mid-stream (QoS 1 messages wait in the broker's persistent session until it is back).

The bridge runs as a real process (``python -m bpstream.services.bridge.main``), as it is deployed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bpstream.localservers import ServerEndpoints
from bpstream.shared.kafka import KafkaConsumer
from bpstream.shared.messages import SignalChunk, decode_chunk, decode_cuff, decode_dead_letter, encode_chunk
from bpstream.shared.mqtt import configure_client, mqtt_env
from bpstream.shared.settings import KafkaSettings, MqttSettings
from bpstream.shared.topics import CUFF, SIGNALS_DLQ, SIGNALS_RAW, mqtt_cuff_topic, mqtt_signals_topic

T0 = 1_700_000_000_000_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chunk_payload(clinic: str, device: str, seq: int, *, rate: float = 125.0) -> bytes:
    n = round(rate)
    t = (np.arange(n) + seq * n) / rate
    samples = np.stack([np.sin(2 * np.pi * 1.2 * t), np.cos(2 * np.pi * 1.2 * t)]).astype(np.float32)
    return encode_chunk(SignalChunk(clinic, device, seq, T0 + seq * 10**9, rate, ("ecg", "ppg"), samples))


def nan_scale_payload(clinic: str, device: str) -> bytes:
    """A chunk whose first channel scale is NaN, with a valid checksum (a buggy encoder, not line noise)."""
    data = bytearray(chunk_payload(clinic, device, 0))
    scale_at = 33 + len(clinic) + len(device) + 1  # header, ids, then channel code
    data[scale_at : scale_at + 4] = struct.pack("<f", float("nan"))
    body = bytes(data[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


class Publisher:
    """A wearable gateway: an MQTT 5 client publishing QoS 1 and waiting for the broker's acknowledgements."""

    def __init__(self, settings: MqttSettings) -> None:
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"test-pub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self.client.max_queued_messages_set(0)
        configure_client(self.client, settings)  # TLS and the simulator's account (any device of any clinic)
        self.client.connect(settings.host, settings.port)
        self.client.loop_start()
        self.pending: list[mqtt.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes) -> None:
        self.pending.append(self.client.publish(topic, payload, qos=1))

    def flush(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for info in self.pending:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "the broker did not acknowledge a QoS 1 publish"
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.client.disconnect()
        self.client.loop_stop()


class BridgeProcess:
    """``python -m bpstream.services.bridge.main`` with this test's environment; log kept for diagnosis."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.metrics_port = int(env["BPSTREAM_BRIDGE_METRICS_PORT"])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "bpstream.services.bridge.main"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"bridge exited early:\n{self.log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"bridge not ready within 60 s:\n{self.log_path.read_text()[-3000:]}")

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> int:
        """SIGTERM and wait: the bridge drains and exits by itself."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def bridge(bridge_env: dict[str, str], tmp_path: Path) -> Iterator[BridgeProcess]:
    process = BridgeProcess(bridge_env, tmp_path / "bridge.log")
    yield process
    process.ensure_stopped()


@pytest.fixture
def publisher(servers: ServerEndpoints) -> Iterator[Publisher]:
    pub = Publisher(servers.mqtt_settings("simulator"))
    yield pub
    pub.client.disconnect()
    pub.client.loop_stop()


async def consume(settings: KafkaSettings, topic: object, done: Callable[[list[tuple[bytes, bytes]]], bool],
                  timeout_s: float = 90.0) -> list[tuple[bytes, bytes]]:
    """Read ``topic`` from the start until ``done(records)`` or the timeout; return (key, value) pairs."""
    records: list[tuple[bytes, bytes]] = []
    async with KafkaConsumer(settings, [topic], f"check-{uuid.uuid4().hex[:8]}") as consumer:  # type: ignore[list-item]
        deadline = time.monotonic() + timeout_s
        while not done(records) and time.monotonic() < deadline:
            for r in await consumer.getmany(timeout_ms=500):
                records.append((r.key or b"", r.value or b""))
    return records


async def test_valid_chunks_arrive_byte_identical_and_bad_ones_are_dead_lettered(
        bridge: BridgeProcess, publisher: Publisher, kafka_settings: KafkaSettings, clinic: str) -> None:
    bridge.start()
    devices = [f"dev-{i}" for i in range(4)]
    sent: dict[tuple[str, int], bytes] = {}
    bad: list[tuple[str, bytes, str]] = [
        (mqtt_signals_topic(clinic, "dev-0"), b"\x00\x01 garbage, not a chunk, whatever it claims", "bad_magic"),
        (mqtt_signals_topic(clinic, "dev-1"), chunk_payload(clinic, "dev-1", 900)[:2] + b"\x07"
         + chunk_payload(clinic, "dev-1", 900)[3:], "bad_version"),
        (mqtt_signals_topic(clinic, "dev-2"), nan_scale_payload(clinic, "dev-2"), "non_finite"),
        (mqtt_signals_topic(clinic, "dev-3"), chunk_payload(clinic, "dev-3", 901, rate=500.0), "bad_sample_rate"),
        (mqtt_signals_topic(clinic, "dev-3"), chunk_payload(clinic, "dev-0", 902), "topic_mismatch"),
        (mqtt_signals_topic(clinic, "dev-1"), b"BP" + os.urandom(70_000), "payload_too_large"),
        (mqtt_signals_topic(clinic, "dev-2"), chunk_payload(clinic, "dev-2", 903)[:-11], "truncated"),
    ]
    for seq in range(50):
        for device in devices:
            payload = chunk_payload(clinic, device, seq)
            sent[(device, seq)] = payload
            publisher.publish(mqtt_signals_topic(clinic, device), payload)
        if seq % 7 == 3 and bad:
            topic, payload, _ = bad[len(bad) - 1 - (seq // 7) % len(bad)]
            publisher.publish(topic, payload)
    for topic, payload, _ in bad:
        publisher.publish(topic, payload)
    publisher.flush()

    raw = await consume(kafka_settings, SIGNALS_RAW, lambda rs: len(rs) >= len(sent))
    got: dict[tuple[str, int], bytes] = {}
    for key, value in raw:
        chunk = decode_chunk(value)
        assert key.decode() == f"{chunk.clinic_id}/{chunk.device_id}"  # keyed by clinic/device
        got[(chunk.device_id, chunk.seq)] = value
    assert got == sent  # every valid chunk, byte for byte, keyed by its device, and nothing else

    expected_reasons = {reason for _, _, reason in bad}
    dlq = await consume(kafka_settings, SIGNALS_DLQ,
                        lambda rs: {decode_dead_letter(v).reason for _, v in rs} >= expected_reasons)
    letters = [decode_dead_letter(v) for _, v in dlq]
    assert {d.reason for d in letters} == expected_reasons
    for topic, payload, reason in bad:
        matching = [d for d in letters if d.reason == reason and d.source == topic]
        assert matching, reason
        if reason == "payload_too_large":
            assert matching[0].payload == payload[: len(matching[0].payload)] and "truncated" in matching[0].detail
        else:
            assert payload in {d.payload for d in matching}
        assert all(d.stage == "bridge" and d.detail for d in matching)

    metrics = bridge.metrics()
    assert f"bpstream_bridge_forwarded_total {float(len(sent))}" in metrics
    assert 'bpstream_bridge_rejected_total{reason="topic_mismatch"}' in metrics
    assert "bpstream_bridge_in_flight 0.0" in metrics
    assert bridge.terminate() == 0


async def test_cuff_readings_from_mqtt_and_the_cli_reach_the_compacted_topic_and_bad_ones_the_dlq(
        bridge: BridgeProcess, publisher: Publisher, kafka_settings: KafkaSettings, clinic: str,
        bridge_env: dict[str, str], servers: ServerEndpoints) -> None:
    import json

    bridge.start()
    now = time.time()
    good = {"sbp": 131.0, "dbp": 84.0, "time": now - 20, "cuff_id": "omron-1"}
    publisher.publish(mqtt_cuff_topic(clinic, "dev-1"), json.dumps(good).encode())
    bad = [({**good, "sbp": 80.0, "dbp": 95.0}, "cuff_sbp_not_above_dbp"),
           ({**good, "sbp": 420.0}, "cuff_out_of_range"),
           ({**good, "time": now + 3600}, "cuff_in_future"),
           ({"sbp": "high"}, "cuff_invalid")]
    for body, _ in bad:
        publisher.publish(mqtt_cuff_topic(clinic, "dev-2"), json.dumps(body).encode())
    publisher.flush()
    command = [sys.executable, "-m", "bpstream", "calibrate", "--clinic", clinic, "--device", "dev-3", "--sbp", "150",
               "--dbp", "95", "--time", str(now - 10), "--cuff-id", "nurse-1", "--confirmation"]
    cli_env = {**bridge_env, **mqtt_env(servers.mqtt_settings())}  # a tool: the cuff account
    cli = await asyncio.to_thread(subprocess.run, command, env=cli_env, capture_output=True, text=True,
                                  timeout=60)
    assert cli.returncode == 0, cli.stderr

    records = await consume(kafka_settings, CUFF, lambda rs: len(rs) >= 2)
    readings = {key.decode(): decode_cuff(value) for key, value in records}
    assert set(readings) == {f"{clinic}/dev-1", f"{clinic}/dev-3"}  # keyed by clinic/device; bad ones absent
    one, three = readings[f"{clinic}/dev-1"], readings[f"{clinic}/dev-3"]
    assert (one.sbp, one.dbp, one.cuff_id, one.confirmation) == (131.0, 84.0, "omron-1", False)
    assert abs(one.time_ns - (now - 20) * 1e9) < 1e6
    assert (three.sbp, three.dbp, three.cuff_id, three.confirmation) == (150.0, 95.0, "nurse-1", True)

    reasons = {reason for _, reason in bad}
    dlq = await consume(kafka_settings, SIGNALS_DLQ,
                        lambda rs: {decode_dead_letter(v).reason for _, v in rs} >= reasons)
    letters = [decode_dead_letter(v) for _, v in dlq]
    assert {d.reason for d in letters} == reasons
    assert all(d.source == mqtt_cuff_topic(clinic, "dev-2") and d.stage == "bridge" for d in letters)
    metrics = bridge.metrics()
    assert "bpstream_bridge_cuff_forwarded_total 2.0" in metrics
    assert 'bpstream_bridge_rejected_total{reason="cuff_in_future"} 1.0' in metrics
    assert bridge.terminate() == 0


async def test_bridge_killed_mid_stream_loses_no_qos1_message(
        bridge: BridgeProcess, publisher: Publisher, kafka_settings: KafkaSettings, clinic: str) -> None:
    bridge.start()
    devices = [f"dev-{i}" for i in range(5)]
    total_per_device = 120
    published = threading.Event()

    def publish_all() -> None:
        for seq in range(total_per_device):
            for device in devices:
                publisher.publish(mqtt_signals_topic(clinic, device), chunk_payload(clinic, device, seq))
            time.sleep(0.01)
        publisher.flush()
        published.set()

    thread = threading.Thread(target=publish_all)
    thread.start()
    try:
        # Kill the bridge without warning once part of the stream went through, keep publishing while it
        # is down, then start it again under the same client id.
        await consume(kafka_settings, SIGNALS_RAW, lambda rs: len(rs) >= 100, timeout_s=60)
        bridge.kill()
        await asyncio.sleep(1.0)
        bridge.start()
    finally:
        thread.join(120)
    assert published.is_set()

    expected = {(d, s) for d in devices for s in range(total_per_device)}
    seen: set[tuple[str, int]] = set()
    checked = 0

    def all_seen(records: list[tuple[bytes, bytes]]) -> bool:
        nonlocal checked
        for _, value in records[checked:]:  # only the new ones: the check runs after every fetch
            chunk = decode_chunk(value)
            seen.add((chunk.device_id, chunk.seq))
        checked = len(records)
        return seen >= expected

    await consume(kafka_settings, SIGNALS_RAW, all_seen, timeout_s=120)
    assert seen == expected, f"missing {len(expected - seen)}: {sorted(expected - seen)[:10]}"
    assert bridge.terminate() == 0


async def test_a_flooding_device_is_rate_limited_and_dead_lettered_without_its_payload(
        bridge_env: dict[str, str], publisher: Publisher, kafka_settings: KafkaSettings, clinic: str,
        tmp_path: Path) -> None:
    # A bucket of 5 refilled at one message per 10 s: 40 messages in a row cannot all pass.
    env = {**bridge_env, "BPSTREAM_BRIDGE_RATE_LIMIT_PER_S": "0.1", "BPSTREAM_BRIDGE_RATE_LIMIT_BURST": "5"}
    process = BridgeProcess(env, tmp_path / "bridge-limited.log")
    try:
        process.start()
        flood, calm = "dev-flood", "dev-calm"
        for seq in range(40):
            publisher.publish(mqtt_signals_topic(clinic, flood), chunk_payload(clinic, flood, seq))
        for seq in range(3):
            publisher.publish(mqtt_signals_topic(clinic, calm), chunk_payload(clinic, calm, seq))
        publisher.flush()
        raw = await consume(kafka_settings, SIGNALS_RAW, lambda rs: len(rs) >= 8, timeout_s=60)
        dlq = await consume(kafka_settings, SIGNALS_DLQ, lambda rs: len(raw) + len(rs) >= 43, timeout_s=60)
        assert len(raw) + len(dlq) == 43  # every message either forwarded or dead-lettered
        forwarded = [decode_chunk(v) for _, v in raw]
        assert sorted(c.seq for c in forwarded if c.device_id == calm) == [0, 1, 2]  # its own bucket
        passed = [c.seq for c in forwarded if c.device_id == flood]
        assert passed[:5] == [0, 1, 2, 3, 4] and len(passed) < 40
        letters = [decode_dead_letter(v) for _, v in dlq]
        assert len(letters) == 40 - len(passed)
        assert {d.reason for d in letters} == {"rate_limited"}
        assert all(d.source == mqtt_signals_topic(clinic, flood) and d.payload == b"" and d.detail for d in letters)
        metrics = process.metrics()
        assert f'bpstream_bridge_rejected_total{{reason="rate_limited"}} {float(len(letters))}' in metrics
        assert process.terminate() == 0
    finally:
        process.ensure_stopped()
