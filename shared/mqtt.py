"""MQTT client set-up from ``MqttSettings``: credentials and a verifying TLS context on a paho client, and the
``BPSTREAM_MQTT_*`` variables that hand the same settings to another process.

>>> from bpstream.shared.settings import MqttSettings
>>> mqtt_env(MqttSettings(host="broker", port=8883, username="bpstream-bridge"))["BPSTREAM_MQTT_USERNAME"]
'bpstream-bridge'
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from bpstream.shared.settings import MqttSettings
from bpstream.shared.tls import client_ssl_context

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt


def ssl_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """The client TLS context the settings ask for (None when ``tls`` is off)."""
    if not settings.tls:
        return None
    return client_ssl_context(settings.ca_file, settings.cert_file, settings.key_file)


def configure_client(client: mqtt.Client, settings: MqttSettings) -> None:
    """Set the user name/password and TLS of a paho client from the settings (before ``connect``)."""
    if settings.username:
        client.username_pw_set(settings.username,
                               settings.password.get_secret_value() if settings.password else None)
    context = ssl_context(settings)
    if context is not None:
        client.tls_set_context(context)


def mqtt_env(settings: MqttSettings) -> dict[str, str]:
    """``BPSTREAM_MQTT_*`` variables that reproduce ``settings`` in a child process."""
    env = {"BPSTREAM_MQTT_HOST": settings.host, "BPSTREAM_MQTT_PORT": str(settings.port),
           "BPSTREAM_MQTT_TLS": "true" if settings.tls else "false"}
    optional = {"USERNAME": settings.username, "CA_FILE": settings.ca_file, "CERT_FILE": settings.cert_file,
                "KEY_FILE": settings.key_file,
                "PASSWORD": settings.password.get_secret_value() if settings.password else None}
    env.update({f"BPSTREAM_MQTT_{key}": value for key, value in optional.items() if value})
    return env
