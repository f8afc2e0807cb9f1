"""deploy/mosquitto: the compose stack's broker configuration and per-device ACL, on a real Mosquitto.

The test starts Debian's Mosquitto 2.x with deploy/mosquitto/mosquitto.conf and acl (only the paths and
the TLS listener moved to a temporary folder and a free loopback port, its certificate from a test CA),
assembles the password file and the ACL the way the compose service `mosquitto-auth` does (mosquitto_passwd -b
for the service accounts, then the device registry's fragments written by `bpstream devices`), and checks with
MQTT 5 clients over TLS what the deployment relies on: no anonymous, plaintext or wrongly authenticated client,
a device publishes only its own topics of its own clinic, and the bridges' shared subscription receives what
devices publish.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bpstream.localservers import pki
from bpstream.shared.tls import client_ssl_context
from bpstream.shared.topics import (
    MQTT_CUFF_WILDCARD,
    mqtt_cuff_topic,
    mqtt_shared_subscription,
    mqtt_signals_topic,
    mqtt_status_topic,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ACCOUNTS = {"bpstream-bridge": "bridge-secret", "bpstream-simulator": "simulator-secret",
            "bpstream-cuff": "cuff-secret"}
#: Devices (clinic, device) registered with `bpstream devices add --state <registry>`; passwords kept here.
DEVICES = (("clinic-1", "dev-a"), ("clinic-1", "dev-b"), ("clinic-2", "dev-a"))
DEV_A, DEV_B, OTHER_CLINIC_DEV_A = (f"{c}/{d}" for c, d in DEVICES)
TLS: dict[str, ssl.SSLContext] = {}
WAIT_S = 10.0


def _binary(name: str, debian_path: str) -> str:
    found = shutil.which(name) or (debian_path if Path(debian_path).exists() else None)
    assert found, f"{name} is not installed: run scripts/bootstrap.sh (Debian package mosquitto)"
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    folder = tmp_path_factory.mktemp("mosquitto")
    (folder / "data").mkdir()
    ca = pki.ensure_ca(folder / "pki")
    server = pki.issue(ca, "server", hosts=("127.0.0.1", "localhost", "mosquitto"))
    TLS["context"] = client_ssl_context(ca.cert)
    # The registry, as `bpstream devices add --state` leaves it: passwords printed once, fragments written.
    registry = folder / "registry"
    for clinic, device in DEVICES:
        result = subprocess.run([sys.executable, "-m", "bpstream", "devices", "add", "--clinic", clinic, "--device",
                                 device, "--state", str(registry), "--no-reload"],
                                capture_output=True, text=True, timeout=60, check=True)
        ACCOUNTS[f"{clinic}/{device}"] = result.stdout.split("password: ")[1].split()[0]
    # What the compose service mosquitto-auth does: service accounts from .env, then the registry's fragments.
    passwd = folder / "passwd"
    passwd.touch()
    mosquitto_passwd = _binary("mosquitto_passwd", "/usr/bin/mosquitto_passwd")
    for user in ("bpstream-bridge", "bpstream-simulator", "bpstream-cuff"):
        command = [mosquitto_passwd, "-b", str(passwd), user, ACCOUNTS[user]]
        subprocess.run(command, check=True, capture_output=True, timeout=30)
    with passwd.open("a") as out:
        out.write((registry / "devices.passwd").read_text())
    acl = folder / "acl"
    acl.write_text((ROOT / "deploy" / "mosquitto" / "acl").read_text() + (registry / "devices.acl").read_text())
    port = _free_port()
    config = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    moves = (("/mosquitto/auth/passwd", str(passwd)), ("/mosquitto/auth/acl", str(acl)),
             ("/mosquitto/data/", f"{folder / 'data'}/"), ("/mosquitto/certs/ca.crt", str(ca.cert)),
             ("/mosquitto/certs/server.crt", str(server.cert)), ("/mosquitto/certs/server.key", str(server.key)),
             ("listener 8883 0.0.0.0", f"listener {port} 127.0.0.1"))
    for original, moved in moves:
        assert original in config, original
        config = config.replace(original, moved)
    assert "listener 1883" not in config and config.count("\nlistener ") == 1  # TLS is the only listener
    if os.geteuid() == 0:
        config += "\nuser root\n"  # the temporary files belong to root; don't drop to the mosquitto user
    (folder / "mosquitto.conf").write_text(config)
    log = (folder / "mosquitto.log").open("wb")
    command = [_binary("mosquitto", "/usr/sbin/mosquitto"), "-c", str(folder / "mosquitto.conf")]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert process.poll() is None, (folder / "mosquitto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not open its port"
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


class Client:
    """A connected MQTT 5 client that records what it receives and the broker's answers."""

    def __init__(self, port: int, username: str | None, password: str | None, *, tls: bool = True) -> None:
        self.connected = threading.Event()
        self.connect_code: ReasonCode | None = None
        self.messages: list[tuple[str, bytes]] = []
        self.received = threading.Event()
        self.acks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        client_id = f"test-{username}-{time.monotonic_ns()}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set_context(TLS["context"])
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(WAIT_S), "no CONNACK"

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, code: ReasonCode,
                    _p: Properties | None) -> None:
        self.connect_code = code
        self.connected.set()

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        self.messages.append((message.topic, message.payload))
        self.received.set()

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, code: ReasonCode, _p: Properties) -> None:
        self.acks[mid] = code

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, codes: list[ReasonCode],
                      _p: Properties) -> None:
        self.subacks[mid] = codes

    def publish(self, topic: str) -> ReasonCode:
        info = self.client.publish(topic, f"payload for {topic}".encode(), qos=1)
        deadline = time.monotonic() + WAIT_S
        while info.mid not in self.acks:
            assert time.monotonic() < deadline, f"no PUBACK for {topic}"
            time.sleep(0.01)
        return self.acks[info.mid]

    def subscribe(self, topic_filter: str) -> list[ReasonCode]:
        _, mid = self.client.subscribe(topic_filter, qos=1)
        deadline = time.monotonic() + WAIT_S
        while mid not in self.subacks:
            assert time.monotonic() < deadline, f"no SUBACK for {topic_filter}"
            time.sleep(0.01)
        return self.subacks[mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _connect(port: int, username: str | None, password: str | None) -> Client:
    client = Client(port, username, password)
    assert client.connect_code is not None
    return client


def test_anonymous_and_wrong_passwords_are_refused(broker: int) -> None:
    for username, password in ((None, None), (DEV_A, "not-the-password"), ("dev-a", ACCOUNTS[DEV_A]),
                               ("stranger", "whatever")):
        client = _connect(broker, username, password)
        try:
            assert client.connect_code is not None
            assert client.connect_code.is_failure, (username, client.connect_code)
        finally:
            client.close()


def test_a_device_publishes_its_own_topics_only_and_the_bridges_receive_them(broker: int) -> None:
    bridge = _connect(broker, "bpstream-bridge", ACCOUNTS["bpstream-bridge"])
    device = _connect(broker, DEV_A, ACCOUNTS[DEV_A])
    try:
        assert bridge.connect_code is not None
        assert not bridge.connect_code.is_failure
        (granted,) = bridge.subscribe(mqtt_shared_subscription("bpstream-bridge"))
        assert not granted.is_failure, granted
        own = mqtt_signals_topic("clinic-1", "dev-a")
        assert not device.publish(own).is_failure
        assert not device.publish(mqtt_status_topic("clinic-1", "dev-a")).is_failure
        # Impersonating another device: the broker refuses the PUBLISH (MQTT 5 PUBACK "not authorized").
        forged = device.publish(mqtt_signals_topic("clinic-1", "dev-b"))
        assert forged.is_failure
        assert forged.value == 0x87
        # The same device id in another clinic is another device: no escape across clinics.
        for topic in (mqtt_signals_topic("clinic-2", "dev-a"), mqtt_status_topic("clinic-2", "dev-a"),
                      mqtt_cuff_topic("clinic-2", "dev-a")):
            escaped = device.publish(topic)
            assert escaped.is_failure and escaped.value == 0x87, topic
        # A marker from the simulator account (allowed for any device) proves delivery has caught up.
        simulator = _connect(broker, "bpstream-simulator", ACCOUNTS["bpstream-simulator"])
        try:
            marker = mqtt_signals_topic("clinic-9", "sim-device-1")
            assert not simulator.publish(marker).is_failure
        finally:
            simulator.close()
        deadline = time.monotonic() + WAIT_S
        while marker not in {topic for topic, _ in bridge.messages}:
            assert time.monotonic() < deadline, bridge.messages
            time.sleep(0.01)
        assert [topic for topic, _ in bridge.messages] == [own, marker]
    finally:
        bridge.close()
        device.close()


def test_a_device_cannot_read_other_devices(broker: int) -> None:
    snooper = _connect(broker, DEV_B, ACCOUNTS[DEV_B])
    device = _connect(broker, DEV_A, ACCOUNTS[DEV_A])
    try:
        snooper.subscribe("bpstream/+/+/signals")
        own_status = mqtt_status_topic("clinic-1", "dev-b")
        snooper.subscribe(own_status)
        assert not device.publish(mqtt_signals_topic("clinic-1", "dev-a")).is_failure
        # Then a message the snooper may read, published after dev-a's was acknowledged: once it arrives,
        # anything routed to the snooper before it has arrived too.
        assert not snooper.publish(own_status).is_failure
        assert snooper.received.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while own_status not in {topic for topic, _ in snooper.messages}:
            assert time.monotonic() < deadline, snooper.messages
            time.sleep(0.01)
        assert [topic for topic, _ in snooper.messages] == [own_status]
    finally:
        snooper.close()
        device.close()


def test_cuff_readings_from_the_cuff_account_and_the_own_device_reach_the_bridges(broker: int) -> None:
    bridge = _connect(broker, "bpstream-bridge", ACCOUNTS["bpstream-bridge"])
    cuff = _connect(broker, "bpstream-cuff", ACCOUNTS["bpstream-cuff"])
    device = _connect(broker, DEV_A, ACCOUNTS[DEV_A])
    try:
        (granted,) = bridge.subscribe(mqtt_shared_subscription("bpstream-bridge", MQTT_CUFF_WILDCARD))
        assert not granted.is_failure, granted
        own = mqtt_cuff_topic("clinic-1", "dev-a")
        assert not device.publish(own).is_failure
        forged = device.publish(mqtt_cuff_topic("clinic-1", "dev-b"))
        assert forged.is_failure and forged.value == 0x87
        # The cuff account writes cuff readings for any device, and nothing else.
        assert cuff.publish(mqtt_signals_topic("clinic-1", "dev-b")).is_failure
        marker = mqtt_cuff_topic("clinic-1", "dev-b")
        assert not cuff.publish(marker).is_failure
        deadline = time.monotonic() + WAIT_S
        while marker not in {topic for topic, _ in bridge.messages}:
            assert time.monotonic() < deadline, bridge.messages
            time.sleep(0.01)
        assert [topic for topic, _ in bridge.messages] == [own, marker]
    finally:
        bridge.close()
        cuff.close()
        device.close()


def test_plaintext_connections_are_refused(broker: int) -> None:
    # An MQTT 5 CONNECT in plaintext to the only listener (TLS): the broker closes without a CONNACK (0x20).
    connect = bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([5, 0x02, 0, 30, 0, 0, 0])
    with socket.create_connection(("127.0.0.1", broker), timeout=WAIT_S) as sock:
        sock.sendall(connect)
        try:
            answer = sock.recv(16)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"\x20"), answer
