"""Real round trips that prove a server works, not just that its port is open.

* MQTT: subscribe, publish with QoS 1, receive the same payload (MQTT 5).
* Kafka: an admin client (SASL_SSL, the admin user) bootstraps and lists topics; the broker must be registered.
* InfluxDB: ``/ping`` answers (with its version) and ``SHOW DATABASES`` runs as the admin, over HTTPS.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bpstream.shared.settings import InfluxSettings, KafkaSettings


class ProbeFailed(Exception):
    """The server did not answer a round trip (yet)."""


def mqtt_round_trip(host: str, port: int, timeout_s: float = 5.0, *, username: str | None = None,
                    password: str | None = None, ca_file: str | None = None) -> None:
    """Over TLS (``ca_file``) with the probe account when given; the connection must be accepted."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from bpstream.shared.tls import client_ssl_context

    topic = f"bpstream-probe/{uuid.uuid4().hex}"
    payload = uuid.uuid4().bytes
    subscribed = threading.Event()
    received = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:12]}",
                         protocol=mqtt.MQTTv5)
    client.on_subscribe = lambda *args: subscribed.set()
    refused: list[str] = []

    def on_connect(_client: mqtt.Client, _userdata: object, _flags: object, reason: object,
                   _props: object) -> None:
        if getattr(reason, "is_failure", False):
            refused.append(str(reason))

    client.on_connect = on_connect
    if username:
        client.username_pw_set(username, password)
    if ca_file:
        client.tls_set_context(client_ssl_context(ca_file))

    def on_message(_client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.payload == payload:
            received.set()

    client.on_message = on_message
    try:
        client.connect(host, port, keepalive=10)
    except OSError as exc:  # ssl.SSLError is an OSError too
        raise ProbeFailed(f"MQTT connect to {host}:{port}: {exc}") from exc
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        if not subscribed.wait(timeout_s):
            why = f" (connection refused: {refused[0]})" if refused else ""
            raise ProbeFailed(f"MQTT subscribe was not acknowledged{why}")
        client.publish(topic, payload, qos=1)
        if not received.wait(timeout_s):
            raise ProbeFailed("MQTT message published was not received back")
    finally:
        client.disconnect()
        client.loop_stop()


async def kafka_round_trip(settings: KafkaSettings, timeout_s: float = 10.0) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    bootstrap = settings.bootstrap_servers
    admin = AIOKafkaAdminClient(**{**settings.client_kwargs(), "request_timeout_ms": int(timeout_s * 1000)})
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        await asyncio.wait_for(admin.list_topics(), timeout_s)
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout_s)
        if not cluster.get("brokers"):
            raise ProbeFailed("Kafka answered but has no registered broker yet")
    except (KafkaError, OSError, TimeoutError) as exc:
        raise ProbeFailed(f"Kafka at {bootstrap}: {type(exc).__name__}: {exc}") from exc
    finally:
        await admin.close()


async def influx_ping(settings: InfluxSettings, timeout_s: float = 5.0) -> str:
    """``/ping`` (no credentials needed); returns the version the server reports."""
    import aiohttp
    from influxdb_client.rest import ApiException

    from bpstream.shared import influx_api

    try:
        async with influx_api.async_client(settings, timeout_s=timeout_s) as client:
            return str(await client.version())
    except (ApiException, aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ProbeFailed(f"InfluxDB at {settings.url}: {type(exc).__name__}: {str(exc)[:200]}") from exc


async def influx_round_trip(settings: InfluxSettings, timeout_s: float = 5.0) -> str:
    """``/ping`` and ``SHOW DATABASES`` through influxdb-client; returns the version the server reports."""
    import aiohttp  # here, not at the top: only the writer's image has influxdb-client and aiohttp
    from influxdb_client.rest import ApiException

    from bpstream.shared import influx_api

    url = settings.url
    try:
        async with influx_api.async_client(settings, timeout_s=timeout_s) as client:
            version = str(await client.version())
            await influx_api.influxql(client, "SHOW DATABASES", epoch=None)
            return version
    except (ApiException, influx_api.InfluxQLError, aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ProbeFailed(f"InfluxDB at {url}: {type(exc).__name__}: {str(exc)[:200]}") from exc
