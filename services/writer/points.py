"""Pure translation of Kafka records into InfluxDB line-protocol points (schema in ``bpstream.shared.influx``).

Each point's identity is measurement + tags + timestamp, chosen so a replayed record lands on the same point:
estimates and quality at the window end (device time), alerts at the event time, dead letters at their
receipt time. Nothing here talks to a server.
"""

from __future__ import annotations

from typing import Final

import msgspec

from bpstream.shared.errors import DecodeError
from bpstream.shared.influx import (
    MEASUREMENT_ALERT,
    MEASUREMENT_CUFF,
    MEASUREMENT_DEAD_LETTER,
    MEASUREMENT_ESTIMATE,
    MEASUREMENT_GAP,
    MEASUREMENT_NOTIFICATION,
    MEASUREMENT_PIPELINE,
    MEASUREMENT_QUALITY,
    MEASUREMENT_STREAM_EVENT,
    line,
)
from bpstream.shared.messages import (
    MAX_JSON_BYTES,
    Alert,
    CuffReading,
    DeadLetter,
    Estimate,
    QualityRecord,
    decode_alert,
    decode_cuff,
    decode_dead_letter,
    decode_estimate,
)
from bpstream.shared.notifications import NotificationAttempt, decode_attempt
from bpstream.shared.topics import ALERTS, CUFF, ESTIMATES, NOTIFICATIONS, QUALITY, SIGNALS_DLQ, KafkaTopic

#: The topics the writer stores, by their un-prefixed name.
WRITTEN_TOPICS: Final[tuple[KafkaTopic, ...]] = (ESTIMATES, ALERTS, QUALITY, SIGNALS_DLQ, CUFF, NOTIFICATIONS)


def estimate_line(estimate: Estimate, stored_ns: int) -> str:
    """``bp_estimate`` at the window end. Unscored (quality-flagged) estimates carry no pressure fields.

    ``stored_ns`` is the writer's clock when it sends the batch; ``stored_latency_ms`` (bridge receipt of the
    newest chunk -> handed to InfluxDB) is what the pipeline benchmark reports.
    """
    scored = estimate.quality_ok
    received = estimate.received_ns
    fields: dict[str, float | int | bool | str | None] = {
        "sbp": estimate.sbp if scored else None,
        "dbp": estimate.dbp if scored else None,
        "sbp_sd": estimate.sbp_sd if scored else None,
        "dbp_sd": estimate.dbp_sd if scored else None,
        "anomaly_prob": estimate.anomaly_prob if scored else None,
        "sqi": float(estimate.sqi),
        "quality_ok": 1 if estimate.quality_ok else 0,
        "latency_ms": (estimate.estimated_ns - received) / 1e6 if received and estimate.estimated_ns else None,
        "stored_latency_ms": (stored_ns - received) / 1e6 if received else None,
        "model_version": estimate.model_version,
        "raw_sbp": estimate.raw_sbp if scored else None,
        "raw_dbp": estimate.raw_dbp if scored else None,
        "mode": estimate.mode,
        "calibrated": 1 if estimate.mode == "calibrated" else 0,
        "calibration_age_s": estimate.calibration_age_s,
        "sbp_lo": estimate.sbp_lo if scored else None,
        "sbp_hi": estimate.sbp_hi if scored else None,
        "dbp_lo": estimate.dbp_lo if scored else None,
        "dbp_hi": estimate.dbp_hi if scored else None,
        "withheld": estimate.withheld,
        "withheld_flag": 0 if estimate.withheld is None else 1,
    }
    return line(MEASUREMENT_ESTIMATE, {"clinic": estimate.clinic_id, "device": estimate.device_id}, fields,
                estimate.window_end_ns)


def alert_line(alert: Alert) -> str:
    """``bp_alert`` at the event time; raise and resolve of one episode are two points with one alert_id."""
    tags = {"clinic": alert.clinic_id, "device": alert.device_id, "kind": alert.kind, "severity": alert.severity}
    fields: dict[str, float | int | bool | str | None] = {
        "state": alert.state,
        "active": 1 if alert.state == "raised" else 0,
        "sbp": alert.sbp,
        "dbp": alert.dbp,
        "n_windows": alert.n_windows,
        "confidence": alert.confidence,
        "alert_id": alert.alert_id,
        "message": alert.message,
        "started_ns": alert.started_ns,
        "basis": alert.basis,
        "mode": alert.mode or None,
        "first_window_ns": alert.first_window_ns,
        "calibration_ns": alert.calibration_ns,
        "calibration_cuff_id": alert.calibration_cuff_id,
        "cuff_id": alert.cuff_id,
    }
    return line(MEASUREMENT_ALERT, tags, fields, alert.event_ns)


def cuff_line(reading: CuffReading) -> str:
    """``bp_cuff`` at the cuff's measurement time: one point per reading (a resent reading overwrites it)."""
    return line(MEASUREMENT_CUFF, {"clinic": reading.clinic_id, "device": reading.device_id},
                {"sbp": reading.sbp, "dbp": reading.dbp, "cuff_id": reading.cuff_id,
                 "confirmation": 1 if reading.confirmation else 0}, reading.time_ns)


def notification_line(attempt: NotificationAttempt) -> str:
    """``bp_notification`` at the attempt time: one point per delivery attempt of the notifier."""
    tags = {"clinic": attempt.clinic_id, "device": attempt.device_id, "channel": attempt.channel,
            "transition": attempt.transition, "outcome": attempt.outcome, "severity": attempt.severity}
    fields: dict[str, float | int | bool | str | None] = {
        "count": 1, "attempt": attempt.attempt, "alert_id": attempt.alert_id, "kind": attempt.kind,
        "idempotency_key": attempt.idempotency_key, "target": attempt.target or None,
        "reason": attempt.reason or None, "status": attempt.status,
    }
    return line(MEASUREMENT_NOTIFICATION, tags, fields, attempt.at_ns)


def dead_letter_line(record: DeadLetter, fallback_ns: int) -> str:
    """``dead_letter`` at the receipt time (unique per record), so one point per dead-lettered input."""
    return line(MEASUREMENT_DEAD_LETTER, {"stage": record.stage, "reason": record.reason},
                {"count": 1, "source": record.source}, record.received_ns or fallback_ns)


def pipeline_line(service: str, instance: str, time_ns: int, *, consumer_lag: int | None = None,
                  lag_ms: float | None = None, processed: int | None = None,
                  rate_per_s: float | None = None) -> str:
    """``pipeline`` sample: consumer lag and latency of one consumer group, for dashboards and the demo."""
    return line(MEASUREMENT_PIPELINE, {"service": service, "instance": instance},
                {"consumer_lag": consumer_lag, "lag_ms": lag_ms, "processed": processed, "rate_per_s": rate_per_s},
                time_ns)


_quality_decoder = msgspec.json.Decoder(QualityRecord)


def decode_quality(payload: bytes) -> QualityRecord:
    """Decode a processor ``QualityRecord``; ``DecodeError`` for anything else."""
    if len(payload) > MAX_JSON_BYTES:
        raise DecodeError(f"quality record of {len(payload)} bytes is too large", reason="oversize")
    try:
        record = _quality_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"invalid QualityRecord: {exc}", reason="invalid_message") from exc
    if record.v != 1:
        raise DecodeError(f"QualityRecord version {record.v} is not supported", reason="bad_version")
    return record


def quality_lines(record: QualityRecord) -> list[str]:
    """``signal_quality`` (window quality, at the window end), ``signal_gap`` (at the gap start) or
    ``stream_event`` (clock jumps, format changes, stream resets, refused windows, at their end time)."""
    tags = {"clinic": record.clinic_id, "device": record.device_id}
    if record.kind == "window":
        fields: dict[str, float | int | bool | str | None] = {
            f"sqi_{name}": float(value) for name, value in sorted(record.sqi.items())}
        fields.update(quality_ok=1 if record.quality_ok else 0, inputs=record.inputs or None,
                      heart_rate_bpm=record.heart_rate_bpm, problems=",".join(record.problems) or None)
        return [line(MEASUREMENT_QUALITY, tags, fields, record.end_ns)]
    if record.kind == "gap":
        return [line(MEASUREMENT_GAP, tags, {"missing_chunks": record.missing_chunks, "seq_from": record.seq_first,
                                             "seq_to": record.seq_last, "end_ns": record.end_ns},
                     record.start_ns)]
    return [line(MEASUREMENT_STREAM_EVENT, {**tags, "kind": record.kind},
                 {"count": 1, "seq_first": record.seq_first, "seq_last": record.seq_last,
                  "detail": record.detail[:500] or None}, record.end_ns)]


def record_lines(topic: str, payload: bytes, *, prefix: str, stored_ns: int) -> tuple[list[str], int | None]:
    """Lines for one Kafka record of ``topic`` and, for estimates, its ``received_ns``.

    Raises ``DecodeError`` (with its reason) for a payload that is not a valid message of that topic.
    """
    name = topic[len(prefix):] if prefix and topic.startswith(prefix) else topic
    if name == ESTIMATES.name:
        estimate = decode_estimate(payload)
        return [estimate_line(estimate, stored_ns)], estimate.received_ns or None
    if name == ALERTS.name:
        return [alert_line(decode_alert(payload))], None
    if name == SIGNALS_DLQ.name:
        return [dead_letter_line(decode_dead_letter(payload), stored_ns)], None
    if name == CUFF.name:
        return [cuff_line(decode_cuff(payload))], None
    if name == QUALITY.name:
        return quality_lines(decode_quality(payload)), None
    if name == NOTIFICATIONS.name:
        return [notification_line(decode_attempt(payload))], None
    raise DecodeError(f"the writer does not store topic {topic!r}", reason="unknown_topic")
