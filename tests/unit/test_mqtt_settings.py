"""MQTT client settings: TLS by default, the same settings handed to a child process, a paho client set up
with the account and a verifying TLS context, and the simulator's broker URLs."""

from __future__ import annotations

import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import SecretStr

from bpstream.localservers import pki
from bpstream.shared.mqtt import configure_client, mqtt_env, ssl_context
from bpstream.shared.settings import MqttSettings
from bpstream.shared.tls import TlsConfigError


def test_tls_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BPSTREAM_MQTT_TLS", "BPSTREAM_MQTT_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = MqttSettings()
    assert settings.tls and settings.port == 8883
    context = ssl_context(settings)
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert ssl_context(MqttSettings(tls=False)) is None


def test_env_round_trips_through_a_child_process_environment(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    ca = pki.ensure_ca(tmp_path)
    original = MqttSettings(host="broker", port=18883, username="clinic-a/dev-1", password=SecretStr("s3cret"),
                            ca_file=str(ca.cert))
    env = mqtt_env(original)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert MqttSettings() == original
    assert "BPSTREAM_MQTT_CERT_FILE" not in env  # unset settings are not exported


def test_configure_client_sets_the_account_and_tls(tmp_path: Path) -> None:
    ca = pki.ensure_ca(tmp_path)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    configure_client(client, MqttSettings(username="bpstream-bridge", password=SecretStr("pw"), ca_file=str(ca.cert)))
    assert client.username == "bpstream-bridge" and client.password == "pw"
    assert client._ssl_context is not None  # paho has no public getter
    with pytest.raises(TlsConfigError):
        configure_client(mqtt.Client(CallbackAPIVersion.VERSION2), MqttSettings(ca_file=str(tmp_path / "none.crt")))


def test_simulator_broker_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    from bpstream.simulators.cli import _broker

    for name in ("BPSTREAM_MQTT_USERNAME", "BPSTREAM_MQTT_PASSWORD", "BPSTREAM_MQTT_TLS"):
        monkeypatch.delenv(name, raising=False)
    secure = _broker("mqtts://sim:pw@mosquitto:8883")
    assert (secure.host, secure.port, secure.username, secure.tls) == ("mosquitto", 8883, "sim", True)
    assert secure.password is not None and secure.password.get_secret_value() == "pw"
    plain = _broker("mqtt://127.0.0.1")
    assert (plain.port, plain.tls) == (1883, False)
    assert _broker("host").tls  # no scheme: TLS
