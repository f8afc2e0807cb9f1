"""Contracts of alert delivery, shared by the notifier, the writer and the ``bpstream alerts`` command.

* ``AlertAck``: a person acknowledged an alert episode (topic ``alerts.acks``, key = alert_id, compacted).
* ``NotificationAttempt``: one attempt to deliver one transition of one episode to one channel (topic
  ``notifications``, key = device id); the writer stores it as ``bp_notification``.

Both are JSON (people read them in Kafka tools). They carry no blood-pressure readings: the attempt log says
who was told what and when, not the patient's values. Decoders raise ``DecodeError`` and nothing else, and
ignore fields they do not know (a newer producer may add some).
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

import msgspec

from bpstream.shared.errors import DecodeError

MAX_RECORD_BYTES: Final = 64 * 1024
#: Outcomes of one attempt: ``delivered``; ``retry`` (a retriable error, tried again); ``failed`` (an error
#: that retrying cannot fix: the delivery is given up and counted).
OUTCOMES: Final = ("delivered", "retry", "failed")


class AlertAck(msgspec.Struct, frozen=True, kw_only=True):
    """``alert_id`` acknowledged by ``by`` at ``acked_ns`` (wall clock)."""

    v: int = 1
    alert_id: str
    by: str
    acked_ns: int
    note: str = ""


class NotificationAttempt(msgspec.Struct, frozen=True, kw_only=True):
    """One delivery attempt. ``target`` names the receiver without credentials (URL host or e-mail domain)."""

    v: int = 1
    alert_id: str
    clinic_id: str
    device_id: str
    kind: str
    severity: str
    transition: str
    channel: str
    idempotency_key: str
    attempt: int
    outcome: str
    at_ns: int
    target: str = ""
    reason: str = ""
    status: int = 0


_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], Any] = {}
_S = TypeVar("_S", bound=msgspec.Struct)


def encode(message: AlertAck | NotificationAttempt) -> bytes:
    return _encoder.encode(message)


def _decode(data: bytes, kind: type[_S]) -> _S:
    if len(data) > MAX_RECORD_BYTES:
        raise DecodeError(f"{kind.__name__} of {len(data)} bytes exceeds {MAX_RECORD_BYTES}", reason="oversize")
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        message: _S = decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise DecodeError(f"invalid {kind.__name__}: {exc}", reason="invalid_message") from exc
    return message


def decode_ack(data: bytes) -> AlertAck:
    return _decode(data, AlertAck)


def decode_attempt(data: bytes) -> NotificationAttempt:
    return _decode(data, NotificationAttempt)
