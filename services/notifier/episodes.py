"""``bpstream alerts list|ack``: alert episodes as Kafka holds them, and acknowledgements.

The episodes come from the ``alerts`` topic itself (latest record per ``alert_id``), joined with the
acknowledgements (``alerts.acks``) and what the notifier delivered (``notify.state``); nothing here depends on
the notifier running. An acknowledgement is a record on the compacted ``alerts.acks`` topic (key = alert_id):
the notifier reads it and stops escalating that episode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bpstream.services.notifier.stage import TRANSITIONS, decode_episode
from bpstream.shared.errors import DecodeError
from bpstream.shared.kafka import KafkaProducer
from bpstream.shared.kafka_tools import read_latest_by_key, read_topic
from bpstream.shared.messages import Alert, decode_alert
from bpstream.shared.notifications import AlertAck, decode_ack, encode
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import ALERT_ACKS, ALERTS, NOTIFY_STATE


@dataclass(frozen=True, slots=True)
class EpisodeView:
    """One episode for people: its latest alert, who acknowledged it, and what was delivered where."""

    alert: Alert
    ack: AlertAck | None = None
    delivered: tuple[str, ...] = field(default_factory=tuple)

    @property
    def open(self) -> bool:
        return self.alert.state != "resolved"


async def episodes(settings: KafkaSettings) -> list[EpisodeView]:
    """Every episode in the alerts topic, oldest first (undecodable records are left out)."""
    latest: dict[str, Alert] = {}
    for record in await read_topic(settings, ALERTS):
        try:
            alert = decode_alert(record.value or b"")
        except DecodeError:
            continue
        current = latest.get(alert.alert_id)
        rank = TRANSITIONS.index(alert.state) if alert.state in TRANSITIONS else -1
        if current is None or rank >= (TRANSITIONS.index(current.state) if current.state in TRANSITIONS else -1):
            latest[alert.alert_id] = alert
    acks: dict[str, AlertAck] = {}
    for alert_id, data in (await read_latest_by_key(settings, ALERT_ACKS)).items():
        try:
            acks[alert_id] = decode_ack(data)
        except DecodeError:
            continue
    delivered: dict[str, tuple[str, ...]] = {}
    for alert_id, data in (await read_latest_by_key(settings, NOTIFY_STATE)).items():
        try:
            delivered[alert_id] = tuple(sorted(decode_episode(data).delivered))
        except DecodeError:
            continue
    views = [EpisodeView(a, acks.get(i), delivered.get(i, ())) for i, a in latest.items()]
    return sorted(views, key=lambda v: (v.alert.started_ns, v.alert.alert_id))


async def acknowledge(settings: KafkaSettings, alert_id: str, by: str, note: str = "",
                      now_ns: int | None = None) -> AlertAck:
    """Write the acknowledgement record (Kafka acknowledged it when this returns)."""
    ack = AlertAck(alert_id=alert_id, by=by, acked_ns=now_ns or time.time_ns(), note=note)
    async with KafkaProducer(settings) as producer:
        await producer.send(ALERT_ACKS, encode(ack), key=alert_id)
    return ack
