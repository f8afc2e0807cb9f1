"""The notifier's pure stage: which alert transitions notify whom, the messages, signatures and delivery state.

Nothing here does I/O or reads a clock (``now_ns`` is passed in), so replays, restarts and escalation timing
are unit-tested directly.

* A *transition* of an episode is an alert state the alerting service publishes: ``raised``, ``escalated``
  (Alert v2), ``resolved``. Other states are ignored (counted by the service). The notifier adds its own
  ``unacknowledged`` transition: an episode of an escalating severity that nobody acknowledged within
  ``escalate_after`` of its raise is re-sent to the escalation channels, once.
* A *delivery* is one transition to one channel (``webhook``, ``email``, ``escalation-webhook``,
  ``escalation-email``). Its *slot* ``transition/channel`` is recorded in the episode when it was delivered
  (or given up after an error retrying cannot fix); a recorded slot is never delivered again, also after a
  restart: the episodes live in the compacted ``notify.state`` topic (key = alert_id).
* The *idempotency key* ``alert_id:transition`` is the same for every channel and every retry of a transition;
  receivers can drop a repeat (the webhook sends it as ``Idempotency-Key``, e-mails derive their Message-ID
  from it). A repeat can only happen when the process dies between a receiver's answer and the state record.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Final

import msgspec

from bpstream.shared.errors import DecodeError
from bpstream.shared.messages import Alert, decode_alert
from bpstream.shared.notifications import AlertAck

#: Alert states that are sent to people, in episode order (a replayed earlier state never reopens an episode).
TRANSITIONS: Final = ("raised", "escalated", "resolved")
#: The notifier's own transition: an unacknowledged episode sent to the escalation target.
UNACKNOWLEDGED: Final = "unacknowledged"
SIGNATURE_HEADER: Final = "X-Bpstream-Signature"
TIMESTAMP_HEADER: Final = "X-Bpstream-Timestamp"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
_STATE_VERSION: Final = 1


def notifies(alert: Alert) -> bool:
    """Whether this alert record is a transition people are told about."""
    return alert.state in TRANSITIONS


def idempotency_key(alert_id: str, transition: str) -> str:
    """One key per episode and transition, the same for every channel and every retry."""
    return f"{alert_id}:{transition}"


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 over ``"<timestamp>." + body`` (the timestamp header lets receivers refuse
    replays of an old, validly signed request)."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: bytes, timestamp: int, body: bytes, header: str) -> bool:
    """What a receiver does: recompute and compare in constant time."""
    return hmac.compare_digest(signature(secret, timestamp, body), header)


def message_id(key: str, channel: str) -> str:
    """A stable RFC 5322 Message-ID per delivery, so a repeated e-mail is recognisably the same one."""
    return f"<{hashlib.sha256(f'{key}/{channel}'.encode()).hexdigest()[:40]}@bpstream.notify>"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One transition of one episode to one channel, with the alert it is about."""

    alert: Alert
    transition: str
    channel: str

    @property
    def key(self) -> str:
        return idempotency_key(self.alert.alert_id, self.transition)

    @property
    def slot(self) -> str:
        return f"{self.transition}/{self.channel}"


class Episode(msgspec.Struct, kw_only=True):
    """What the notifier knows of one alert episode (saved to ``notify.state``)."""

    v: int = _STATE_VERSION
    alert_id: str
    clinic_id: str
    device_id: str
    kind: str
    severity: str
    #: Latest transition seen (``raised`` / ``escalated`` / ``resolved``).
    state: str
    #: The alerts-topic partition the episode's records come from (only its owner escalates it).
    partition: int
    #: The latest alert record of the episode, as received (re-sent on escalation; decoded with the shared
    #: decoder, so a newer Alert version with extra fields passes through).
    alert: bytes
    #: Notifier wall clock when the episode was first handled: escalation counts from here.
    first_seen_ns: int
    #: slot -> wall clock of delivery.
    delivered: dict[str, int] = msgspec.field(default_factory=dict)
    #: slot -> reason it was given up (an error retrying cannot fix, e.g. HTTP 400, SMTP 550).
    failed: dict[str, str] = msgspec.field(default_factory=dict)
    acked_ns: int = 0
    acked_by: str = ""

    def done(self, slot: str) -> bool:
        return slot in self.delivered or slot in self.failed

    @property
    def open(self) -> bool:
        return self.state != "resolved"


_episode_decoder = msgspec.json.Decoder(Episode)
_encoder = msgspec.json.Encoder()


def encode_episode(episode: Episode) -> bytes:
    return _encoder.encode(episode)


def decode_episode(data: bytes) -> Episode:
    try:
        episode = _episode_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"invalid notifier episode: {exc}", reason="invalid_state") from exc
    if episode.v != _STATE_VERSION:
        raise DecodeError(f"notifier episode version {episode.v}", reason="bad_version")
    return episode


@dataclass(frozen=True, slots=True)
class Routing:
    """Which channels get what, and when an episode escalates."""

    channels: tuple[str, ...]
    escalation_channels: tuple[str, ...] = ()
    escalate_after_ns: int = 600 * 10**9
    escalating: frozenset[str] = frozenset({"critical"})


class NotifierState:
    """Episodes and acknowledgements; decides the deliveries due. Changed episodes are returned to be saved."""

    def __init__(self, routing: Routing) -> None:
        self.routing = routing
        self.episodes: dict[str, Episode] = {}
        self.acks: dict[str, AlertAck] = {}

    def observe(self, alert: Alert, raw: bytes, partition: int, now_ns: int) -> list[Delivery]:
        """An alert record arrived (maybe a replay): the deliveries it still owes."""
        if not notifies(alert):
            return []
        episode = self.episodes.get(alert.alert_id)
        if episode is None:
            episode = self.episodes[alert.alert_id] = Episode(
                alert_id=alert.alert_id, clinic_id=alert.clinic_id, device_id=alert.device_id, kind=alert.kind,
                severity=alert.severity, state=alert.state, partition=partition, alert=raw, first_seen_ns=now_ns)
            self._apply_ack(episode)
        elif TRANSITIONS.index(alert.state) >= TRANSITIONS.index(episode.state):
            episode.state, episode.alert, episode.partition = alert.state, raw, partition
            episode.severity = alert.severity
        return [d for d in (Delivery(alert, alert.state, c) for c in self.routing.channels)
                if not episode.done(d.slot)]

    def record(self, delivery: Delivery, *, delivered: bool, at_ns: int, reason: str = "") -> Episode:
        """A delivery ended (delivered, or given up with ``reason``): the episode to save."""
        episode = self.episodes[delivery.alert.alert_id]
        if delivered:
            episode.delivered[delivery.slot] = at_ns
        else:
            episode.failed[delivery.slot] = reason or "failed"
        return episode

    def acknowledge(self, ack: AlertAck) -> Episode | None:
        """Apply an acknowledgement; return the episode if it changed (to save)."""
        current = self.acks.get(ack.alert_id)
        if current is None or ack.acked_ns < current.acked_ns:  # the first acknowledgement counts
            self.acks[ack.alert_id] = ack
        episode = self.episodes.get(ack.alert_id)
        return episode if episode is not None and self._apply_ack(episode) else None

    def _apply_ack(self, episode: Episode) -> bool:
        ack = self.acks.get(episode.alert_id)
        if ack is None or episode.acked_ns:
            return False
        episode.acked_ns, episode.acked_by = ack.acked_ns, ack.by
        return True

    def escalation_due_ns(self, episode: Episode) -> int | None:
        """When an episode escalates, or None if it never will (resolved, acknowledged, not escalating)."""
        if (not episode.open or episode.acked_ns or episode.severity not in self.routing.escalating
                or not self.routing.escalation_channels):
            return None
        return episode.first_seen_ns + self.routing.escalate_after_ns

    def due_escalations(self, now_ns: int, partitions: Iterable[int] | None = None) -> list[Delivery]:
        """Escalation deliveries due at ``now_ns`` for episodes of ``partitions`` (all if None), oldest first."""
        owned = None if partitions is None else set(partitions)
        out: list[Delivery] = []
        for episode in sorted(self.episodes.values(), key=lambda e: (e.first_seen_ns, e.alert_id)):
            due = self.escalation_due_ns(episode)
            if due is None or due > now_ns or (owned is not None and episode.partition not in owned):
                continue
            try:
                alert = decode_alert(episode.alert)
            except DecodeError:
                continue
            out.extend(d for d in (Delivery(alert, UNACKNOWLEDGED, c) for c in self.routing.escalation_channels)
                       if not episode.done(d.slot))
        return out

    def merge(self, saved: Mapping[str, bytes]) -> list[str]:
        """Adopt saved episodes (after start or a rebalance), keeping every slot recorded in either copy;
        return the ids whose saved state was unreadable."""
        bad: list[str] = []
        for alert_id, data in saved.items():
            try:
                restored = decode_episode(data)
            except DecodeError:
                bad.append(alert_id)
                continue
            current = self.episodes.get(alert_id)
            if current is None:
                self.episodes[alert_id] = restored
                self._apply_ack(restored)
                continue
            current.delivered = {**restored.delivered, **current.delivered}
            current.failed = {**restored.failed, **current.failed}
            current.first_seen_ns = min(current.first_seen_ns, restored.first_seen_ns)
            if TRANSITIONS.index(restored.state) > TRANSITIONS.index(current.state):
                current.state, current.alert = restored.state, restored.alert
            if restored.acked_ns and not current.acked_ns:
                current.acked_ns, current.acked_by = restored.acked_ns, restored.acked_by
        return bad

    def open_episodes(self) -> list[Episode]:
        return sorted((e for e in self.episodes.values() if e.open), key=lambda e: e.first_seen_ns)


def _alert_fields(alert: Alert) -> dict[str, Any]:
    fields: dict[str, Any] = msgspec.to_builtins(alert)
    return fields


def webhook_body(delivery: Delivery, sent_ns: int) -> bytes:
    """The JSON the webhook receives: the transition, its idempotency key and the alert as decoded."""
    alert = delivery.alert
    return _encoder.encode({
        "idempotency_key": delivery.key,
        "transition": delivery.transition,
        "channel": delivery.channel,
        "alert_id": alert.alert_id,
        "clinic_id": alert.clinic_id,
        "device_id": alert.device_id,
        "kind": alert.kind,
        "severity": alert.severity,
        "sent_ns": sent_ns,
        "alert": _alert_fields(alert),
    })


def email_message(delivery: Delivery, sender: str, recipients: Iterable[str]) -> EmailMessage:
    """The e-mail for one delivery (plain text; Message-ID derived from the idempotency key)."""
    alert = delivery.alert
    what = {"raised": "RAISED", "escalated": "ESCALATED", "resolved": "resolved",
            UNACKNOWLEDGED: "UNACKNOWLEDGED"}.get(delivery.transition, delivery.transition)
    msg = EmailMessage()
    msg["Subject"] = f"[bpstream] {alert.severity.upper()} {alert.kind} {what}: {alert.clinic_id}/{alert.device_id}"
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Message-ID"] = message_id(delivery.key, delivery.channel)
    msg["X-Bpstream-Idempotency-Key"] = delivery.key
    lines = [
        f"Alert {alert.alert_id}: {alert.kind} ({alert.severity}) {delivery.transition}",
        f"Clinic {alert.clinic_id}, device {alert.device_id}",
        f"Smoothed pressure {alert.sbp:.0f}/{alert.dbp:.0f} mmHg over {alert.n_windows} windows, "
        f"confidence {alert.confidence:.2f}",
        alert.message,
    ]
    if delivery.transition == UNACKNOWLEDGED:
        lines.append("Nobody acknowledged this alert. Acknowledge with: bpstream alerts ack " + alert.alert_id)
    msg.set_content("\n".join(lines) + "\n")
    return msg


def target_name(channel_target: str) -> str:
    """A receiver named without credentials or paths: the URL's host, or an e-mail address's domain."""
    if "://" in channel_target:
        from urllib.parse import urlsplit

        parts = urlsplit(channel_target)
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return ",".join(sorted({a.rsplit("@", 1)[-1] for a in channel_target.split(",") if a.strip()}))
