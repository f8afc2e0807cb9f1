"""Settings from the environment (shared/settings.py): prefixes, types, frozen values, masked secrets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pydantic
import pytest

from bpstream.shared.settings import InfluxSettings, KafkaSettings, MqttSettings, ServiceSettings, log_settings

pytestmark = pytest.mark.unit


def test_connection_settings_come_from_prefixed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BPSTREAM_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    monkeypatch.setenv("BPSTREAM_KAFKA_TOPIC_PREFIX", "t1.")
    monkeypatch.setenv("BPSTREAM_MQTT_PORT", "11883")
    monkeypatch.setenv("BPSTREAM_INFLUX_URL", "http://127.0.0.1:18086")
    monkeypatch.setenv("BPSTREAM_INFLUX_DATABASE", "test_db")
    settings = ServiceSettings()
    assert settings.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert settings.kafka.topic_prefix == "t1."
    assert settings.mqtt.port == 11883
    assert (settings.influx.url, settings.influx.database) == ("http://127.0.0.1:18086", "test_db")


def test_badly_typed_env_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BPSTREAM_MQTT_PORT", "not-a-port")
    with pytest.raises(pydantic.ValidationError, match="port"):
        MqttSettings()


def test_settings_are_frozen() -> None:
    settings = KafkaSettings()
    with pytest.raises(pydantic.ValidationError):
        settings.bootstrap_servers = "elsewhere:9092"


def test_secrets_are_masked_in_dumps_and_logs(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("BPSTREAM_MQTT_PASSWORD", "hunter2-mqtt")
    monkeypatch.setenv("BPSTREAM_INFLUX_PASSWORD", "hunter2-influx")
    monkeypatch.setenv("BPSTREAM_KAFKA_SASL_PASSWORD", "hunter2-kafka")
    monkeypatch.setenv("BPSTREAM_KAFKA_SASL_MECHANISM", "PLAIN")
    settings = ServiceSettings()
    assert settings.mqtt.password is not None and settings.mqtt.password.get_secret_value() == "hunter2-mqtt"
    dumped = json.dumps(settings.model_dump(mode="json"))
    assert "hunter2" not in dumped and "**********" in dumped
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)
    with caplog.at_level(logging.INFO):
        log_settings(settings, "test")
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "hunter2" not in logged and "**********" in logged
    # The secret still reaches the client that needs it.
    assert settings.kafka.client_kwargs()["sasl_plain_password"] == "hunter2-kafka"


def test_defaults_point_at_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BPSTREAM_KAFKA_BOOTSTRAP_SERVERS", "BPSTREAM_MQTT_HOST", "BPSTREAM_INFLUX_URL"):
        monkeypatch.delenv(name, raising=False)
    assert KafkaSettings().bootstrap_servers.startswith("127.0.0.1:")
    assert MqttSettings().host == "127.0.0.1"
    assert InfluxSettings().url.startswith("https://127.0.0.1:")
    # secure unless told otherwise: SCRAM over TLS to Kafka, HTTPS (verified) to InfluxDB
    assert (KafkaSettings().security_protocol, KafkaSettings().sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert InfluxSettings().verify_ssl is True


def test_sasl_ssl_clients_get_a_verifying_context_that_trusts_the_configured_ca(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bpstream.localservers.pki import ensure_ca
    from bpstream.shared.faust_broker import broker_credentials

    ca = ensure_ca(tmp_path)
    for name, value in {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "SCRAM-SHA-512",
                        "SASL_USERNAME": "processor", "SASL_PASSWORD": "pw", "SSL_CA_FILE": str(ca.cert)}.items():
        monkeypatch.setenv(f"BPSTREAM_KAFKA_{name}", value)
    kafka = KafkaSettings()
    context = kafka.client_kwargs()["ssl_context"]
    assert context.check_hostname and context.verify_mode.name == "CERT_REQUIRED"
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "bpstream local CA"),),)]
    # the Faust processor gets the same: SCRAM over TLS with the CA (aiokafka refuses SASL_SSL without one)
    credentials = broker_credentials(kafka)
    assert credentials is not None and credentials.protocol.value == "SASL_SSL"
    assert credentials.mechanism.value == "SCRAM-SHA-512" and credentials.ssl_context is not None  # type: ignore[union-attr]
    assert "ssl_context" not in KafkaSettings(security_protocol="PLAINTEXT").client_kwargs()


def test_influx_https_verifies_by_default_with_the_configured_ca(monkeypatch: pytest.MonkeyPatch) -> None:
    from bpstream.shared import influx_api

    monkeypatch.setenv("BPSTREAM_INFLUX_CA_FILE", "/etc/bpstream/ca.crt")
    settings = InfluxSettings()
    assert influx_api.tls_kwargs(settings) == {"verify_ssl": True, "ssl_ca_cert": "/etc/bpstream/ca.crt"}
