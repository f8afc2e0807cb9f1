"""The bridge's pure validation: what may be forwarded to signals.raw and why anything else is dead-lettered."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from bpstream.services.bridge.stage import Rejection, validate_payload
from bpstream.shared.messages import MAX_CHUNK_BYTES, SignalChunk, encode_chunk
from bpstream.shared.topics import mqtt_signals_topic

RATES = (125.0, 250.0)
TOPIC = mqtt_signals_topic("clinic-1", "dev-1")


def payload(*, device: str = "dev-1", rate: float = 125.0, seconds: float = 1.0) -> bytes:
    n = round(rate * seconds)
    t = np.arange(n) / rate
    samples = np.stack([np.sin(2 * np.pi * 1.1 * t), np.cos(2 * np.pi * 1.1 * t)]).astype(np.float32)
    return encode_chunk(SignalChunk("clinic-1", device, 42, 1_700_000_000_000_000_000, rate, ("ecg", "ppg"),
                                    samples))


def test_valid_chunk_is_accepted_with_its_ids() -> None:
    verdict = validate_payload(TOPIC, payload(), RATES)
    assert isinstance(verdict, SignalChunk)
    assert (verdict.clinic_id, verdict.device_id, verdict.seq) == ("clinic-1", "dev-1", 42)


def _set_version(data: bytes, version: int) -> bytes:
    return data[:2] + struct.pack("<B", version) + data[3:]


def _flip_sample_byte(data: bytes) -> bytes:
    mutable = bytearray(data)
    mutable[-10] ^= 0xFF
    return bytes(mutable)


@pytest.mark.parametrize(
    ("topic", "data", "reason"),
    [
        (TOPIC, b"not a chunk at all, just some garbage bytes from a confused gateway", "bad_magic"),
        (TOPIC, b"", "truncated"),
        (TOPIC, payload()[:-7], "truncated"),
        (TOPIC, _set_version(payload(), 9), "bad_version"),
        (TOPIC, _flip_sample_byte(payload()), "bad_checksum"),
        (TOPIC, b"BP" + b"\x00" * (MAX_CHUNK_BYTES + 10), "oversize"),
        (mqtt_signals_topic("clinic-1", "dev-2"), payload(), "topic_mismatch"),
        (mqtt_signals_topic("clinic-9", "dev-1"), payload(), "topic_mismatch"),
        (TOPIC, payload(rate=500.0), "bad_sample_rate"),
        ("bpstream/clinic-1/dev-1/status", payload(), "bad_topic"),
    ],
    ids=["garbage", "empty", "truncated", "version", "checksum", "oversize", "other-device", "other-clinic",
         "rate-not-allowed", "not-a-signals-topic"],
)
def test_invalid_payloads_are_rejected_with_a_stable_reason(topic: str, data: bytes, reason: str) -> None:
    verdict = validate_payload(topic, data, RATES)
    assert isinstance(verdict, Rejection)
    assert verdict.reason == reason
    assert verdict.detail


def test_every_allowed_rate_passes_and_an_empty_allow_list_accepts_any_valid_rate() -> None:
    assert isinstance(validate_payload(TOPIC, payload(rate=250.0), RATES), SignalChunk)
    assert isinstance(validate_payload(TOPIC, payload(rate=500.0), ()), SignalChunk)
