"""The message contracts: codec round trips, every named rejection, and property-based tests that feed random
and corrupted bytes to every decoder (each input decodes to a usable message or raises ``DecodeError``).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bpstream.shared import messages as m
from bpstream.shared.errors import DecodeError, EncodeError
from bpstream.shared.topics import ID_PATTERN

pytestmark = pytest.mark.unit

T0 = 1_700_000_000_000_000_000
HEADER = struct.Struct("<2sBBQqfIHBBB")  # the documented wire header of a signal chunk
VERSION_AT, DURATION_AT = 2, 24
CHANNEL = struct.Struct("<Bff")


def _chunk(n: int = 125, rate: float = 125.0, channels: tuple[str, ...] = ("ecg", "ppg"), seed: int = 0,
           clinic: str = "clinic-1", device: str = "dev-7") -> m.SignalChunk:
    rng = np.random.default_rng(seed)
    samples = rng.normal(0.0, 1.0, size=(len(channels), n)).astype(np.float32)
    return m.SignalChunk(clinic, device, seq=42, t0_ns=T0, sample_rate=rate, channels=channels, samples=samples)


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _patched(payload: bytes, offset: int, fmt: str, value: Any) -> bytes:
    """The payload with one header field replaced and a correct checksum (so only that field is wrong)."""
    body = bytearray(payload[:-4])
    struct.pack_into(fmt, body, offset, value)
    return _with_crc(bytes(body))


def _reason(call: Callable[[], object], error: type[Exception] = DecodeError) -> str:
    with pytest.raises(error) as caught:
        call()
    return str(getattr(caught.value, "reason", ""))


# ------------------------------------------------------------------ signal chunk: round trips


def test_chunk_round_trip_keeps_header_and_samples_within_quantisation() -> None:
    chunk = _chunk()
    decoded = m.decode_chunk(m.encode_chunk(chunk))
    assert (decoded.clinic_id, decoded.device_id, decoded.seq, decoded.t0_ns) == ("clinic-1", "dev-7", 42, T0)
    assert decoded.sample_rate == 125.0
    assert decoded.channels == ("ecg", "ppg")
    assert decoded.samples.shape == (2, 125) and decoded.samples.dtype == np.float32
    span = chunk.samples.max(axis=1) - chunk.samples.min(axis=1)
    step = span / (2 * 32767)
    error = np.abs(decoded.samples - chunk.samples).max(axis=1)
    assert np.all(error <= step * 0.5 + 1e-6 * np.abs(chunk.samples).max())


def test_constant_channel_round_trips_exactly() -> None:
    samples = np.full((1, 250), 0.75, dtype=np.float32)
    chunk = m.SignalChunk("c", "d", 0, T0, 125.0, ("ppg",), samples)
    decoded = m.decode_chunk(m.encode_chunk(chunk))
    assert decoded.channels == ("ppg",)
    np.testing.assert_allclose(decoded.samples, samples, rtol=0, atol=1e-6)


def test_one_second_of_ecg_and_ppg_at_125_hz_is_compact() -> None:
    payload = m.encode_chunk(_chunk(n=125, rate=125.0))
    json_size = len(msgspec.json.encode({"samples": _chunk().samples.tolist()}))
    assert len(payload) < 700
    assert len(payload) * 5 < json_size


def test_decoder_accepts_bytearray_and_memoryview() -> None:
    payload = m.encode_chunk(_chunk())
    assert m.decode_chunk(bytearray(payload)).seq == 42
    assert m.decode_chunk(memoryview(payload)).seq == 42


def test_chunk_helpers() -> None:
    chunk = _chunk(n=250, rate=125.0, channels=("ppg",))
    assert chunk.n_samples == 250
    assert chunk.duration_ns == 2_000_000_000
    assert chunk.channel("ecg") is None
    ppg = chunk.channel("ppg")
    assert ppg is not None and ppg.shape == (250,)


# ------------------------------------------------------------------ signal chunk: named rejections


def test_wrong_version_is_rejected() -> None:
    payload = _patched(m.encode_chunk(_chunk()), VERSION_AT, "<B", 2)
    assert _reason(lambda: m.decode_chunk(payload)) == "bad_version"


def test_unknown_channel_is_rejected_at_encode_and_decode() -> None:
    chunk = _chunk(channels=("ecg", "abp"))
    assert _reason(lambda: m.encode_chunk(chunk), EncodeError) == "unknown_channel"
    payload = m.encode_chunk(_chunk(channels=("ecg",)))
    channel_at = HEADER.size + len("clinic-1") + len("dev-7")
    bad = _patched(payload, channel_at, "<B", 9)
    assert _reason(lambda: m.decode_chunk(bad)) == "unknown_channel"


def test_duplicate_channel_is_rejected() -> None:
    assert _reason(lambda: m.encode_chunk(_chunk(channels=("ecg", "ecg"))), EncodeError) == "duplicate_channel"


def test_sample_count_that_does_not_match_rate_is_rejected() -> None:
    payload = m.encode_chunk(_chunk(n=125, rate=125.0))
    two_seconds = _patched(payload, DURATION_AT, "<I", 2_000_000)  # 125 samples announced as 2 s at 125 Hz
    assert _reason(lambda: m.decode_chunk(two_seconds)) == "sample_count_mismatch"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_samples_are_rejected_at_encode(bad: float) -> None:
    chunk = _chunk()
    chunk.samples[1, 17] = bad
    assert _reason(lambda: m.encode_chunk(chunk), EncodeError) == "non_finite"


def test_non_finite_scale_is_rejected_at_decode() -> None:
    payload = m.encode_chunk(_chunk(channels=("ecg",)))
    scale_at = HEADER.size + len("clinic-1") + len("dev-7") + 1
    bad = _patched(payload, scale_at, "<f", float("nan"))
    assert _reason(lambda: m.decode_chunk(bad)) == "non_finite"


def test_oversize_is_rejected_at_encode_and_decode() -> None:
    too_long = _chunk(n=int(m.MAX_CHUNK_SECONDS * 125) + 125, rate=125.0)
    assert _reason(lambda: m.encode_chunk(too_long), EncodeError) == "oversize"
    too_big = _chunk(n=18000, rate=2000.0)  # 9 s is allowed, but 2 x 18000 int16 samples exceed 64 KiB
    assert _reason(lambda: m.encode_chunk(too_big), EncodeError) == "oversize"
    assert _reason(lambda: m.decode_chunk(b"BP" + bytes(m.MAX_CHUNK_BYTES))) == "oversize"


@pytest.mark.parametrize(("clinic", "device"), [("bad id", "dev"), ("clinic", ""), ("-x", "dev"), ("c", "d/e"),
                                            ("c", "x" * 65), ("c", "dé")])
def test_bad_ids_are_rejected_at_encode(clinic: str, device: str) -> None:
    chunk = _chunk(clinic=clinic, device=device)
    assert _reason(lambda: m.encode_chunk(chunk), EncodeError) == "bad_id"


@pytest.mark.parametrize("bad_device", [b"de/v", b"\xff\xfe\xfd"])
def test_bad_ids_are_rejected_at_decode(bad_device: bytes) -> None:
    payload = m.encode_chunk(_chunk(device="devv"))
    start = HEADER.size + len("clinic-1")
    body = payload[:start] + bad_device[:4].ljust(4, b"x") + payload[start + 4 : -4]
    assert _reason(lambda: m.decode_chunk(_with_crc(body))) == "bad_id"


def test_corrupted_payload_fails_the_checksum() -> None:
    payload = bytearray(m.encode_chunk(_chunk()))
    payload[-20] ^= 0x01  # a sample byte: the header still parses
    assert _reason(lambda: m.decode_chunk(bytes(payload))) == "bad_checksum"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "truncated"),
        (b"BP\x01", "truncated"),
        (b"XX" + bytes(60), "bad_magic"),
    ],
)
def test_short_and_foreign_payloads(payload: bytes, reason: str) -> None:
    assert _reason(lambda: m.decode_chunk(payload)) == reason


def test_truncated_and_extended_payloads_are_rejected() -> None:
    payload = m.encode_chunk(_chunk())
    assert _reason(lambda: m.decode_chunk(payload[:-1])) == "truncated"
    assert _reason(lambda: m.decode_chunk(payload + b"\x00")) == "truncated"


def test_non_bytes_input_is_a_decode_error() -> None:
    assert _reason(lambda: m.decode_chunk("BP not bytes")) == "bad_type"  # type: ignore[arg-type]


@pytest.mark.parametrize("rate", [5.0, 5000.0])
def test_sample_rate_out_of_range_is_rejected(rate: float) -> None:
    chunk = _chunk(n=10, rate=rate)
    assert _reason(lambda: m.encode_chunk(chunk), EncodeError) == "bad_sample_rate"


def test_timestamp_out_of_range_is_rejected() -> None:
    chunk = m.SignalChunk("c", "d", 1, 0, 125.0, ("ecg",), np.zeros((1, 125), dtype=np.float32))
    assert _reason(lambda: m.encode_chunk(chunk), EncodeError) == "bad_header"
    payload = m.encode_chunk(_chunk())
    assert _reason(lambda: m.decode_chunk(_patched(payload, 12, "<q", 5))) == "bad_timestamp"


# ------------------------------------------------------------------ property-based: chunks

ids = st.from_regex(ID_PATTERN, fullmatch=True).filter(lambda s: s.isascii())
channel_sets = st.sampled_from([("ecg",), ("ppg",), ("ecg", "ppg"), ("ppg", "ecg")])


@st.composite
def chunks(draw: st.DrawFn) -> m.SignalChunk:
    channels = draw(channel_sets)
    rate = draw(st.sampled_from([25.0, 100.0, 125.0, 250.0, 500.0]))
    n = draw(st.integers(1, min(400, int(rate * m.MAX_CHUNK_SECONDS))))
    samples = draw(hnp.arrays(np.float32, (len(channels), n),
                              elements=st.floats(-1e4, 1e4, allow_nan=False, width=32)))
    return m.SignalChunk(draw(ids), draw(ids), draw(st.integers(0, 2**64 - 1)),
                         draw(st.integers(m.MIN_T0_NS, m.MAX_T0_NS - 1)), rate, channels, samples)


def _assert_usable_chunk(chunk: m.SignalChunk) -> None:
    """What every consumer relies on for a chunk the decoder accepted."""
    assert ID_PATTERN.match(chunk.clinic_id) and ID_PATTERN.match(chunk.device_id)
    assert set(chunk.channels) <= set(m.CHANNEL_CODES) and len(set(chunk.channels)) == len(chunk.channels)
    assert chunk.samples.shape == (len(chunk.channels), chunk.n_samples) and chunk.n_samples > 0
    assert np.isfinite(chunk.samples).all()
    assert m.MIN_SAMPLE_RATE <= chunk.sample_rate <= m.MAX_SAMPLE_RATE
    assert m.MIN_T0_NS <= chunk.t0_ns < m.MAX_T0_NS
    m.decode_chunk(m.encode_chunk(chunk))  # and it survives another hop


def _assert_precise(error: DecodeError) -> None:
    """A rejection names the rule the input broke, not just "decode"."""
    assert error.reason and error.reason != "decode"
    assert str(error)


def _decode_or_error(payload: bytes) -> None:
    try:
        chunk = m.decode_chunk(payload)
    except DecodeError as exc:
        _assert_precise(exc)
        return
    _assert_usable_chunk(chunk)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks())
def test_any_valid_chunk_round_trips(chunk: m.SignalChunk) -> None:
    decoded = m.decode_chunk(m.encode_chunk(chunk))
    assert (decoded.clinic_id, decoded.device_id, decoded.seq, decoded.t0_ns, decoded.channels) == (
        chunk.clinic_id, chunk.device_id, chunk.seq, chunk.t0_ns, chunk.channels)
    span = (chunk.samples.max(axis=1) - chunk.samples.min(axis=1)).astype(np.float64)
    tolerance = span / 65534 + 1e-3 * np.maximum(np.abs(chunk.samples).max(axis=1), 1.0)
    assert np.all(np.abs(decoded.samples - chunk.samples).max(axis=1) <= tolerance)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_escape_as_anything_but_decode_error(payload: bytes) -> None:
    _decode_or_error(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=HEADER.size, max_size=1024))
def test_random_bytes_behind_the_magic_and_version(payload: bytes) -> None:
    _decode_or_error(b"BP\x01" + payload[3:])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks(), st.data())
def test_corrupted_valid_chunks_decode_or_raise_decode_error(chunk: m.SignalChunk, data: st.DataObject) -> None:
    payload = bytearray(m.encode_chunk(chunk))
    how = data.draw(st.sampled_from(["flip", "flip_fix_crc", "truncate", "extend", "splice"]))
    if how in ("flip", "flip_fix_crc"):
        for _ in range(data.draw(st.integers(1, 4))):
            bit = data.draw(st.integers(0, len(payload) * 8 - 1))
            payload[bit // 8] ^= 1 << (bit % 8)
        if how == "flip_fix_crc":  # a corruption the checksum cannot see: the validation must still hold
            payload = bytearray(_with_crc(bytes(payload[:-4])))
    elif how == "truncate":
        payload = payload[: data.draw(st.integers(0, len(payload) - 1))]
    elif how == "extend":
        payload += data.draw(st.binary(min_size=1, max_size=64))
    else:
        start = data.draw(st.integers(0, len(payload) - 1))
        payload[start:] = data.draw(st.binary(max_size=64))
    _decode_or_error(bytes(payload))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_header_fields_with_a_valid_checksum_decode_or_raise(data: st.DataObject) -> None:
    """Every header field set to any value, checksum recomputed: validation alone must catch nonsense."""
    payload = m.encode_chunk(_chunk(n=125, channels=("ecg", "ppg")))
    fields = list(HEADER.unpack_from(payload))
    index = data.draw(st.integers(1, len(fields) - 1))
    formats = "2sBBQqfIHBBB"
    fmt = formats[index + 1] if index > 0 else "2s"
    size = struct.calcsize("<" + fmt)
    raw = data.draw(st.binary(min_size=size, max_size=size))
    (fields[index],) = struct.unpack("<" + fmt, raw)
    body = HEADER.pack(*fields) + payload[HEADER.size : -4]
    _decode_or_error(_with_crc(body))


# ------------------------------------------------------------------ Window, Estimate, Alert, DeadLetter


def _window(**overrides: Any) -> m.Window:
    samples = np.arange(2 * 1000, dtype="<f4").reshape(2, 1000)
    fields: dict[str, Any] = dict(clinic_id="c1", device_id="d1", start_ns=T0, end_ns=T0 + 8 * 10**9,
                                  sample_rate=125.0, channels=("ecg", "ppg"), n_samples=1000,
                                  samples=samples.tobytes(), sqi={"ecg": 0.9, "ppg": 0.8}, quality_ok=True,
                                  seq_first=3, seq_last=10, received_ns=T0 + 9, emitted_ns=T0 + 10)
    fields.update(overrides)
    return m.Window(**fields)


def _estimate() -> m.Estimate:
    return m.Estimate(clinic_id="c1", device_id="d1", window_start_ns=T0, window_end_ns=T0 + 8 * 10**9,
                      sbp=121.5, dbp=79.25, sbp_sd=4.0, dbp_sd=3.0, anomaly_prob=0.05, sqi=0.9, quality_ok=True,
                      inputs="ecg+ppg", model_version="resnet-lstm-1", received_ns=T0, estimated_ns=T0 + 5)


def _alert() -> m.Alert:
    return m.Alert(alert_id="a-1", clinic_id="c1", device_id="d1", kind="crisis", severity="critical",
                   state="raised", started_ns=T0, event_ns=T0 + 1, sbp=185.0, dbp=121.0, baseline_sbp=130.0,
                   n_windows=3, confidence=0.9, message="SBP 185 / DBP 121 for 3 windows")


def _dead_letter() -> m.DeadLetter:
    return m.DeadLetter(stage="bridge", reason="bad_checksum", detail="checksum mismatch", source="mqtt",
                        payload=b"\x00\xffBP", key="d1", partition=2, offset=77, received_ns=T0)


def test_window_round_trip_and_samples() -> None:
    window = _window()
    decoded = m.decode_window(m.encode_window(window))
    assert decoded == window
    assert decoded.array().shape == (2, 1000)
    assert decoded.array()[1, 999] == 1999.0


@pytest.mark.parametrize(
    ("encode", "decode", "message"),
    [(m.encode_json, m.decode_estimate, _estimate()), (m.encode_json, m.decode_alert, _alert()),
     (m.encode_json, m.decode_dead_letter, _dead_letter())],
)
def test_json_messages_round_trip(encode: Callable[[Any], bytes], decode: Callable[[bytes], Any],
                                  message: msgspec.Struct) -> None:
    payload = encode(message)
    assert payload.startswith(b"{")  # readable in Kafka tools
    assert decode(payload) == message


#: An alert exactly as the alerting service encoded it before the detector returned ``Alert`` directly
#: (captured from that code); alerts already in Kafka must keep decoding.
ENCODED_ALERT_V1 = (
    b'{"v":1,"alert_id":"d1:crisis:8000000000","clinic_id":"c1","device_id":"d1","kind":"crisis",'
    b'"severity":"critical","state":"raised","started_ns":8000000000,"event_ns":10000000000,"sbp":200.0,'
    b'"dbp":125.0,"baseline_sbp":null,"baseline_dbp":null,"n_windows":2,"confidence":1.0,'
    b'"message":"hypertensive crisis (>180 and/or >120): smoothed 200/125 mmHg over 2 consecutive good windows"}'
)


def test_alert_encoded_by_earlier_code_still_decodes_and_re_encodes_its_fields() -> None:
    alert = m.decode_alert(ENCODED_ALERT_V1)
    assert (alert.alert_id, alert.kind, alert.state, alert.sbp, alert.dbp) == (
        "d1:crisis:8000000000", "crisis", "raised", 200.0, 125.0)
    assert alert.baseline_sbp is None and alert.n_windows == 2 and alert.confidence == 1.0
    # Re-encoded, the v1 fields come out unchanged, followed by the v2 evidence fields (defaults).
    assert m.encode_json(alert).startswith(ENCODED_ALERT_V1[:-1] + b",")
    assert m.decode_alert(m.encode_json(alert)) == alert
    # Only the identity fields are required: optional ones added over time all have defaults.
    minimal = m.decode_alert(b'{"alert_id":"a","clinic_id":"c","device_id":"d","kind":"crisis",'
                             b'"severity":"critical","state":"raised","started_ns":1,"event_ns":2,'
                             b'"sbp":181.0,"dbp":100.0}')
    assert minimal.v == 2 and minimal.message == "" and minimal.baseline_dbp is None


def test_window_with_wrong_sample_bytes_or_channel_is_rejected() -> None:
    short = _window(samples=b"\x00" * 12)
    assert _reason(lambda: m.decode_window(m.encode_window(short))) == "sample_count_mismatch"
    abp = _window(channels=("ecg", "abp"))
    assert _reason(lambda: m.decode_window(m.encode_window(abp))) == "unknown_channel"


@pytest.mark.parametrize("overrides", [{"channels": (), "n_samples": -5, "samples": b""},
                                       {"channels": (), "n_samples": 0, "samples": b""},
                                       {"sample_rate": float("nan")}, {"sample_rate": 0.0}])
def test_window_that_cannot_be_used_is_rejected(overrides: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        m.decode_window(m.encode_window(_window(**overrides)))


@pytest.mark.parametrize("decode", [m.decode_estimate, m.decode_alert, m.decode_dead_letter, m.decode_window])
def test_future_version_is_rejected(decode: Callable[[bytes], Any]) -> None:
    if decode is m.decode_window:
        payload = m.encode_window(msgspec.structs.replace(_window(), v=2))
    else:
        messages: dict[Any, msgspec.Struct] = {m.decode_estimate: _estimate(), m.decode_alert: _alert(),
                                               m.decode_dead_letter: _dead_letter()}
        future = 3 if decode in (m.decode_estimate, m.decode_alert) else 2
        payload = m.encode_json(msgspec.structs.replace(messages[decode], v=future))
    assert _reason(lambda: decode(payload)) == "bad_version"


def test_version_1_estimates_and_alerts_still_decode_as_uncalibrated() -> None:
    """Records written before the calibration fields existed (v1) decode with neutral defaults."""
    v1 = {"v": 1, "clinic_id": "c", "device_id": "d", "window_start_ns": 1, "window_end_ns": 2, "sbp": 120.0,
          "dbp": 80.0, "sbp_sd": 5.0, "dbp_sd": 3.0, "anomaly_prob": 0.1, "sqi": 0.9, "quality_ok": True,
          "inputs": "ppg", "model_version": "m1"}
    estimate = m.decode_estimate(msgspec.json.encode(v1))
    assert (estimate.v, estimate.mode, estimate.withheld, estimate.sbp_lo) == (1, "uncalibrated", None, None)
    alert = m.decode_alert(msgspec.json.encode({"v": 1, "alert_id": "a", "clinic_id": "c", "device_id": "d",
                                                "kind": "crisis", "severity": "critical", "state": "raised",
                                                "started_ns": 1, "event_ns": 2, "sbp": 190.0, "dbp": 100.0}))
    assert (alert.v, alert.basis, alert.calibration_ns) == (1, "estimates", None)
    assert m.Estimate(**{k: v for k, v in v1.items() if k != "v"}).v == 2


def test_cuff_reading_and_calibration_round_trip_and_bad_ids_are_rejected() -> None:
    reading = m.CuffReading(clinic_id="c1", device_id="d1", sbp=128.0, dbp=82.0, time_ns=T0, cuff_id="omron-1",
                            confirmation=True)
    assert m.decode_cuff(m.encode_json(reading)) == reading
    record = m.CalibrationRecord(clinic_id="c1", device_id="d1", cuff_sbp=128.0, cuff_dbp=82.0, time_ns=T0,
                                 cuff_id="omron-1", reference_sbp=120.0, reference_dbp=75.0, n_windows=40,
                                 model_version="m1")
    assert m.decode_calibration(m.encode_json(record)) == record
    bad = msgspec.structs.replace(reading, device_id="../x")
    assert _reason(lambda: m.decode_cuff(m.encode_json(bad))) == "bad_id"


@pytest.mark.parametrize("decode", [m.decode_estimate, m.decode_alert, m.decode_dead_letter])
def test_json_with_missing_or_mistyped_field_is_rejected(decode: Callable[[bytes], Any]) -> None:
    assert _reason(lambda: decode(b'{"v": 1}')) == "invalid_message"
    assert _reason(lambda: decode(b'{"v": "one"}')) == "invalid_message"
    assert _reason(lambda: decode(b"not json")) == "invalid_message"


def test_oversize_json_and_window_are_rejected() -> None:
    assert _reason(lambda: m.decode_estimate(b" " * (m.MAX_JSON_BYTES + 1))) == "oversize"
    assert _reason(lambda: m.decode_window(b"\x00" * (m.MAX_WINDOW_BYTES + 1))) == "oversize"


DECODERS: list[Callable[[bytes], Any]] = [m.decode_chunk, m.decode_window, m.decode_estimate, m.decode_alert,
                                         m.decode_dead_letter]
VALID: dict[Callable[[bytes], Any], bytes] = {
    m.decode_chunk: m.encode_chunk(_chunk()),
    m.decode_window: m.encode_window(_window()),
    m.decode_estimate: m.encode_json(_estimate()),
    m.decode_alert: m.encode_json(_alert()),
    m.decode_dead_letter: m.encode_json(_dead_letter()),
}


def _decode_any_or_error(decode: Callable[[bytes], Any], payload: bytes) -> None:
    try:
        message = decode(payload)
    except DecodeError as exc:
        _assert_precise(exc)
        return
    if decode is m.decode_chunk:
        _assert_usable_chunk(message)
    elif decode is m.decode_window:
        array = message.array()
        assert array.shape == (len(message.channels), message.n_samples)
        assert set(message.channels) <= set(m.CHANNEL_CODES)
    else:
        assert message.v in ((1, 2) if decode in (m.decode_estimate, m.decode_alert) else (1,))
        decode(m.encode_json(message))  # what was accepted re-encodes and decodes the same way


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(DECODERS), st.binary(max_size=512))
def test_every_decoder_on_random_bytes(decode: Callable[[bytes], Any], payload: bytes) -> None:
    _decode_any_or_error(decode, payload)


def corrupted(valid: bytes, data: st.DataObject) -> bytes:
    """``valid`` damaged one way hypothesis draws: bits flipped, truncated, extended or partly overwritten
    (the corruptions a radio link, a broken gateway or an attacker produce); shared by the codec fuzz tests."""
    payload = bytearray(valid)
    how = data.draw(st.sampled_from(["flip", "truncate", "extend", "overwrite"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            bit = data.draw(st.integers(0, len(payload) * 8 - 1))
            payload[bit // 8] ^= 1 << (bit % 8)
    elif how == "truncate":
        payload = payload[: data.draw(st.integers(0, len(payload) - 1))]
    elif how == "extend":
        payload += data.draw(st.binary(min_size=1, max_size=64))
    else:
        start = data.draw(st.integers(0, len(payload) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=64))
        payload[start : start + len(chunk)] = chunk
    return bytes(payload)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(DECODERS), st.data())
def test_every_decoder_on_corrupted_valid_payloads(decode: Callable[[bytes], Any], data: st.DataObject) -> None:
    _decode_any_or_error(decode, corrupted(VALID[decode], data))
