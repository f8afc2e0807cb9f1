"""Kafka and InfluxDB refuse what a deployment refuses: plaintext, anonymous and wrong-password clients, and
users acting outside their grants (docs/SECURITY.md). Run against the default local servers, which the whole
suite uses with the same TLS, authentication and ACLs."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import GroupAuthorizationFailedError, KafkaConnectionError, TopicAuthorizationFailedError
from conftest import run_sync
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from pydantic import SecretStr

from bpstream.localservers import ServerEndpoints
from bpstream.shared import influx_api
from bpstream.shared.settings import InfluxSettings
from bpstream.shared.topics import ALERTS, ESTIMATES, SIGNALS_RAW, topic_name

pytestmark = pytest.mark.integration


async def _refused(kwargs: dict[str, object], caplog: pytest.LogCaptureFixture) -> str:
    """Start a producer with ``kwargs``; it must fail to bootstrap. Returns what aiokafka logged as the cause."""
    caplog.clear()
    producer = AIOKafkaProducer(**{**kwargs, "request_timeout_ms": 10_000})
    try:
        with pytest.raises(KafkaConnectionError):
            await producer.start()
    finally:
        await producer.stop()
    return "\n".join(r.getMessage() for r in caplog.records)


async def test_kafka_refuses_plaintext_wrong_passwords_and_an_untrusted_certificate(
        servers: ServerEndpoints, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="aiokafka")
    admin = servers.kafka_settings()
    # no PLAINTEXT listener: neither the client port nor the controller's answers a plaintext client
    for bootstrap in (servers.kafka_bootstrap, servers.kafka_controller):
        await _refused({"bootstrap_servers": bootstrap}, caplog)
    wrong = admin.model_copy(update={"sasl_password": SecretStr("not-the-password")})
    assert "SaslAuthenticationFailed" in await _refused(wrong.client_kwargs(), caplog)
    stranger = admin.model_copy(update={"sasl_username": "mallory"})
    assert "SaslAuthenticationFailed" in await _refused(stranger.client_kwargs(), caplog)
    system_store = admin.model_copy(update={"ssl_ca_file": None})  # the broker's CA is not a public one
    assert "CERTIFICATE_VERIFY_FAILED" in await _refused(system_store.client_kwargs(), caplog)
    # the right credentials connect (what the refusals above are compared with)
    producer = AIOKafkaProducer(**admin.client_kwargs())
    await producer.start()
    await producer.stop()


async def test_each_service_user_may_only_do_what_its_acls_grant(servers: ServerEndpoints,
                                                                 kafka_topics: str) -> None:
    prefix = kafka_topics

    async def produce(service: str, topic: str) -> None:
        producer = AIOKafkaProducer(**servers.kafka_settings(prefix, service).client_kwargs())
        await producer.start()
        try:
            await asyncio.wait_for(producer.send_and_wait(topic, b"x", key=b"c/d"), 30)
        finally:
            await producer.stop()

    await produce("bridge", topic_name(SIGNALS_RAW, prefix))  # its job
    # ... but it may not forge estimates or alerts, and the writer (a reader) may not write what it stores
    for service, topic in (("bridge", ESTIMATES), ("writer", ALERTS), ("writer", ESTIMATES),
                           ("inference", ALERTS), ("notifier", SIGNALS_RAW)):
        with pytest.raises(TopicAuthorizationFailedError):
            await produce(service, topic_name(topic, prefix))
    # nor may a service reach another deployment's (or test's) topics: the grants are per prefix
    other = f"t{uuid.uuid4().hex[:8]}."
    with pytest.raises(TopicAuthorizationFailedError):
        await produce("bridge", topic_name(SIGNALS_RAW, other))

    # the bridge may not read the raw signals it writes (only the processor does): not in the processor's group,
    # and not without a group either
    bridge = servers.kafka_settings(prefix, "bridge").client_kwargs()
    grouped = AIOKafkaConsumer(topic_name(SIGNALS_RAW, prefix), group_id=f"{prefix}bpstream-processor", **bridge)
    try:
        with pytest.raises(GroupAuthorizationFailedError):  # joining the group is refused at start
            await grouped.start()
    finally:
        await grouped.stop()
    alone = AIOKafkaConsumer(**bridge, enable_auto_commit=False)
    await alone.start()
    try:
        alone.assign([TopicPartition(topic_name(SIGNALS_RAW, prefix), 0)])
        with pytest.raises(TopicAuthorizationFailedError):
            await asyncio.wait_for(alone.getone(), 30)
    finally:
        await alone.stop()


def _influx(settings: InfluxSettings, statement: str) -> int:
    """The HTTP status InfluxDB answers ``statement`` with (200 when it runs)."""
    try:
        run_sync(lambda: influx_api.query_rows(settings, statement))
    except ApiException as exc:
        return int(exc.status)
    return 200


def test_influxdb_refuses_http_anonymous_and_wrong_passwords(servers: ServerEndpoints, influx_db: str) -> None:
    admin = servers.influx_settings(influx_db)
    assert admin.url.startswith("https://")
    assert _influx(admin, "SHOW DATABASES") == 200
    http = admin.model_copy(update={"url": admin.url.replace("https://", "http://")})
    assert _influx(http, "SHOW DATABASES") == 400  # "Client sent an HTTP request to an HTTPS server."
    anonymous = admin.model_copy(update={"username": None, "password": None})
    assert _influx(anonymous, "SHOW DATABASES") == 401
    assert _influx(admin.model_copy(update={"password": SecretStr("not-the-password")}), "SHOW DATABASES") == 401
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):  # the server's CA is not a public one
        run_sync(lambda: influx_api.query_rows(admin.model_copy(update={"ca_file": None}), "SHOW DATABASES"))


def test_the_writer_writes_only_and_grafana_reads_only(servers: ServerEndpoints, influx_db: str) -> None:
    writer, grafana = servers.influx_settings(influx_db, "writer"), servers.influx_settings(influx_db, "grafana")
    point = f"bp_estimate,clinic=c1,device=d1 sbp=120.5 {1_760_000_000_000_000_000}"
    with influx_api.sync_client(writer) as client, client.write_api(write_options=SYNCHRONOUS) as api:
        api.write(bucket=influx_api.bucket(writer), record=point, write_precision=WritePrecision.NS)
    assert _influx(writer, "SELECT * FROM bp_estimate") == 403
    assert _influx(writer, f"CREATE DATABASE other_{influx_db}") == 403
    assert _influx(writer, f'DROP DATABASE "{influx_db}"') == 403
    assert [r["sbp"] for r in run_sync(lambda: influx_api.query_rows(grafana, "SELECT * FROM bp_estimate"))] == [120.5]
    with (influx_api.sync_client(grafana) as client, client.write_api(write_options=SYNCHRONOUS) as api,
          pytest.raises(ApiException) as refused):
        api.write(bucket=influx_api.bucket(grafana), record=point, write_precision=WritePrecision.NS)
    assert refused.value.status == 403
    assert _influx(grafana, f'DROP DATABASE "{influx_db}"') == 403

