"""The local Mosquitto secured as deployed: TLS only, no anonymous access, per-device accounts pinned to their
own clinic and id, and ``bpstream devices`` applying changes to the running broker (no restart).

Devices are registered with the real CLI (``python -m bpstream devices ...``) against the running local broker.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bpstream.localservers import ServerEndpoints, status
from bpstream.shared.mqtt import configure_client
from bpstream.shared.settings import MqttSettings
from bpstream.shared.topics import mqtt_signals_topic

# `bpstream devices` reloads the shared broker (SIGHUP): restart it for the tests after these.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fresh_mosquitto_afterwards")]
WAIT_S = 10.0
#: The issue's bound: a revoked device is refused (and a connected one cut off) within 5 s.
REVOKE_BOUND_S = 5.0


class Client:
    """An MQTT 5 client that records its CONNACK, disconnects, PUBACKs and messages."""

    def __init__(self, settings: MqttSettings, *, connect: bool = True) -> None:
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connect_code: ReasonCode | None = None
        self.acks: dict[int, ReasonCode] = {}
        self.messages: list[str] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sec-{uuid.uuid4().hex[:10]}",
                                  protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        configure_client(self.client, settings)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_a: self.disconnected.set()
        self.client.on_publish = lambda _c, _u, mid, code, _p: self.acks.__setitem__(mid, code)
        self.client.on_message = lambda _c, _u, msg: self.messages.append(msg.topic)
        self.settings = settings
        if connect:
            self.client.connect(settings.host, settings.port, keepalive=30)
            self.client.loop_start()
            assert self.connected.wait(WAIT_S), "no CONNACK"

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, code: ReasonCode, _p: Properties | None) -> None:
        self.connect_code = code
        self.connected.set()

    def publish(self, topic: str) -> ReasonCode:
        info = self.client.publish(topic, b"payload", qos=1)
        deadline = time.monotonic() + WAIT_S
        while info.mid not in self.acks:
            assert time.monotonic() < deadline, f"no PUBACK for {topic}"
            time.sleep(0.01)
        return self.acks[info.mid]

    def subscribe(self, topic_filter: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic_filter, qos=1)
        assert done.wait(WAIT_S), "no SUBACK"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _with(settings: MqttSettings, **changes: object) -> MqttSettings:
    return MqttSettings(**{**settings.model_dump(), **changes})


def _devices(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "bpstream", "devices", *args], capture_output=True, text=True,
                            timeout=60, env=os.environ)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def device(servers: ServerEndpoints, tmp_path: Path) -> Iterator[tuple[str, str, MqttSettings]]:
    """A freshly registered device of a fresh clinic: (clinic, device, its MQTT settings)."""
    clinic, device_id = f"clinic-{uuid.uuid4().hex[:6]}", "dev-1"
    secret = tmp_path / "password"
    _devices("add", "--clinic", clinic, "--device", device_id, "--password-file", str(secret))
    assert secret.stat().st_mode & 0o077 == 0
    yield clinic, device_id, _with(servers.mqtt_settings(), username=f"{clinic}/{device_id}",
                                   password=secret.read_text().strip())
    subprocess.run([sys.executable, "-m", "bpstream", "devices", "revoke", "--clinic", clinic, "--device", device_id],
                   capture_output=True, timeout=60, check=False)


def test_anonymous_wrong_password_and_plaintext_connections_are_refused(servers: ServerEndpoints) -> None:
    good = servers.mqtt_settings("observer")
    for settings in (_with(good, username=None, password=None), _with(good, password="not-the-password"),
                     _with(good, username="stranger")):
        client = Client(settings)
        try:
            assert client.connect_code is not None and client.connect_code.is_failure, settings.username
            assert client.connect_code.value in (0x86, 0x87), client.connect_code  # bad credentials / not authorized
        finally:
            client.close()
    # Plaintext MQTT 5 CONNECT to the TLS listener: the broker never answers with a CONNACK (0x20).
    connect = bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([5, 0x02, 0, 30, 0, 0, 0])
    with socket.create_connection((good.host, good.port), timeout=WAIT_S) as sock:
        sock.sendall(connect)
        try:
            answer = sock.recv(16)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"\x20"), answer
    # TLS to a broker whose certificate the client's CA did not sign: the client refuses the server.
    untrusted = Client(_with(good, ca_file=None), connect=False)  # the system store, not the local CA
    with pytest.raises(ssl.SSLCertVerificationError):
        untrusted.client.connect(good.host, good.port)


def test_a_device_cannot_publish_for_another_clinic_and_nothing_appears_there(
        servers: ServerEndpoints, device: tuple[str, str, MqttSettings]) -> None:
    clinic, device_id, settings = device
    other = f"other-{uuid.uuid4().hex[:6]}"
    observer = Client(servers.mqtt_settings("observer"))
    me = Client(settings)
    simulator = Client(servers.mqtt_settings("simulator"))
    try:
        assert me.connect_code is not None and not me.connect_code.is_failure
        observer.subscribe(f"bpstream/{other}/#")
        observer.subscribe(f"bpstream/{clinic}/#")
        own = me.publish(mqtt_signals_topic(clinic, device_id))
        assert not own.is_failure
        for topic in (mqtt_signals_topic(other, device_id), mqtt_signals_topic(clinic, "dev-2"),
                      f"bpstream/{other}/{device_id}/cuff"):
            refused = me.publish(topic)
            assert refused.is_failure and refused.value == 0x87, (topic, refused)  # MQTT 5 "not authorized"
        # A marker under the other clinic, published after the refused ones were answered: once the observer
        # has it, anything routed to it before has arrived too.
        marker = mqtt_signals_topic(other, "marker")
        assert not simulator.publish(marker).is_failure
        deadline = time.monotonic() + WAIT_S
        while marker not in observer.messages:
            assert time.monotonic() < deadline, observer.messages
            time.sleep(0.01)
        assert observer.messages == [mqtt_signals_topic(clinic, device_id), marker]
    finally:
        for c in (observer, me, simulator):
            c.close()


def test_a_revoked_device_is_cut_off_and_refused_without_a_broker_restart(
        servers: ServerEndpoints, device: tuple[str, str, MqttSettings]) -> None:
    clinic, device_id, settings = device
    pid_before = {s.name: s.pid for s in status()}["mosquitto"]
    connected = Client(settings)
    try:
        assert connected.connect_code is not None and not connected.connect_code.is_failure
        assert not connected.publish(mqtt_signals_topic(clinic, device_id)).is_failure
        began = time.monotonic()
        assert "revoked" in _devices("revoke", "--clinic", clinic, "--device", device_id)
        assert connected.disconnected.wait(REVOKE_BOUND_S), "the connected device was not cut off"
        cut_after = time.monotonic() - began
        again = Client(settings)
        try:
            assert again.connect_code is not None and again.connect_code.is_failure
        finally:
            again.close()
        assert time.monotonic() - began < REVOKE_BOUND_S, cut_after
    finally:
        connected.close()
    listing = _devices("list", "--clinic", clinic)
    assert f"{clinic}\t{device_id}\t" in listing and "revoked" in listing
    # Re-admitted with a new password: it connects again; the broker was never restarted.
    secret = _devices("add", "--clinic", clinic, "--device", device_id).split("password: ")[1].split()[0]
    back = Client(_with(settings, password=secret))
    try:
        assert back.connect_code is not None and not back.connect_code.is_failure
    finally:
        back.close()
    assert {s.name: s.pid for s in status()}["mosquitto"] == pid_before


def test_packets_over_the_broker_size_limit_are_refused(servers: ServerEndpoints) -> None:
    simulator = Client(servers.mqtt_settings("simulator"))
    try:
        simulator.client.publish(mqtt_signals_topic("clinic-x", "big"), b"x" * 300_000, qos=1)
        # Mosquitto drops a client whose PUBLISH exceeds message_size_limit (256 KiB, as deployed).
        assert simulator.disconnected.wait(WAIT_S)
    finally:
        simulator.close()
