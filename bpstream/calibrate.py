"""``bpstream calibrate``: publish a cuff reading for one patient's device over MQTT, as a clinic's cuff does.

The message is the same JSON a cuff publishes on ``bpstream/<clinic>/<device>/cuff``; the bridge validates it
(dead-letters it if implausible) and forwards it to the compacted ``cuff`` topic. MQTT settings come from
``BPSTREAM_MQTT_*`` like every other tool. Publishing is QoS 1 and waits for the broker's acknowledgement.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bpstream.shared.errors import BpstreamError
from bpstream.shared.mqtt import configure_client
from bpstream.shared.settings import MqttSettings
from bpstream.shared.topics import ID_PATTERN, mqtt_cuff_topic


class PublishError(BpstreamError):
    """The broker did not accept the cuff reading."""

    reason = "mqtt_publish"


def cuff_message(sbp: float, dbp: float, time_s: float | str | None = None, *, cuff_id: str = "manual",
                 confirmation: bool = False) -> dict[str, Any]:
    """The cuff JSON object (``time``: epoch seconds or ISO 8601; now when None)."""
    return {"sbp": float(sbp), "dbp": float(dbp), "time": time.time() if time_s is None else time_s,
            "cuff_id": cuff_id, "confirmation": bool(confirmation)}


def parse_time(value: str | None) -> float | str | None:
    """``--time``: epoch seconds stay a number, anything else is passed on as ISO 8601 (the bridge checks it)."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value


def publish_cuff(settings: MqttSettings, clinic_id: str, device_id: str, message: dict[str, Any], *,
                 timeout_s: float = 30.0) -> str:
    """Publish ``message`` (QoS 1) on the device's cuff topic and wait for the broker; return the topic."""
    for value, what in ((clinic_id, "clinic"), (device_id, "device")):
        if not ID_PATTERN.match(value):
            raise ValueError(f"{what} id {value!r} must match {ID_PATTERN.pattern}")
    topic = mqtt_cuff_topic(clinic_id, device_id)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id=f"bpstream-calibrate-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
    configure_client(client, settings)
    answers: dict[str, Any] = {}
    client.on_connect = lambda _c, _u, _f, reason, _p: answers.setdefault("connect", reason)
    client.on_publish = lambda _c, _u, _mid, reason, _p: answers.setdefault("puback", reason)
    client.connect(settings.host, settings.port, keepalive=settings.keepalive_s)
    client.loop_start()
    try:
        info = client.publish(topic, json.dumps(message).encode(), qos=1)
        deadline = time.monotonic() + timeout_s
        while not info.is_published() and time.monotonic() < deadline:
            refused = answers.get("connect")
            if refused is not None and refused.is_failure:
                raise PublishError(f"the broker refused the connection: {refused}")
            time.sleep(0.05)
        if not info.is_published():
            raise PublishError(f"the broker did not acknowledge the cuff reading within {timeout_s:g} s")
        puback = answers.get("puback")
        if puback is not None and puback.is_failure and puback.value != 0x10:  # 0x10: no subscriber yet
            raise PublishError(f"the broker refused the cuff reading: {puback}")
    finally:
        client.disconnect()
        client.loop_stop()
    return topic
