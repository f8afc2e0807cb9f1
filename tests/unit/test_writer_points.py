"""The writer's line-protocol points: schema, identity (replays overwrite) and unscored estimates."""

from __future__ import annotations

import pytest

from bpstream.services.writer.points import alert_line, dead_letter_line, estimate_line, record_lines
from bpstream.shared.errors import DecodeError
from bpstream.shared.messages import Alert, DeadLetter, Estimate, encode_json

pytestmark = pytest.mark.unit

T_END = 1_760_000_008_000_000_000


def _estimate(**overrides: object) -> Estimate:
    base: dict[str, object] = dict(clinic_id="clinic-1", device_id="dev-1", window_start_ns=T_END - 8 * 10**9,
                                   window_end_ns=T_END, sbp=128.5, dbp=81.25, sbp_sd=6.0, dbp_sd=4.0,
                                   anomaly_prob=0.1, sqi=0.9, quality_ok=True, inputs="ecg+ppg",
                                   model_version="v1", received_ns=T_END + 10**8,
                                   estimated_ns=T_END + 3 * 10**8)
    base.update(overrides)
    return Estimate(**base)  # type: ignore[arg-type]


def _identity(point: str) -> tuple[str, str]:
    """Series key and timestamp: what InfluxDB uses to decide that two writes are the same point."""
    series, _fields, time_ns = point.rsplit(" ", 2)
    return series, time_ns


def test_estimate_point_is_keyed_by_device_and_window_end() -> None:
    point = estimate_line(_estimate(), stored_ns=T_END + 5 * 10**8)
    assert point.startswith("bp_estimate,clinic=clinic-1,device=dev-1 ")
    assert point.endswith(f" {T_END}")
    assert "sbp=128.5" in point and "dbp=81.25" in point and 'model_version="v1"' in point
    assert "latency_ms=200.0" in point and "stored_latency_ms=400.0" in point
    # A replay (other model version, later store time) lands on the same point and overwrites it.
    replay = estimate_line(_estimate(model_version="v2", sbp=130.0), stored_ns=T_END + 9 * 10**9)
    assert _identity(replay) == _identity(point)


def test_unscored_estimate_keeps_quality_but_no_pressure() -> None:
    point = estimate_line(_estimate(quality_ok=False, sbp=0.0, dbp=0.0, sqi=0.2), stored_ns=T_END)
    assert "quality_ok=0i" in point and "sqi=0.2" in point
    assert "sbp=" not in point and "dbp=" not in point


def test_alert_raise_and_resolve_are_two_points_of_one_episode() -> None:
    common = dict(alert_id="dev-1:crisis:1", clinic_id="clinic-1", device_id="dev-1", kind="crisis",
                  severity="crisis", started_ns=T_END, sbp=190.0, dbp=125.0, n_windows=3, confidence=0.9)
    raised = alert_line(Alert(state="raised", event_ns=T_END, **common))  # type: ignore[arg-type]
    resolved = alert_line(Alert(state="resolved", event_ns=T_END + 60 * 10**9, **common))  # type: ignore[arg-type]
    assert 'state="raised"' in raised and "active=1i" in raised
    assert 'state="resolved"' in resolved and "active=0i" in resolved
    assert _identity(raised) != _identity(resolved)
    assert 'alert_id="dev-1:crisis:1"' in resolved


def test_dead_letter_point_counts_by_stage_and_reason() -> None:
    record = DeadLetter(stage="bridge", reason="bad_checksum", detail="x", source="bpstream/c/d/signals",
                        payload=b"\x00", received_ns=T_END)
    point = dead_letter_line(record, fallback_ns=1)
    assert point == f'dead_letter,reason=bad_checksum,stage=bridge count=1i,source="bpstream/c/d/signals" {T_END}'


def test_record_lines_routes_by_topic_with_prefix_and_rejects_garbage() -> None:
    lines, received = record_lines("t1-estimates", encode_json(_estimate()), prefix="t1-", stored_ns=T_END)
    assert len(lines) == 1 and lines[0].startswith("bp_estimate,")
    assert received == T_END + 10**8
    with pytest.raises(DecodeError) as info:
        record_lines("t1-estimates", b"{not json", prefix="t1-", stored_ns=T_END)
    assert info.value.reason == "invalid_message"
    with pytest.raises(DecodeError):
        record_lines("t1-alerts", encode_json(_estimate()), prefix="t1-", stored_ns=T_END)


def test_quality_window_gap_and_stream_events_become_their_measurements() -> None:
    from bpstream.shared.messages import QualityRecord

    window = QualityRecord(kind="window", clinic_id="c", device_id="d", start_ns=T_END - 8 * 10**9, end_ns=T_END,
                           sqi={"ecg": 0.8, "ppg": 0.3}, quality_ok=False, inputs="none",
                           problems=("ppg_poor",))
    gap = QualityRecord(kind="gap", clinic_id="c", device_id="d", start_ns=T_END, end_ns=T_END + 2 * 10**9,
                        seq_first=10, seq_last=11, missing_chunks=2)
    reset = QualityRecord(kind="stream_reset", clinic_id="c", device_id="d", start_ns=T_END, end_ns=T_END,
                          detail="seq went back")
    lines = [record_lines("quality", encode_json(r), prefix="", stored_ns=0)[0][0] for r in (window, gap, reset)]
    assert lines[0] == (f'signal_quality,clinic=c,device=d sqi_ecg=0.8,sqi_ppg=0.3,quality_ok=0i,inputs="none",'
                        f'problems="ppg_poor" {T_END}')
    assert lines[1].startswith("signal_gap,clinic=c,device=d missing_chunks=2i,seq_from=10i,seq_to=11i")
    assert lines[1].endswith(f" {T_END}")
    assert lines[2].startswith("stream_event,clinic=c,device=d,kind=stream_reset count=1i")


def test_refused_points_dead_letter_each_record_once_with_our_reason() -> None:
    from aiokafka import ConsumerRecord

    from bpstream.services.writer.service import refused_records

    def record(offset: int) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord("estimates", 0, offset, 0, 0, b"c/d", b"{}", None, 3, 2, ())

    first, second = record(7), record(8)
    origin = {"a 1": first, "b 1": first, "c 1": second}
    rejected = refused_records([("a 1", "field_type_conflict"), ("b 1", "field_type_conflict"),
                                ("c 1", "unparsable"), ("pipeline x=1 1", "invalid")], origin)
    assert [(r.record.offset, r.reason) for r in rejected] == [(7, "influx_field_type_conflict"),
                                                               (8, "influx_unparsable")]
    assert all("InfluxDB refused" in r.detail for r in rejected)  # never InfluxDB's own text (it repeats readings)
