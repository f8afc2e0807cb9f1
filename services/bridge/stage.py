"""The bridge's pure stage: decide whether one MQTT message may go to ``signals.raw`` (no broker involved).

:func:`validate_payload` decodes the payload with the shared codec and checks what the codec cannot know:
that the topic the device published on names the same clinic and device as the payload, and that the sample
rate is one this deployment accepts. The bridge forwards valid payloads byte for byte (no re-encoding) and
dead-letters the rest with the :class:`Rejection`'s reason.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from bpstream.shared.errors import DecodeError
from bpstream.shared.messages import SignalChunk, decode_chunk
from bpstream.shared.topics import parse_signals_topic

TOPIC_MISMATCH: Final = "topic_mismatch"
BAD_TOPIC: Final = "bad_topic"
BAD_SAMPLE_RATE: Final = "bad_sample_rate"


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a payload cannot be forwarded: a stable ``reason`` (metric label, DLQ field) and a ``detail``."""

    reason: str
    detail: str


def validate_payload(topic: str, payload: bytes, allowed_rates: Collection[float]) -> SignalChunk | Rejection:
    """Return the decoded chunk if ``payload`` may be forwarded, else the reason it may not."""
    try:
        clinic_id, device_id = parse_signals_topic(topic)
    except ValueError as exc:
        return Rejection(BAD_TOPIC, str(exc))
    try:
        chunk = decode_chunk(payload)
    except DecodeError as exc:
        return Rejection(exc.reason, str(exc))
    if (chunk.clinic_id, chunk.device_id) != (clinic_id, device_id):
        return Rejection(
            TOPIC_MISMATCH,
            f"topic names {clinic_id}/{device_id}, payload {chunk.clinic_id}/{chunk.device_id}",
        )
    if allowed_rates and not any(abs(chunk.sample_rate - rate) < 1e-6 for rate in allowed_rates):
        return Rejection(
            BAD_SAMPLE_RATE, f"sample rate {chunk.sample_rate:g} Hz is not one of {sorted(allowed_rates)}"
        )
    return chunk
