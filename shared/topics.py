"""MQTT topic layout and Kafka topic names, in one place.

Devices publish to ``bpstream/<clinic>/<device>/signals`` and announce presence (and their last will) on
``bpstream/<clinic>/<device>/status``; a clinic's validated cuff (or a clinician, ``bpstream calibrate``)
publishes a cuff reading for a patient's device on ``bpstream/<clinic>/<device>/cuff``. A clinic gateway
publishes batches of its devices' chunks (``shared.gateway.ChunkBatch``) on
``bpstream/<clinic>/gateway/<gateway>/batch`` (five levels, so it never collides with a device's topics). Bridges
read signals, batches and cuff readings through MQTT 5 shared subscriptions so several bridges split the load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

MQTT_ROOT = "bpstream"
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def mqtt_signals_topic(clinic_id: str, device_id: str) -> str:
    """Topic a device publishes its signal chunks to."""
    return f"{MQTT_ROOT}/{clinic_id}/{device_id}/signals"


def mqtt_status_topic(clinic_id: str, device_id: str) -> str:
    """Topic for a device's online/offline status (retained, also its MQTT last will)."""
    return f"{MQTT_ROOT}/{clinic_id}/{device_id}/status"


def mqtt_cuff_topic(clinic_id: str, device_id: str) -> str:
    """Topic a cuff reading (JSON) for one patient's device is published to."""
    return f"{MQTT_ROOT}/{clinic_id}/{device_id}/cuff"


def mqtt_gateway_topic(clinic_id: str, gateway_id: str) -> str:
    """Topic a clinic gateway publishes its chunk batches to."""
    return f"{MQTT_ROOT}/{clinic_id}/gateway/{gateway_id}/batch"


def parse_gateway_topic(topic: str) -> tuple[str, str]:
    """Return ``(clinic_id, gateway_id)`` of a gateway batch topic or raise ``ValueError``."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != MQTT_ROOT or parts[2] != "gateway" or parts[4] != "batch":
        raise ValueError(f"not a gateway batch topic: {topic!r}")
    if not ID_PATTERN.match(parts[1]) or not ID_PATTERN.match(parts[3]):
        raise ValueError(f"bad clinic or gateway id in topic {topic!r}")
    return parts[1], parts[3]


MQTT_SIGNALS_WILDCARD = f"{MQTT_ROOT}/+/+/signals"
MQTT_GATEWAY_WILDCARD = f"{MQTT_ROOT}/+/gateway/+/batch"
MQTT_CUFF_WILDCARD = f"{MQTT_ROOT}/+/+/cuff"
MQTT_STATUS_WILDCARD = f"{MQTT_ROOT}/+/+/status"


def mqtt_shared_subscription(group: str, topic_filter: str = MQTT_SIGNALS_WILDCARD) -> str:
    """MQTT 5 shared subscription filter: each message goes to one member of ``group``."""
    return f"$share/{group}/{topic_filter}"


def parse_signals_topic(topic: str) -> tuple[str, str]:
    """Return ``(clinic_id, device_id)`` of a signals topic or raise ``ValueError``."""
    return parse_device_topic(topic, "signals")


def parse_device_topic(topic: str, leaf: str) -> tuple[str, str]:
    """Return ``(clinic_id, device_id)`` of ``bpstream/<clinic>/<device>/<leaf>`` or raise ``ValueError``."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != MQTT_ROOT or parts[3] != leaf:
        raise ValueError(f"not a {leaf} topic: {topic!r}")
    clinic_id, device_id = parts[1], parts[2]
    if not ID_PATTERN.match(clinic_id) or not ID_PATTERN.match(device_id):
        raise ValueError(f"bad clinic or device id in topic {topic!r}")
    return clinic_id, device_id


@dataclass(frozen=True, slots=True)
class KafkaTopic:
    """A Kafka topic the system creates explicitly before any service starts."""

    name: str
    partitions: int
    #: Retention in milliseconds (-1 keeps forever).
    retention_ms: int = 7 * 24 * 3600 * 1000
    compacted: bool = False


#: Raw signal chunks from the bridge, keyed by ``clinic/device`` (``device_key``).
SIGNALS_RAW = KafkaTopic("signals.raw", partitions=6)
#: Anything malformed, at any hop, with the reason and the original bytes.
SIGNALS_DLQ = KafkaTopic("signals.dlq", partitions=1, retention_ms=7 * 24 * 3600 * 1000)  # see dlq_retention_s
#: Model-ready windows from the processor, keyed by ``clinic/device`` (``device_key``).
WINDOWS = KafkaTopic("windows", partitions=6)
#: Blood-pressure estimates from inference, keyed by ``clinic/device`` (``device_key``).
ESTIMATES = KafkaTopic("estimates", partitions=6)
#: Alerts raised and resolved by alerting, keyed by ``clinic/device`` (``device_key``).
ALERTS = KafkaTopic("alerts", partitions=3, retention_ms=90 * 24 * 3600 * 1000)
#: Signal quality and gap events from the processor (for InfluxDB), keyed by ``clinic/device`` (``device_key``).
QUALITY = KafkaTopic("quality", partitions=3)

#: The alerting service's per-patient detector state, keyed by ``clinic/device`` (compacted: latest state per device;
#: a silent device's state is deleted by a tombstone). Created by the alerting service at start (its private state).
ALERTING_STATE = KafkaTopic("alerting.state", partitions=3, retention_ms=-1, compacted=True)

#: Validated cuff readings from the bridge, keyed by ``clinic/device`` (``cuff_key``); compacted, so the latest
#: reading of every device is kept forever and inference rebuilds its calibrations from it at start.
CUFF = KafkaTopic("cuff", partitions=3, retention_ms=-1, compacted=True)
#: Inference's finished calibrations (cuff reading + the model's reference output around it), keyed by
#: ``clinic/device``; compacted. Created by the inference service at start (its private state).
CALIBRATION_STATE = KafkaTopic("calibration.state", partitions=3, retention_ms=-1, compacted=True)

#: The notifier's delivery state, one record per alert episode (key = alert_id, compacted): which transition
#: reached which channel, when the raise was first handled, acknowledgement seen. Read back on start so that a
#: restart never notifies twice.
NOTIFY_STATE = KafkaTopic("notify.state", partitions=3, retention_ms=-1, compacted=True)
#: Acknowledgements of alert episodes (``bpstream alerts ack ID``), key = alert_id, compacted.
ALERT_ACKS = KafkaTopic("alerts.acks", partitions=3, retention_ms=-1, compacted=True)
#: Every notification delivery attempt (webhook, email, escalation), keyed by device id; stored by the writer
#: as the ``bp_notification`` measurement.
NOTIFICATIONS = KafkaTopic("notifications", partitions=3, retention_ms=90 * 24 * 3600 * 1000)

#: The processor's Faust application id (its consumer group, and the prefix of its state table's changelog).
PROCESSOR_APP_ID = "bpstream-processor"
#: The processor's per-device state table.
PROCESSOR_STATE_TABLE = "device-state"


def processor_changelog(app_id: str = PROCESSOR_APP_ID) -> KafkaTopic:
    """The processor's state-table changelog: Faust names it ``<app id>-<table>-changelog`` (the topic prefix goes
    in front of the app id, i.e. of the whole name); co-partitioned with ``signals.raw``, compacted."""
    return KafkaTopic(f"{app_id}-{PROCESSOR_STATE_TABLE}-changelog", partitions=SIGNALS_RAW.partitions,
                      retention_ms=-1, compacted=True)


#: The processor's changelog under the default app id (deployments create it with the other topics).
PROCESSOR_CHANGELOG = processor_changelog()

#: Every topic the system creates: the pipeline's, the cuff and notification topics, and each service's private
#: state (alerting.state, calibration.state, notify.state, alerts.acks, the processor's changelog). Services
#: ensure the ones they use at start; a unit test checks that each of those is listed here.
ALL_TOPICS: tuple[KafkaTopic, ...] = (SIGNALS_RAW, SIGNALS_DLQ, WINDOWS, ESTIMATES, ALERTS, QUALITY, CUFF,
                                      NOTIFY_STATE, ALERT_ACKS, NOTIFICATIONS, ALERTING_STATE, CALIBRATION_STATE,
                                      PROCESSOR_CHANGELOG)


def device_key(clinic_id: str, device_id: str) -> str:
    """Kafka key (and state key) of everything about one device: ``clinic/device``. Device ids are unique only
    within a clinic, so two clinics' ``dev-1`` never share a key, a partition's state or a detector."""
    return f"{clinic_id}/{device_id}"


def cuff_key(clinic_id: str, device_id: str) -> str:
    """Kafka key of a device's cuff readings and calibration: ``clinic/device``."""
    return f"{clinic_id}/{device_id}"


def topic_name(topic: KafkaTopic, prefix: str = "") -> str:
    """The topic's name with an optional prefix (tests use a unique prefix per test)."""
    return f"{prefix}{topic.name}"


class HasTopicPrefix(Protocol):
    """Anything with the deployment's topic prefix (``KafkaSettings``)."""

    @property
    def topic_prefix(self) -> str: ...


#: Each pipeline consumer group and the topics it reads (group names get the topic prefix too). The notifier
#: is downstream of the pipeline (its lag is its receivers' availability), so the drain checks leave it out.
PIPELINE_GROUPS: Mapping[str, Sequence[KafkaTopic]] = {
    "bpstream-processor": (SIGNALS_RAW,),
    "bpstream-inference": (WINDOWS,),
    "bpstream-alerting": (ESTIMATES,),
    "bpstream-writer": (ESTIMATES, ALERTS, QUALITY, SIGNALS_DLQ, CUFF, NOTIFICATIONS),
}


def group_name(group: str, settings: HasTopicPrefix) -> str:
    """A consumer group's name with the topic prefix, so tests and tenants sharing a cluster stay apart."""
    return f"{settings.topic_prefix}{group}"
