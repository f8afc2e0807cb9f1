"""The bridge's pure stage: decide whether one MQTT message may go to ``signals.raw`` or ``cuff``
(no broker involved).

:func:`validate_payload` decodes the payload with the shared codec and checks what the codec cannot know:
that the topic the device published on names the same clinic and device as the payload, and that the sample
rate is one this deployment accepts. The bridge forwards valid payloads byte for byte (no re-encoding) and
dead-letters the rest with the :class:`Rejection`'s reason.

:func:`validate_cuff` checks a cuff reading (JSON on ``bpstream/<clinic>/<device>/cuff``): pressures in a
plausible range, SBP above DBP, a measurement time neither further in the future than the bridge's clock allows
nor older than a limit; it returns the normalised :class:`CuffReading` the bridge forwards.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import msgspec

from bpstream.shared.devicetime import check_device_time
from bpstream.shared.errors import DecodeError
from bpstream.shared.messages import MAX_T0_NS, MIN_T0_NS, CuffReading, SignalChunk, decode_chunk
from bpstream.shared.topics import ID_PATTERN, parse_device_topic, parse_signals_topic

TOPIC_MISMATCH: Final = "topic_mismatch"
BAD_TOPIC: Final = "bad_topic"
BAD_SAMPLE_RATE: Final = "bad_sample_rate"
CUFF_INVALID: Final = "cuff_invalid"
CUFF_OUT_OF_RANGE: Final = "cuff_out_of_range"
CUFF_SBP_NOT_ABOVE_DBP: Final = "cuff_sbp_not_above_dbp"
CUFF_IN_FUTURE: Final = "cuff_in_future"
CUFF_TOO_OLD: Final = "cuff_too_old"
MAX_CUFF_BYTES: Final = 4096


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a payload cannot be forwarded: a stable ``reason`` (metric label, DLQ field) and a ``detail``."""

    reason: str
    detail: str


def device_of(topic: str) -> tuple[str, str] | None:
    """``(clinic, device)`` of a ``bpstream/<clinic>/<device>/<leaf>`` topic (None for any other topic)."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "bpstream" or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


@dataclass(frozen=True, slots=True)
class DeviceTimeLimits:
    """How far a chunk's device time may lie from the bridge's clock at receipt (None: unbounded)."""

    max_ahead_s: float | None = 300.0
    max_behind_s: float | None = None


def validate_payload(topic: str, payload: bytes, allowed_rates: Collection[float], *, now_ns: int | None = None,
                     time_limits: DeviceTimeLimits | None = None) -> SignalChunk | Rejection:
    """Return the decoded chunk if ``payload`` may be forwarded, else the reason it may not.

    With ``now_ns`` and ``time_limits``, a chunk dated too far from ``now_ns`` (the bridge's receipt time) is
    refused (``device_time_ahead`` / ``device_time_behind``): it could otherwise move a window clock."""
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
    return check_chunk(chunk, allowed_rates, now_ns=now_ns, time_limits=time_limits) or chunk


def check_chunk(chunk: SignalChunk, allowed_rates: Collection[float], *, now_ns: int | None = None,
                time_limits: DeviceTimeLimits | None = None) -> Rejection | None:
    """What a decoded chunk must satisfy beyond the codec (sample rate, device time): None when it may go on.
    Shared by single-chunk messages and the chunks of a gateway batch."""
    if allowed_rates and not any(abs(chunk.sample_rate - rate) < 1e-6 for rate in allowed_rates):
        return Rejection(
            BAD_SAMPLE_RATE, f"sample rate {chunk.sample_rate:g} Hz is not one of {sorted(allowed_rates)}"
        )
    if now_ns is not None and time_limits is not None:
        ahead, behind = time_limits.max_ahead_s, time_limits.max_behind_s
        verdict = check_device_time(chunk.t0_ns, now_ns,
                                    max_ahead_ns=None if ahead is None else round(ahead * 1e9),
                                    max_behind_ns=None if behind is None else round(behind * 1e9))
        if verdict is not None:
            return Rejection(verdict.reason, verdict.detail)
    return None


@dataclass(frozen=True, slots=True)
class CuffLimits:
    """What a cuff reading must satisfy (from the bridge's settings)."""

    sbp_range: tuple[float, float] = (50.0, 300.0)
    dbp_range: tuple[float, float] = (20.0, 200.0)
    #: A reading may be this far ahead of the bridge's clock (cuff clocks drift a little).
    max_future_s: float = 300.0
    #: Older readings are refused: they cannot calibrate anything current.
    max_age_s: float = 7 * 86400.0


class CuffPayload(msgspec.Struct, kw_only=True):
    """The JSON a cuff or ``bpstream calibrate`` publishes. ``time``: epoch seconds or ISO 8601 with a zone."""

    sbp: float
    dbp: float
    time: float | str
    cuff_id: str
    confirmation: bool = False


_cuff_decoder = msgspec.json.Decoder(CuffPayload)


def cuff_time_ns(value: float | str) -> int:
    """Epoch nanoseconds of a cuff time (epoch seconds, or ISO 8601 with a time zone); ``ValueError`` else."""
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            raise ValueError(f"cuff time {value!r} has no time zone")
        seconds = parsed.timestamp()
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError("cuff time is not finite")
    ns = round(seconds * 1e9)
    if not MIN_T0_NS <= ns < MAX_T0_NS:
        raise ValueError(f"cuff time {value!r} is outside 2000-2100")
    return ns


def validate_cuff(topic: str, payload: bytes, now_ns: int, limits: CuffLimits) -> CuffReading | Rejection:
    """The reading to forward to the ``cuff`` topic, or why it is refused (for the dead-letter topic)."""
    try:
        clinic_id, device_id = parse_device_topic(topic, "cuff")
    except ValueError as exc:
        return Rejection(BAD_TOPIC, str(exc))
    if not ID_PATTERN.match(clinic_id) or not ID_PATTERN.match(device_id):
        return Rejection(BAD_TOPIC, f"bad clinic or device id in topic {topic!r}")
    if len(payload) > MAX_CUFF_BYTES:
        return Rejection(CUFF_INVALID, f"cuff payload of {len(payload)} bytes exceeds {MAX_CUFF_BYTES}")
    try:
        body = _cuff_decoder.decode(payload)
        time_ns = cuff_time_ns(body.time)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, OverflowError) as exc:
        return Rejection(CUFF_INVALID, f"not a cuff reading: {exc}")
    if not ID_PATTERN.match(body.cuff_id):
        return Rejection(CUFF_INVALID, f"cuff_id must match {ID_PATTERN.pattern}")
    sbp, dbp = body.sbp, body.dbp
    lo_s, hi_s = limits.sbp_range
    lo_d, hi_d = limits.dbp_range
    if not (math.isfinite(sbp) and math.isfinite(dbp) and lo_s <= sbp <= hi_s and lo_d <= dbp <= hi_d):
        return Rejection(CUFF_OUT_OF_RANGE, f"SBP must lie in [{lo_s:g}, {hi_s:g}] and DBP in [{lo_d:g}, {hi_d:g}] "
                                            "mmHg")
    if sbp <= dbp:
        return Rejection(CUFF_SBP_NOT_ABOVE_DBP, "SBP must be above DBP")
    if time_ns > now_ns + limits.max_future_s * 1e9:
        return Rejection(CUFF_IN_FUTURE, f"cuff time is more than {limits.max_future_s:g} s ahead of the bridge")
    if time_ns < now_ns - limits.max_age_s * 1e9:
        return Rejection(CUFF_TOO_OLD, f"cuff time is more than {limits.max_age_s:g} s old")
    return CuffReading(clinic_id=clinic_id, device_id=device_id, sbp=float(sbp), dbp=float(dbp), time_ns=time_ns,
                       cuff_id=body.cuff_id, confirmation=body.confirmation, received_ns=now_ns)
