"""Faust's broker credentials from the same Kafka settings the aiokafka clients use (SASL and TLS).

Faust is imported here only when credentials are asked for, so images without Faust can import ``shared``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bpstream.shared.settings import KafkaSettings

if TYPE_CHECKING:
    import faust


def broker_credentials(kafka: KafkaSettings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """SASL (with the TLS context for ``SASL_SSL``), TLS only for ``SSL``, or None for a plaintext broker."""
    import faust

    tls = "SSL" in kafka.security_protocol.upper()
    if kafka.sasl_mechanism:
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
            mechanism=kafka.sasl_mechanism,
            ssl_context=kafka.ssl_context() if tls else None,
        )
    if tls:
        return faust.SSLCredentials(kafka.ssl_context())
    return None
