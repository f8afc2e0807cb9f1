"""The real local servers do what the services rely on: MQTT 5 pub/sub and shared subscriptions, Kafka
consumer groups whose committed offsets survive a consumer restart, InfluxDB writes that read back and
overwrite (idempotent sinks).
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from conftest import run_sync
from influxdb_client import WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException
from paho.mqtt.enums import CallbackAPIVersion

from bpstream import localservers
from bpstream.localservers import ServerEndpoints
from bpstream.localservers.install import INFLUXDB_VERSION
from bpstream.shared import influx_api
from bpstream.shared.influx import line
from bpstream.shared.mqtt import configure_client
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import SIGNALS_DLQ, mqtt_shared_subscription, mqtt_signals_topic, topic_name

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


class _Subscriber:
    """A paho MQTT 5 client that records what it receives."""

    def __init__(self, endpoints: ServerEndpoints, topic_filter: str) -> None:
        self.received: list[bytes] = []
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:10]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_subscribe = lambda *args: self.ready.set()
        self.client.on_message = self._on_message
        configure_client(self.client, endpoints.mqtt_settings("observer"))
        self.client.connect(endpoints.mqtt_host, endpoints.mqtt_port)
        self.client.loop_start()
        self.client.subscribe(topic_filter, qos=1)
        assert self.ready.wait(10), "subscription not acknowledged"

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.received.append(bytes(message.payload))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _publish_all(endpoints: ServerEndpoints, topic: str, payloads: list[bytes]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:10]}",
                         protocol=mqtt.MQTTv5)
    configure_client(client, endpoints.mqtt_settings("simulator"))
    client.connect(endpoints.mqtt_host, endpoints.mqtt_port)
    client.loop_start()
    try:
        for payload in payloads:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _wait_for(predicate: object, timeout_s: float = 10.0) -> bool:
    event = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if callable(predicate) and predicate():
            return True
        event.wait(0.05)
    return False


def test_mqtt5_publish_subscribe_round_trip(servers: ServerEndpoints) -> None:
    clinic = f"c{uuid.uuid4().hex[:8]}"
    topic = mqtt_signals_topic(clinic, "dev-1")
    subscriber = _Subscriber(servers, f"bpstream/{clinic}/+/signals")
    payloads = [bytes([i]) * (i + 1) + b"\x00\xff" for i in range(20)]
    try:
        _publish_all(servers, topic, payloads)
        assert _wait_for(lambda: len(subscriber.received) >= len(payloads))
    finally:
        subscriber.close()
    assert subscriber.received == payloads  # QoS 1 from one publisher to one subscriber keeps order


def test_mqtt5_shared_subscription_delivers_each_message_to_one_member(servers: ServerEndpoints) -> None:
    clinic = f"c{uuid.uuid4().hex[:8]}"
    group = f"bridge-{uuid.uuid4().hex[:6]}"
    topic_filter = mqtt_shared_subscription(group, f"bpstream/{clinic}/+/signals")
    members = [_Subscriber(servers, topic_filter) for _ in range(2)]
    payloads = [f"chunk-{i}".encode() for i in range(40)]
    try:
        _publish_all(servers, mqtt_signals_topic(clinic, "dev-1"), payloads)
        assert _wait_for(lambda: sum(len(m.received) for m in members) >= len(payloads))
    finally:
        for member in members:
            member.close()
    everything = [p for m in members for p in m.received]
    assert sorted(everything) == sorted(payloads)  # every message once, none twice
    assert all(m.received for m in members)  # the load is split


async def test_kafka_committed_offsets_survive_a_consumer_restart(kafka_settings: KafkaSettings,
                                                                   kafka_topics: str) -> None:
    topic = topic_name(SIGNALS_DLQ, kafka_topics)  # one partition: offsets are the message order
    partition = TopicPartition(topic, 0)
    group = f"g-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(**kafka_settings.client_kwargs(), enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, f"m{i}".encode(), key=b"dev-1")
    finally:
        await producer.stop()

    def consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(topic, **kafka_settings.client_kwargs(), group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                session_timeout_ms=6000, heartbeat_interval_ms=500)

    first = consumer()
    await first.start()
    try:
        seen: list[bytes] = []
        while len(seen) < 6:
            batch = await first.getmany(timeout_ms=1000, max_records=6 - len(seen))
            seen += [record.value for records in batch.values() for record in records if record.value]
        assert seen == [f"m{i}".encode() for i in range(6)]
        await first.commit({partition: 6})
    finally:
        await first.stop()

    second = consumer()
    await second.start()
    try:
        assert await second.committed(partition) == 6
        rest: list[tuple[int, bytes]] = []
        while len(rest) < 4:
            batch = await second.getmany(timeout_ms=1000)
            rest += [(r.offset, r.value) for records in batch.values() for r in records if r.value]
    finally:
        await second.stop()
    assert rest == [(i, f"m{i}".encode()) for i in range(6, 10)]


def test_influx_write_query_and_overwrite(servers: ServerEndpoints, influx_db: str) -> None:
    t0 = 1_700_000_000_000_000_000
    points = [
        line("bp_estimate", {"clinic": "c 1", "device": "d,1"}, {"sbp": 120.5, "dbp": 80.0, "model_version": "v1",
                                                                 "quality_ok": 1}, t0),
        line("bp_estimate", {"clinic": "c 1", "device": "d,1"}, {"sbp": 130.0, "dbp": 85.0, "model_version": "v1",
                                                                 "quality_ok": 1}, t0 + 2 * 10**9),
        # The same device and time again: InfluxDB overwrites, so a replay does not duplicate.
        line("bp_estimate", {"clinic": "c 1", "device": "d,1"}, {"sbp": 121.0, "dbp": 80.0, "model_version": "v1",
                                                                 "quality_ok": 1}, t0),
    ]
    settings = servers.influx_settings(influx_db)
    with influx_api.sync_client(settings) as client:
        # the v2 compatibility API (/api/v2/write, bucket "database"), as the writer sends it
        with client.write_api(write_options=SYNCHRONOUS) as api:
            api.write(bucket=influx_api.bucket(settings), record=points, write_precision=WritePrecision.NS)
        rows = influx_api.rows(influx_api.influxql_sync(
            client, "SELECT sbp, dbp, model_version, quality_ok, clinic, device FROM bp_estimate ORDER BY time",
            database=influx_db))
    assert [(r["time"], r["sbp"], r["dbp"]) for r in rows] == [(t0, 121.0, 80.0), (t0 + 2 * 10**9, 130.0, 85.0)]
    assert {(r["clinic"], r["device"], r["model_version"], r["quality_ok"]) for r in rows} == {("c 1", "d,1", "v1", 1)}


def test_influx_reads_back_escaped_names_tags_and_strings_exactly(servers: ServerEndpoints, influx_db: str) -> None:
    tags = {"clinic": "ward 3,east=1", "device": r"dev\7"}
    text = 'said "stop", then C:\\path\\ and more'
    point = line("bp alert,x", tags, {"message": text, "n": 5, "ok": True, "x": 1.5, "gone": float("nan")},
                 1_700_000_000_000_000_000)
    settings = servers.influx_settings(influx_db)
    with influx_api.sync_client(settings) as client:
        with client.write_api(write_options=SYNCHRONOUS) as api:
            api.write(bucket=influx_api.bucket(settings), record=point, write_precision=WritePrecision.NS)
        answer = influx_api.influxql_sync(client, 'SELECT * FROM "bp alert,x"', database=influx_db)
    series = answer[0]["series"][0]
    row = dict(zip(series["columns"], series["values"][0], strict=True))
    assert series["name"] == "bp alert,x"
    assert (row["clinic"], row["device"]) == ("ward 3,east=1", r"dev\7")
    assert (row["message"], row["n"], row["ok"], row["x"]) == (text, 5, True, 1.5)
    assert "gone" not in row


def test_local_influxdb_is_the_version_deployed(servers: ServerEndpoints) -> None:
    """The server the tests run against reports (``/ping``) the version of the image docker-compose deploys."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    image = compose["services"]["influxdb"]["image"]
    assert image == f"influxdb:{INFLUXDB_VERSION}"
    reported = run_sync(lambda: influx_api.server_version(servers.influx_settings()))
    assert reported == image.split(":", 1)[1]


def test_influx_v2_write_to_a_missing_database_is_404_and_a_bad_point_400(servers: ServerEndpoints,
                                                                        influx_db: str) -> None:
    """The answers the writer relies on: 404 "database not found" (it creates it), 400 for a bad point."""
    missing = servers.influx_settings(f"absent_{influx_db}")
    with influx_api.sync_client(missing) as client, client.write_api(write_options=SYNCHRONOUS) as api:
        with pytest.raises(ApiException) as lost:
            api.write(bucket=influx_api.bucket(missing), record="m v=1 1", write_precision=WritePrecision.NS)
        assert lost.value.status == 404 and "database not found" in lost.value.body
        present = servers.influx_settings(influx_db)
        api.write(bucket=influx_api.bucket(present), record="m v=1i 1", write_precision=WritePrecision.NS)
        with pytest.raises(ApiException) as bad:
            api.write(bucket=influx_api.bucket(present), record="m v=1.5 2", write_precision=WritePrecision.NS)
        assert bad.value.status == 400 and "field type conflict" in bad.value.body


def test_status_reports_every_server_answering(servers: ServerEndpoints) -> None:
    report = {item.name: item for item in localservers.status()}
    assert set(report) == {"mosquitto", "kafka", "influxdb"}
    assert all(item.running and item.healthy for item in report.values()), report
    assert report["mosquitto"].ports["port"] == servers.mqtt_port


def test_mosquitto_restart_keeps_its_port_and_persisted_messages(servers: ServerEndpoints) -> None:
    """Retained messages (device status) and QoS 1 sessions live in Mosquitto's persistence file."""
    topic = f"bpstream/c{uuid.uuid4().hex[:8]}/dev-1/status"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:10]}",
                         protocol=mqtt.MQTTv5)
    configure_client(client, servers.mqtt_settings("simulator"))
    client.connect(servers.mqtt_host, servers.mqtt_port)
    client.loop_start()
    client.publish(topic, b"online", qos=1, retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    before = {item.name: item.pid for item in localservers.status()}

    after = localservers.restart("mosquitto")

    assert after == servers  # same endpoints: clients reconnect to where they were
    assert {item.name: item.pid for item in localservers.status()}["mosquitto"] != before["mosquitto"]
    subscriber = _Subscriber(servers, topic)
    try:
        assert _wait_for(lambda: subscriber.received == [b"online"])
    finally:
        subscriber.close()
