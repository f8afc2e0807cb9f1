"""Typed, frozen settings read from the environment, validated at start and logged once (secrets masked).

Connection settings are shared (``BPSTREAM_KAFKA_*``, ``BPSTREAM_MQTT_*``, ``BPSTREAM_INFLUX_*``); each
service adds its own settings class with its own prefix (``BPSTREAM_BRIDGE_*``, ...) built on
``ServiceSettings``.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from bpstream.shared.tls import client_ssl_context

log = logging.getLogger(__name__)


class _Frozen(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")


class KafkaSettings(_Frozen):
    """How to reach Kafka."""

    model_config = SettingsConfigDict(env_prefix="BPSTREAM_KAFKA_", frozen=True, extra="ignore")

    bootstrap_servers: str = "127.0.0.1:9092"
    #: Prepended to every topic name (tests give each test its own prefix).
    topic_prefix: str = ""
    replication_factor: int = 1
    #: Secure by default, as every deployment and the local servers run: SCRAM over TLS. ``PLAINTEXT`` only on
    #: explicit request.
    security_protocol: str = "SASL_SSL"
    sasl_mechanism: str | None = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    #: TLS for ``SSL``/``SASL_SSL``: the CA that signed the brokers' certificates (the system store when
    #: unset) and, for mutual TLS, this client's certificate and key (PEM paths).
    ssl_ca_file: str | None = None
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None
    request_timeout_ms: int = 30_000
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    #: Retention of the dead-letter topic (it holds original payloads, i.e. readings): 7 days by default.
    dlq_retention_s: int = Field(default=7 * 24 * 3600, gt=0)

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments common to aiokafka producers, consumers and admin clients."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if "SSL" in self.security_protocol.upper():
            kwargs["ssl_context"] = self.ssl_context()
        if self.sasl_mechanism:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        return kwargs

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context from the CA / certificate / key settings (``bpstream.shared.tls``)."""
        return client_ssl_context(self.ssl_ca_file, self.ssl_cert_file, self.ssl_key_file)


class MqttSettings(_Frozen):
    """How to reach the MQTT broker."""

    model_config = SettingsConfigDict(env_prefix="BPSTREAM_MQTT_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    #: The broker's TLS listener (8883); plaintext MQTT is not offered by the local or the deployed broker.
    port: int = 8883
    username: str | None = None
    password: SecretStr | None = None
    #: TLS on by default; ``ca_file`` is the CA that signed the broker's certificate (None: the system store).
    tls: bool = True
    ca_file: str | None = None
    #: A client certificate and its key, for brokers that require mutual TLS.
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: int = 30


class InfluxSettings(_Frozen):
    """How to reach InfluxDB 1.x: writes to /api/v2/write (bucket "database/rp", token "username:password"),
    InfluxQL on /query, both through influxdb-client (``bpstream.shared.influx_api``)."""

    model_config = SettingsConfigDict(env_prefix="BPSTREAM_INFLUX_", frozen=True, extra="ignore")

    url: str = "https://127.0.0.1:8086"
    database: str = "bpstream"
    username: str | None = None
    password: SecretStr | None = None
    retention_policy: str | None = None
    timeout_s: float = 10.0
    #: CA that signed the server's HTTPS certificate (the system store when unset); verification stays on
    #: unless ``verify_ssl`` is turned off explicitly.
    ca_file: str | None = None
    verify_ssl: bool = True


class ServiceSettings(_Frozen):
    """Settings every service has. Subclass with ``model_config = SettingsConfigDict(env_prefix=...)``."""

    log_level: str = "INFO"
    log_json: bool = True
    #: Port for Prometheus metrics and /healthz (0 disables; bound to ``metrics_host``).
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    influx: InfluxSettings = Field(default_factory=InfluxSettings)


def log_settings(settings: BaseSettings, name: str) -> None:
    """Log the effective settings once at start; SecretStr values print as '**********'."""
    log.info("settings", extra={"service": name, "settings": settings.model_dump(mode="json")})
