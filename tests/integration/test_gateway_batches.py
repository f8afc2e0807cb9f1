"""Gateway batches through the real Mosquitto, bridge process and Kafka: the simulator's gateways publish
``ChunkBatch`` messages, the bridge validates every chunk and forwards the good ones as one ``ChunkBatch`` record
per ``signals.raw`` partition (each chunk in its device's partition), and bad batches or chunks are
dead-lettered with their reason; a gateway account may publish only its own topic."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_bridge import BridgeProcess, Publisher, chunk_payload, consume
from test_mqtt_security import Client, _with

from bpstream.localservers import ServerEndpoints
from bpstream.shared.gateway import ChunkBatch, encode_batch, is_batch, raw_record_chunks
from bpstream.shared.kafka import KafkaConsumer, key_partition
from bpstream.shared.messages import decode_chunk, decode_dead_letter
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import SIGNALS_DLQ, SIGNALS_RAW, mqtt_gateway_topic, mqtt_signals_topic
from bpstream.simulators.fleet import FleetConfig, mqtt_connection, run_fleet

# `bpstream devices` reloads the shared broker (SIGHUP): restart it for the tests after these.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fresh_mosquitto_afterwards")]


@pytest.fixture
def bridge(bridge_env: dict[str, str], tmp_path: Path) -> Iterator[BridgeProcess]:
    """test_bridge's bridge, accepting only 125 Hz (so a 250 Hz chunk in a batch is refused)."""
    process = BridgeProcess({**bridge_env, "BPSTREAM_BRIDGE_ALLOWED_SAMPLE_RATES": "[125.0]"}, tmp_path / "bridge.log")
    yield process
    process.ensure_stopped()


def _batch(clinic: str, gateway: str, *chunks: bytes) -> bytes:
    return encode_batch(ChunkBatch(clinic_id=clinic, gateway_id=gateway, chunks=list(chunks)))


async def consume_raw(settings: KafkaSettings, done: Callable[[int], bool],
                      timeout_s: float = 90.0) -> list[tuple[bytes, bytes, int]]:
    """Read ``signals.raw`` until ``done(chunks seen)``; return (key, value, partition) of every record."""
    records: list[tuple[bytes, bytes, int]] = []
    chunks = 0
    async with KafkaConsumer(settings, [SIGNALS_RAW], f"check-{uuid.uuid4().hex[:8]}") as consumer:
        deadline = time.monotonic() + timeout_s
        while not done(chunks) and time.monotonic() < deadline:
            for r in await consumer.getmany(timeout_ms=500):
                records.append((r.key or b"", r.value or b"", r.partition))
                chunks += len(raw_record_chunks(r.value or b""))
    return records


async def test_simulated_gateways_batches_become_per_partition_records_and_bad_ones_are_dead_lettered(
        bridge: BridgeProcess, servers: ServerEndpoints, kafka_settings: KafkaSettings, clinic: str) -> None:
    bridge.start()
    devices, seconds = 24, 5
    cfg = FleetConfig(**mqtt_connection(servers.mqtt_settings("simulator")), devices=devices, duration_s=seconds,
                      speed=5.0, clinic_id=clinic, scenario="clinic", connections=3, gateway_batch=8)
    report = await run_fleet(cfg)
    assert report.publishes == 3 * seconds  # 3 gateways x 8 devices: one batch per gateway per second
    # a mixed fleet: an old single-chunk device on its own topic goes on being accepted
    publisher = Publisher(servers.mqtt_settings("simulator"))
    gw = mqtt_gateway_topic(clinic, "gw-x")
    corrupt = bytearray(chunk_payload(clinic, "dev-c", 1))
    corrupt[40] ^= 0xFF
    bad: list[tuple[str, bytes, str]] = [
        (gw, b"\x93not a batch", "invalid_message"),
        (gw, _batch(clinic, "gw-other", chunk_payload(clinic, "dev-z", 0)), "topic_mismatch"),
        (gw, _batch(clinic, "gw-x", chunk_payload("clinic-elsewhere", "dev-e", 0)), "topic_mismatch"),
        (gw, _batch(clinic, "gw-x", bytes(corrupt)), "bad_checksum"),
        (gw, _batch(clinic, "gw-x", chunk_payload(clinic, "dev-r", 0, rate=250.0)), "bad_sample_rate"),
    ]
    good_in_bad = chunk_payload(clinic, "dev-g", 0)  # shares a batch with a bad chunk: still forwarded
    try:
        publisher.publish(mqtt_signals_topic(clinic, "dev-old"), chunk_payload(clinic, "dev-old", 0))
        publisher.publish(gw, _batch(clinic, "gw-x", good_in_bad, chunk_payload("clinic-elsewhere", "dev-e", 1)))
        for topic, payload, _ in bad:
            publisher.publish(topic, payload)
        publisher.flush()
    finally:
        publisher.close()

    expected = devices * seconds + 2
    raw = await consume_raw(kafka_settings, lambda n: n >= expected)
    seen: set[tuple[str, int]] = set()
    forwarded: list[bytes] = []
    batches = 0
    for key, value, partition in raw:
        members = raw_record_chunks(value)
        batches += is_batch(value)
        for member in members:
            chunk = decode_chunk(member)
            own_key = f"{chunk.clinic_id}/{chunk.device_id}"
            # one device's chunks always land in the partition Kafka's partitioner gives its key
            assert key_partition(own_key.encode(), SIGNALS_RAW.partitions) == partition and chunk.clinic_id == clinic
            assert key.decode() == own_key if not is_batch(value) else key.decode().startswith(f"{clinic}/gateway/")
            seen.add((chunk.device_id, chunk.seq))
            forwarded.append(member)
    fleet = {(d, s) for d in report.device_ids for s in range(seconds)}
    assert len(forwarded) == expected and seen == fleet | {("dev-old", 0), ("dev-g", 0)}
    assert good_in_bad in forwarded  # byte for byte
    # a gateway's second goes out as at most one record per partition (+ the two single-chunk records)
    assert batches and len(raw) <= 3 * seconds * SIGNALS_RAW.partitions + 2 < expected

    reasons = {reason for _, _, reason in bad}
    dlq = await consume(kafka_settings, SIGNALS_DLQ,
                        lambda rs: {decode_dead_letter(v).reason for _, v in rs} >= reasons and len(rs) >= 6)
    letters = [decode_dead_letter(v) for _, v in dlq]
    assert len(letters) == 6 and all(d.source == gw and d.stage == "bridge" for d in letters)
    by_reason = {d.reason: d for d in letters}
    assert by_reason["bad_checksum"].payload == bytes(corrupt)  # a bad chunk keeps its own bytes
    assert by_reason["invalid_message"].payload == b"\x93not a batch"  # a malformed batch is kept whole
    assert sum(d.reason == "topic_mismatch" for d in letters) == 3
    metrics = bridge.metrics()
    assert f"bpstream_bridge_forwarded_total {float(expected)}" in metrics
    assert bridge.terminate() == 0


def test_a_gateway_account_may_publish_only_its_own_batch_topic(servers: ServerEndpoints, tmp_path: Path) -> None:
    clinic = f"clinic-{uuid.uuid4().hex[:6]}"
    secret = tmp_path / "password"
    added = subprocess.run([sys.executable, "-m", "bpstream", "devices", "add", "--clinic", clinic, "--gateway",
                            "gw-1", "--password-file", str(secret)], capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    settings = _with(servers.mqtt_settings(), username=f"{clinic}/gateway/gw-1", password=secret.read_text().strip())
    deadline = time.monotonic() + 10
    gateway = Client(settings)
    try:
        while gateway.connect_code is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gateway.connect_code is not None and not gateway.connect_code.is_failure
        assert not gateway.publish(mqtt_gateway_topic(clinic, "gw-1")).is_failure
        for topic in (mqtt_gateway_topic(clinic, "gw-2"), mqtt_gateway_topic("clinic-other", "gw-1"),
                      mqtt_signals_topic(clinic, "dev-1")):
            refused = gateway.publish(topic)
            assert refused.is_failure and refused.value == 0x87, (topic, refused)  # MQTT 5 "not authorized"
    finally:
        gateway.close()
        subprocess.run([sys.executable, "-m", "bpstream", "devices", "revoke", "--clinic", clinic, "--gateway",
                        "gw-1"], capture_output=True, timeout=60, check=False)
