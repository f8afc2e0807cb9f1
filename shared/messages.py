"""Versioned message contracts and their codecs.

* ``SignalChunk``: what a wearable publishes over MQTT and the bridge forwards to ``signals.raw``; a compact
  binary encoding (``encode_chunk`` / ``decode_chunk``): int16 samples with a per-channel scale and offset,
  and a CRC32, so one second of ECG+PPG at 125 Hz costs about 570 bytes.
* ``ChunkBatch`` (``bpstream.shared.gateway``, v1): a clinic gateway's MQTT message carrying several encoded
  chunks (several devices and/or seconds); the bridge splits it into the same per-chunk ``signals.raw`` records.
* ``Window``, ``Estimate``, ``Alert``, ``DeadLetter``, ``CuffReading``, ``CalibrationRecord``: msgspec structs
  between services (MessagePack for windows, which carry samples; JSON for the rest, which people read in
  Kafka tools).

Versions: ``Estimate`` v2 adds the calibration mode and age, the 90% interval, the model's calibration-free
output and the withheld reason; ``Alert`` v2 adds the evidence an alert rests on. Every new field has a
default, so v1 records (already in Kafka) still decode: a v1 estimate reads as uncalibrated, never withheld.

Every decoder raises ``DecodeError`` (with a stable ``reason``) and nothing else for bad bytes.

>>> import numpy as np
>>> chunk = SignalChunk("clinic-1", "dev-7", seq=3, t0_ns=1_700_000_000_000_000_000, sample_rate=125.0,
...                     channels=("ecg", "ppg"), samples=np.zeros((2, 125), dtype=np.float32))
>>> decode_chunk(encode_chunk(chunk)).seq
3
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from bpstream.shared.errors import DecodeError, EncodeError
from bpstream.shared.topics import ID_PATTERN

CHUNK_MAGIC: Final = b"BP"
CHUNK_VERSION: Final = 1
#: Channel names a chunk may carry, with their wire codes.
CHANNEL_CODES: Final[dict[str, int]] = {"ecg": 1, "ppg": 2}
CHANNEL_NAMES: Final[dict[int, str]] = {code: name for name, code in CHANNEL_CODES.items()}
MIN_SAMPLE_RATE: Final = 10.0
MAX_SAMPLE_RATE: Final = 2000.0
MAX_CHUNK_SECONDS: Final = 10.0
MAX_CHUNK_BYTES: Final = 64 * 1024
MAX_JSON_BYTES: Final = 1024 * 1024
MAX_WINDOW_BYTES: Final = 4 * 1024 * 1024
#: Device timestamps outside [2000-01-01, 2100-01-01) are rejected as clock faults.
MIN_T0_NS: Final = 946_684_800 * 10**9
MAX_T0_NS: Final = 4_102_444_800 * 10**9

# magic, version, flags, seq, t0_ns, sample_rate, duration_us, n_samples, n_channels, clinic_len, device_len
_HEADER = struct.Struct("<2sBBQqfIHBBB")
_CHANNEL = struct.Struct("<Bff")
_CRC = struct.Struct("<I")
_Q_MAX = 32767


@dataclass(slots=True, frozen=True)
class SignalChunk:
    """A contiguous run of samples from one device.

    ``samples`` has shape ``(len(channels), n)``; ``t0_ns`` is the device's time of the first sample;
    ``seq`` increases by one per chunk, per device, so gaps and duplicates are visible downstream.
    """

    clinic_id: str
    device_id: str
    seq: int
    t0_ns: int
    sample_rate: float
    channels: tuple[str, ...]
    samples: npt.NDArray[np.float32]

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_ns(self) -> int:
        return round(self.n_samples * 1e9 / self.sample_rate)

    def channel(self, name: str) -> npt.NDArray[np.float32] | None:
        """The samples of one channel, or None when the chunk does not carry it."""
        try:
            index = self.channels.index(name)
        except ValueError:
            return None
        row: npt.NDArray[np.float32] = self.samples[index]
        return row


def _check_id(value: str, what: str, error: type[DecodeError] | type[EncodeError]) -> None:
    if not ID_PATTERN.match(value):
        raise error(f"{what} {value!r} must match {ID_PATTERN.pattern}", reason="bad_id")


def encode_chunk(chunk: SignalChunk) -> bytes:
    """Encode a chunk; raise ``EncodeError`` if it breaks the contract (NaN, unknown channel, ...)."""
    _check_id(chunk.clinic_id, "clinic_id", EncodeError)
    _check_id(chunk.device_id, "device_id", EncodeError)
    samples = np.asarray(chunk.samples, dtype=np.float64)
    if samples.ndim != 2 or samples.shape[0] != len(chunk.channels) or samples.shape[1] == 0:
        raise EncodeError(f"samples shape {samples.shape} does not match channels {chunk.channels}",
                          reason="bad_shape")
    if len(set(chunk.channels)) != len(chunk.channels):
        raise EncodeError(f"duplicate channel in {chunk.channels}", reason="duplicate_channel")
    for name in chunk.channels:
        if name not in CHANNEL_CODES:
            raise EncodeError(f"unknown channel {name!r}", reason="unknown_channel")
    if not np.isfinite(samples).all():
        raise EncodeError("samples contain NaN or inf", reason="non_finite")
    if not (MIN_SAMPLE_RATE <= chunk.sample_rate <= MAX_SAMPLE_RATE):
        raise EncodeError(f"sample rate {chunk.sample_rate} Hz outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]",
                          reason="bad_sample_rate")
    if not (0 <= chunk.seq < 2**64) or not (MIN_T0_NS <= chunk.t0_ns < MAX_T0_NS):
        raise EncodeError("seq or t0_ns out of range", reason="bad_header")
    n = samples.shape[1]
    duration_us = round(n * 1e6 / chunk.sample_rate)
    if n > 65535 or duration_us > MAX_CHUNK_SECONDS * 1e6:
        raise EncodeError(f"chunk of {n} samples is longer than {MAX_CHUNK_SECONDS} s", reason="oversize")
    clinic, device = chunk.clinic_id.encode(), chunk.device_id.encode()
    parts = [_HEADER.pack(CHUNK_MAGIC, CHUNK_VERSION, 0, chunk.seq, chunk.t0_ns, chunk.sample_rate, duration_us,
                          n, len(chunk.channels), len(clinic), len(device)), clinic, device]
    lo, hi = samples.min(axis=1), samples.max(axis=1)
    offset = (hi + lo) / 2.0
    scale = np.maximum((hi - lo) / (2 * _Q_MAX), 1e-12)
    q = np.clip(np.rint((samples - offset[:, None]) / scale[:, None]), -_Q_MAX, _Q_MAX).astype("<i2")
    for i, name in enumerate(chunk.channels):
        parts.append(_CHANNEL.pack(CHANNEL_CODES[name], float(scale[i]), float(offset[i])))
    parts.append(q.tobytes())
    body = b"".join(parts)
    if len(body) + _CRC.size > MAX_CHUNK_BYTES:
        raise EncodeError(f"encoded chunk would be {len(body)} bytes > {MAX_CHUNK_BYTES}", reason="oversize")
    return body + _CRC.pack(zlib.crc32(body))


def peek_chunk_ids(data: bytes) -> tuple[str, str]:
    """A chunk's ``(clinic_id, device_id)`` from its header alone, for counting and routing tools (no
    validation: ``decode_chunk`` is the gate). ``DecodeError`` if the bytes cannot hold them."""
    if len(data) < _HEADER.size or data[:2] != CHUNK_MAGIC:
        raise DecodeError("not a chunk header", reason="bad_magic")
    clinic_len, device_len = _HEADER.unpack_from(data)[-2:]
    pos = _HEADER.size
    try:
        return data[pos : pos + clinic_len].decode(), data[pos + clinic_len : pos + clinic_len + device_len].decode()
    except UnicodeDecodeError as exc:
        raise DecodeError("clinic or device id is not UTF-8", reason="bad_id") from exc


def decode_chunk(data: bytes | bytearray | memoryview) -> SignalChunk:
    """Decode and validate a chunk. Raises ``DecodeError`` with a precise reason for any bad input."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}", reason="bad_type")
    data = bytes(data)
    if len(data) > MAX_CHUNK_BYTES:
        raise DecodeError(f"payload of {len(data)} bytes exceeds {MAX_CHUNK_BYTES}", reason="oversize")
    if len(data) < _HEADER.size + _CRC.size:
        raise DecodeError(f"payload of {len(data)} bytes is shorter than a chunk header", reason="truncated")
    if data[:2] != CHUNK_MAGIC:
        raise DecodeError("payload does not start with the chunk magic 'BP'", reason="bad_magic")
    (_, version, _flags, seq, t0_ns, rate, duration_us, n, n_ch, clinic_len, device_len) = _HEADER.unpack_from(data)
    if version != CHUNK_VERSION:
        raise DecodeError(f"chunk version {version} is not supported (expected {CHUNK_VERSION})",
                          reason="bad_version")
    expected = _HEADER.size + clinic_len + device_len + n_ch * _CHANNEL.size + 2 * n_ch * n + _CRC.size
    if len(data) != expected:
        raise DecodeError(f"payload is {len(data)} bytes, header announces {expected}", reason="truncated")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[: -_CRC.size]) != crc:
        raise DecodeError("checksum mismatch: the payload was corrupted", reason="bad_checksum")
    pos = _HEADER.size
    try:
        clinic_id = data[pos : pos + clinic_len].decode()
        device_id = data[pos + clinic_len : pos + clinic_len + device_len].decode()
    except UnicodeDecodeError as exc:
        raise DecodeError("clinic or device id is not UTF-8", reason="bad_id") from exc
    _check_id(clinic_id, "clinic_id", DecodeError)
    _check_id(device_id, "device_id", DecodeError)
    pos += clinic_len + device_len
    if not (np.isfinite(rate) and MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE):
        raise DecodeError(f"sample rate {rate} Hz outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]",
                          reason="bad_sample_rate")
    if n == 0 or n_ch == 0:
        raise DecodeError("chunk carries no samples", reason="empty")
    if duration_us == 0 or duration_us > MAX_CHUNK_SECONDS * 1e6 or round(rate * duration_us / 1e6) != n:
        raise DecodeError(f"{n} samples do not match {rate:g} Hz over {duration_us} us",
                          reason="sample_count_mismatch")
    if not (MIN_T0_NS <= t0_ns < MAX_T0_NS):
        raise DecodeError(f"device timestamp {t0_ns} ns is outside 2000-2100", reason="bad_timestamp")
    channels: list[str] = []
    scales = np.empty(n_ch)
    offsets = np.empty(n_ch)
    for i in range(n_ch):
        code, scale, offset = _CHANNEL.unpack_from(data, pos)
        pos += _CHANNEL.size
        name = CHANNEL_NAMES.get(code)
        if name is None:
            raise DecodeError(f"unknown channel code {code}", reason="unknown_channel")
        if name in channels:
            raise DecodeError(f"duplicate channel {name!r}", reason="duplicate_channel")
        if not (np.isfinite(scale) and np.isfinite(offset) and scale > 0):
            raise DecodeError(f"channel {name!r} has a non-finite or non-positive scale", reason="non_finite")
        channels.append(name)
        scales[i], offsets[i] = scale, offset
    q = np.frombuffer(data, dtype="<i2", count=n_ch * n, offset=pos).reshape(n_ch, n)
    samples = (q * scales[:, None] + offsets[:, None]).astype(np.float32)
    if not np.isfinite(samples).all():
        raise DecodeError("samples decode to NaN or inf", reason="non_finite")
    return SignalChunk(clinic_id, device_id, seq, t0_ns, float(rate), tuple(channels), samples)


class Window(msgspec.Struct, frozen=True, kw_only=True):
    """A model-ready window from the processor: filtered, resampled, quality-scored.

    ``samples`` holds float32 little-endian values of shape ``(len(channels), n_samples)``.
    ``received_ns`` is the wall-clock time the newest chunk of the window reached Kafka (for latency).
    """

    v: int = 1
    clinic_id: str
    device_id: str
    start_ns: int
    end_ns: int
    sample_rate: float
    channels: tuple[str, ...]
    n_samples: int
    samples: bytes
    sqi: dict[str, float]
    quality_ok: bool
    gap_fraction: float = 0.0
    #: Heart rate the processor measured on the window (for the model's out-of-distribution check).
    heart_rate_bpm: float | None = None
    seq_first: int = 0
    seq_last: int = 0
    received_ns: int = 0
    emitted_ns: int = 0

    def array(self) -> npt.NDArray[np.float32]:
        return np.frombuffer(self.samples, dtype="<f4").reshape(len(self.channels), self.n_samples)


class Estimate(msgspec.Struct, frozen=True, kw_only=True):
    """One blood-pressure estimate for one window. Identified by ``(device_id, window_end_ns)``.

    ``sbp``/``dbp`` are the estimate in the estimate's ``mode``: in ``calibrated`` mode
    ``cuff + gain * (raw - reference)`` (``bpstream.shared.model.calibration``), in ``uncalibrated`` mode the
    model's output (``raw_sbp``/``raw_dbp`` always hold the model's calibration-free output). ``sbp_lo`` ..
    ``dbp_hi`` bound the 90% interval. ``withheld`` names why the estimate must not be shown as a number nor
    alerted on (``signal_quality``, ``out_of_distribution``, ``interval_too_wide``, ``calibration_stale``),
    or is None.
    """

    v: int = 2
    clinic_id: str
    device_id: str
    window_start_ns: int
    window_end_ns: int
    sbp: float
    dbp: float
    sbp_sd: float
    dbp_sd: float
    anomaly_prob: float
    sqi: float
    quality_ok: bool
    inputs: str
    model_version: str
    received_ns: int = 0
    estimated_ns: int = 0
    raw_sbp: float | None = None
    raw_dbp: float | None = None
    mode: str = "uncalibrated"
    #: Device time of the cuff reading the calibration rests on, its cuff id and age at the window end.
    calibration_ns: int | None = None
    calibration_cuff_id: str | None = None
    calibration_age_s: float | None = None
    sbp_lo: float | None = None
    sbp_hi: float | None = None
    dbp_lo: float | None = None
    dbp_hi: float | None = None
    withheld: str | None = None


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """An alert being raised or resolved. One ``alert_id`` per episode; ``state`` is raised or resolved.

    The evidence (v2): ``basis`` is ``estimates`` (windows ``first_window_ns``..``event_ns``, in ``mode``) or
    ``cuff`` (the cuff reading ``cuff_id`` at ``event_ns``); ``calibration_ns``/``calibration_cuff_id`` name the
    calibration the estimates rest on (None when uncalibrated).
    """

    v: int = 2
    alert_id: str
    clinic_id: str
    device_id: str
    kind: str
    severity: str
    state: str
    started_ns: int
    event_ns: int
    sbp: float
    dbp: float
    baseline_sbp: float | None = None
    baseline_dbp: float | None = None
    n_windows: int = 0
    confidence: float = 0.0
    message: str = ""
    basis: str = "estimates"
    mode: str = ""
    first_window_ns: int | None = None
    calibration_ns: int | None = None
    calibration_cuff_id: str | None = None
    cuff_id: str | None = None


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """Input that a stage could not use, with the reason and the original bytes."""

    v: int = 1
    stage: str
    reason: str
    detail: str
    source: str
    payload: bytes
    key: str | None = None
    partition: int | None = None
    offset: int | None = None
    received_ns: int = 0


class CuffReading(msgspec.Struct, frozen=True, kw_only=True):
    """A validated cuff reading for one patient's device (Kafka ``cuff``, key ``clinic/device``).

    ``time_ns`` is when the cuff measured (its clock); ``confirmation`` marks a reading taken to confirm or
    refute an alert (it calibrates like any other reading).
    """

    v: int = 1
    clinic_id: str
    device_id: str
    sbp: float
    dbp: float
    time_ns: int
    cuff_id: str
    confirmation: bool = False
    received_ns: int = 0


class CalibrationRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A finished calibration: a cuff reading and the model's mean output on the windows around it
    (Kafka ``calibration.state``, key ``clinic/device``). Valid only for ``model_version``."""

    v: int = 1
    clinic_id: str
    device_id: str
    cuff_sbp: float
    cuff_dbp: float
    time_ns: int
    cuff_id: str
    reference_sbp: float
    reference_dbp: float
    n_windows: int
    model_version: str


_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_S = TypeVar("_S", bound=msgspec.Struct)
_decoders: dict[tuple[type[Any], str], Any] = {}


def encode_json(message: msgspec.Struct) -> bytes:
    """Encode an Estimate, Alert or DeadLetter as JSON."""
    return _json_encoder.encode(message)


def encode_window(window: Window) -> bytes:
    """Encode a Window as MessagePack (samples stay binary)."""
    return _msgpack_encoder.encode(window)


def _decode(data: bytes, kind: type[_S], fmt: str, limit: int, versions: tuple[int, ...] = (1,)) -> _S:
    if len(data) > limit:
        raise DecodeError(f"{kind.__name__} of {len(data)} bytes exceeds {limit}", reason="oversize")
    decoder = _decoders.get((kind, fmt))
    if decoder is None:
        module = msgspec.json if fmt == "json" else msgspec.msgpack
        decoder = _decoders[(kind, fmt)] = module.Decoder(kind)
    try:
        message: _S = decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise DecodeError(f"invalid {kind.__name__}: {exc}", reason="invalid_message") from exc
    if getattr(message, "v", 1) not in versions:
        raise DecodeError(f"{kind.__name__} version {getattr(message, 'v', None)} is not supported",
                          reason="bad_version")
    return message


def decode_window(data: bytes) -> Window:
    window = _decode(data, Window, "msgpack", MAX_WINDOW_BYTES)
    if not window.channels or window.n_samples <= 0 or len(set(window.channels)) != len(window.channels):
        raise DecodeError("window carries no samples or repeats a channel", reason="empty")
    if not (math.isfinite(window.sample_rate) and MIN_SAMPLE_RATE <= window.sample_rate <= MAX_SAMPLE_RATE):
        raise DecodeError(f"window sample rate {window.sample_rate} Hz outside [{MIN_SAMPLE_RATE}, "
                          f"{MAX_SAMPLE_RATE}]", reason="bad_sample_rate")
    if len(window.samples) != 4 * len(window.channels) * window.n_samples:
        raise DecodeError("window sample bytes do not match channels x n_samples", reason="sample_count_mismatch")
    for name in window.channels:
        if name not in CHANNEL_CODES:
            raise DecodeError(f"unknown channel {name!r}", reason="unknown_channel")
    return window


def decode_estimate(data: bytes) -> Estimate:
    """Decode an Estimate of version 1 (no calibration fields) or 2."""
    return _decode(data, Estimate, "json", MAX_JSON_BYTES, (1, 2))


def decode_alert(data: bytes) -> Alert:
    """Decode an Alert of version 1 (no evidence fields) or 2."""
    return _decode(data, Alert, "json", MAX_JSON_BYTES, (1, 2))


def decode_cuff(data: bytes) -> CuffReading:
    reading = _decode(data, CuffReading, "json", MAX_JSON_BYTES)
    _check_id(reading.clinic_id, "clinic_id", DecodeError)
    _check_id(reading.device_id, "device_id", DecodeError)
    if not (math.isfinite(reading.sbp) and math.isfinite(reading.dbp)):
        raise DecodeError("cuff pressures must be finite", reason="non_finite")
    return reading


def decode_calibration(data: bytes) -> CalibrationRecord:
    return _decode(data, CalibrationRecord, "json", MAX_JSON_BYTES)


def decode_dead_letter(data: bytes) -> DeadLetter:
    return _decode(data, DeadLetter, "json", MAX_JSON_BYTES)


class QualityRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A signal-quality or stream-integrity event for the ``quality`` topic (JSON, keyed by device).

    ``kind`` is one of ``window`` (quality of an emitted window), ``gap`` (chunks declared missing),
    ``clock_jump`` (device time inconsistent with ``seq``), ``format_change`` (sample rate or channels
    changed), ``stream_reset`` (the device restarted its sequence numbers) or ``window_error`` (a window that
    preprocessing refused). ``start_ns``/``end_ns`` are device time: the window, or the time the missing
    chunks would have covered. Identified by ``(device_id, kind, end_ns)`` for idempotent sinks.
    """

    v: int = 1
    kind: str
    clinic_id: str
    device_id: str
    start_ns: int
    end_ns: int
    seq_first: int = 0
    seq_last: int = 0
    missing_chunks: int = 0
    sqi: dict[str, float] = {}
    quality_ok: bool = True
    inputs: str = ""
    heart_rate_bpm: float | None = None
    problems: tuple[str, ...] = ()
    detail: str = ""
    emitted_ns: int = 0
