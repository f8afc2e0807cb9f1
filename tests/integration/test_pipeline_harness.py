"""The pipeline harness against the real Mosquitto: a finished run leaves no MQTT session behind.

A bridge keeps a persistent session (QoS 1 messages wait for it across a restart). When a demo, benchmark or
test run is over, ``end_mqtt_session`` must discard it, or the broker would queue every later message for a
client that never returns.
"""

from __future__ import annotations

import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bpstream.demo.pipeline import end_mqtt_session
from bpstream.localservers import ServerEndpoints
from bpstream.shared.mqtt import configure_client

pytestmark = pytest.mark.integration


def connect(servers: ServerEndpoints, client_id: str, *, clean_start: bool,
            received: list[bytes] | None = None) -> tuple[mqtt.Client, bool]:
    """Connect with a 1 h session; returns the client and whether the broker still had a session for it."""
    ready = threading.Event()
    present: list[bool] = []

    def on_connect(_c: object, _u: object, flags: mqtt.ConnectFlags, _rc: object, _p: object) -> None:
        present.append(bool(flags.session_present))
        ready.set()

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.on_connect = on_connect
    configure_client(client, servers.mqtt_settings("probe"))
    if received is not None:
        client.on_message = lambda _c, _u, message: received.append(message.payload)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    client.connect(servers.mqtt_host, servers.mqtt_port, clean_start=clean_start, properties=props)
    client.loop_start()
    assert ready.wait(10), "no CONNACK"
    return client, present[0]


def publish(servers: ServerEndpoints, topic: str, payload: bytes) -> None:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    configure_client(client, servers.mqtt_settings("probe"))
    client.connect(servers.mqtt_host, servers.mqtt_port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def test_a_finished_runs_bridge_session_is_discarded(servers: ServerEndpoints) -> None:
    client_id, topic = f"harness-{uuid.uuid4().hex[:8]}", f"bpstream-probe/harness-{uuid.uuid4().hex[:8]}"
    client, _ = connect(servers, client_id, clean_start=True)
    client.subscribe(topic, qos=1)
    client.disconnect()
    client.loop_stop()
    # While it is away, the broker keeps its session and queues a QoS 1 message for it (what a restart needs).
    publish(servers, topic, b"queued for the session")
    received: list[bytes] = []
    client, present = connect(servers, client_id, clean_start=False, received=received)
    assert present
    client.disconnect()
    client.loop_stop()

    assert end_mqtt_session(servers.mqtt_settings("probe"), client_id)
    publish(servers, topic, b"nobody should keep this")
    client, present = connect(servers, client_id, clean_start=False, received=received)
    try:
        assert not present  # the session, its subscription and its queue are gone
    finally:
        client.disconnect()
        client.loop_stop()
    assert b"nobody should keep this" not in received
