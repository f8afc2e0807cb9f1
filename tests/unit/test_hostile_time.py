"""Hostile device time and sequence numbers, without brokers: the bridge's stage, the processor's reassembly
and the alert detector each refuse what would move a clock into the future, and a restarted device resumes."""

from __future__ import annotations

import numpy as np
import pytest
from test_processor_stage import HOP, T0, run, simulated_payloads, windows_of

from bpstream.services.bridge.stage import DeviceTimeLimits, Rejection, validate_payload
from bpstream.services.processor.stage import NS, STREAM_RESET, Reassembler, StageConfig, StageOutput
from bpstream.shared.anomaly import AlertConfig, AlertDetector
from bpstream.shared.devicetime import (
    DEVICE_TIME_AHEAD,
    DEVICE_TIME_BEHIND,
    SEQ_JUMP,
    check_device_time,
    check_seq_jump,
)
from bpstream.shared.messages import Estimate, SignalChunk, decode_chunk, encode_chunk
from bpstream.shared.topics import mqtt_signals_topic

pytestmark = pytest.mark.unit

YEAR_2061_NS = 2_871_000_000 * NS
HOUR = 3600 * NS


def _chunk(seq: int, t0_ns: int, device: str = "dev-1") -> bytes:
    return encode_chunk(SignalChunk("clinic-1", device, seq, t0_ns, 125.0, ("ecg", "ppg"),
                                    np.zeros((2, 125), dtype=np.float32)))


def test_device_time_bounds() -> None:
    assert check_device_time(T0 + 299 * NS, T0, max_ahead_ns=300 * NS) is None
    assert check_device_time(T0 + 301 * NS, T0, max_ahead_ns=300 * NS).reason == DEVICE_TIME_AHEAD  # type: ignore[union-attr]
    assert check_device_time(T0 - 10 * HOUR, T0, max_ahead_ns=300 * NS) is None  # no behind bound by default
    assert check_device_time(T0 - 2 * HOUR, T0, max_ahead_ns=None,
                             max_behind_ns=HOUR).reason == DEVICE_TIME_BEHIND  # type: ignore[union-attr]


def test_seq_jump_is_refused_unless_device_time_moved_on_as_far() -> None:
    kw = dict(next_seq=31, expected_t0_ns=T0 + 31 * NS, max_seq_jump=100)
    assert check_seq_jump(10**12, T0 + 31 * NS, NS, **kw).reason == SEQ_JUMP  # type: ignore[arg-type, union-attr]
    assert check_seq_jump(131, T0 + 31 * NS, NS, **kw) is None
    # 500 chunks really lost: the device's clock moved on 500 s too.
    assert check_seq_jump(531, T0 + 531 * NS, NS, **kw) is None


def test_bridge_dead_letters_a_chunk_dated_ahead_of_its_receipt() -> None:
    topic = mqtt_signals_topic("clinic-1", "dev-1")
    limits = DeviceTimeLimits(max_ahead_s=300.0)
    ok = validate_payload(topic, _chunk(5, T0 + 10 * NS), (125.0,), now_ns=T0, time_limits=limits)
    assert isinstance(ok, SignalChunk)
    for t0 in (YEAR_2061_NS, T0 + HOUR):
        verdict = validate_payload(topic, _chunk(10**12, t0), (125.0,), now_ns=T0, time_limits=limits)
        assert isinstance(verdict, Rejection) and verdict.reason == DEVICE_TIME_AHEAD
    behind = validate_payload(topic, _chunk(5, T0 - 2 * HOUR), (125.0,), now_ns=T0,
                              time_limits=DeviceTimeLimits(max_ahead_s=300.0, max_behind_s=3600.0))
    assert isinstance(behind, Rejection) and behind.reason == DEVICE_TIME_BEHIND


def _received(payloads: list[bytes], stage: Reassembler, receipt: list[int]) -> list[tuple[StageOutput, bytes]]:
    state = None
    outs = []
    for payload, received in zip(payloads, receipt, strict=True):
        state, out = stage.process(state, decode_chunk(payload), payload, received_ns=received, now_ns=received)
        outs.append((out, payload))
    return outs


def test_processor_refuses_the_hostile_stream_and_keeps_every_window_after_it() -> None:
    """30 s normal, one chunk seq 10^12 dated 2061, 12 s at +1 h, then normal again (the issue's stream,
    reaching the processor directly, as if the bridge had not checked it)."""
    stage = Reassembler(StageConfig(max_ahead_ns=300 * NS, max_seq_jump=3600))
    normal = simulated_payloads(60)
    hostile = (normal[:30] + [_chunk(10**12, YEAR_2061_NS)]
               + [_chunk(30 + k, T0 + (30 + k) * NS + HOUR) for k in range(12)] + normal[42:])
    receipt = [T0 + k * NS + NS for k in range(31)] + [T0 + (30 + k) * NS + NS for k in range(12)] + \
              [T0 + k * NS + NS for k in range(42, 60)]
    outs = _received(hostile, stage, receipt)
    rejected = [out.rejected.reason for out, _ in outs if out.rejected is not None]
    assert rejected == [DEVICE_TIME_AHEAD] * 13
    ends = [w.end_ns for out, _ in outs for w in out.windows]
    after = [e for e in ends if e > T0 + 42 * NS]
    expected = list(range(-(-(T0 + 42 * NS + 8 * NS) // HOP) * HOP, T0 + 60 * NS + 1, HOP))
    assert after == expected and len(expected) >= 5


def test_processor_refuses_a_seq_jump_with_a_plausible_time() -> None:
    stage = Reassembler(StageConfig(max_ahead_ns=300 * NS, max_seq_jump=3600))
    normal = simulated_payloads(40)
    forged = _chunk(10**12, T0 + 20 * NS)
    payloads = [*normal[:20], forged, *normal[20:]]
    outs = _received(payloads, stage, [T0 + 50 * NS] * len(payloads))
    assert [out.rejected.reason for out, _ in outs if out.rejected] == [SEQ_JUMP]
    _, control = run(normal, reassembler=Reassembler())
    assert [w.end_ns for out, _ in outs for w in out.windows] == [
        w.end_ns for w in windows_of(control)]


@pytest.mark.parametrize("restart_after", [5, 30])
def test_a_restarted_device_resumes_with_its_seq_back_at_zero(restart_after: int) -> None:
    """A reboot sends seq 0, 1, ... again with a newer device time: not duplicates, a new run, windows go on
    (also when the old seq numbers are still in the reassembly buffer)."""
    first = simulated_payloads(restart_after)
    reboot_t0 = T0 + (restart_after + 3) * NS
    second = simulated_payloads(30, t0_ns=reboot_t0, seed=4)
    payloads = first + second
    stage = Reassembler(StageConfig(max_ahead_ns=300 * NS, max_seq_jump=10))
    outs = [out for out, _ in _received(payloads, stage, [decode_chunk(p).t0_ns + NS for p in payloads])]
    assert any(q.kind == STREAM_RESET for out in outs for q in out.quality)
    assert not any(out.duplicate or out.late or out.rejected for out in outs)
    after = [w.end_ns for w in windows_of(outs) if w.start_ns >= reboot_t0]
    expected = list(range(-(-(reboot_t0 + 8 * NS) // HOP) * HOP, reboot_t0 + 30 * NS + 1, HOP))
    assert after == expected


def _estimate(end_ns: int, sbp: float, dbp: float, received_ns: int | None = None) -> Estimate:
    return Estimate(clinic_id="c1", device_id="d1", window_start_ns=end_ns - 8 * NS, window_end_ns=end_ns,
                    sbp=sbp, dbp=dbp, sbp_sd=4.0, dbp_sd=3.0, anomaly_prob=0.5, sqi=0.9, quality_ok=True,
                    inputs="ecg+ppg", model_version="v",
                    received_ns=end_ns + NS // 2 if received_ns is None else received_ns)


def test_one_future_dated_estimate_cannot_freeze_the_alert_detector() -> None:
    det = AlertDetector(AlertConfig())
    kinds: list[str] = []
    for i in range(15):
        kinds += [a.kind for a in det.update(_estimate(T0 + i * HOP, 120.0, 80.0))]
    # A window dated 2061 (received now): ignored and counted, the clock does not move.
    assert det.update(_estimate(YEAR_2061_NS, 250.0, 140.0, received_ns=T0 + 15 * HOP)) == []
    assert det.state.future_windows == 1 and det.state.last_ns == T0 + 14 * HOP
    for i in range(15, 40):
        kinds += [a.kind for a in det.update(_estimate(T0 + i * HOP, 200.0, 125.0))]
    assert "crisis" in kinds
