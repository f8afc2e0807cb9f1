"""The InfluxDB schema (measurements, tags, fields) and line-protocol encoding of bpstream's points.

Every point is identified by its measurement, tags and timestamp, so writing the same estimate or alert
twice (a replay, a restart) overwrites the point instead of duplicating it. Timestamps are nanoseconds.

Measurements (documented for Grafana in docs/INFLUX_SCHEMA.md):

``bp_estimate``   tags clinic, device            time = window end (device time)
                  fields sbp, dbp, sbp_sd, dbp_sd (mmHg), anomaly_prob, sqi (0-1), quality_ok (0/1),
                  latency_ms (bridge receipt of the newest chunk -> estimate), stored_latency_ms (same
                  receipt -> handed to InfluxDB by the writer), model_version (string), raw_sbp, raw_dbp
                  (calibration-free model output), mode ("calibrated"/"uncalibrated"), calibrated (1/0),
                  calibration_age_s, sbp_lo, sbp_hi, dbp_lo, dbp_hi (90% interval), withheld (reason
                  string, absent when shown), withheld_flag (1/0). Windows too poor to score (quality_ok 0)
                  carry no sbp/dbp/sd/anomaly_prob/interval fields: a visible gap.
``bp_alert``      tags clinic, device, kind, severity     time = the event (window end)
                  fields state ("raised"/"resolved"), active (1 raised, 0 resolved), sbp, dbp,
                  n_windows, confidence, alert_id, message, started_ns, basis ("estimates"/"cuff"),
                  mode, first_window_ns, calibration_ns, calibration_cuff_id, cuff_id
``bp_cuff``       tags clinic, device            time = when the cuff measured
                  fields sbp, dbp (mmHg), cuff_id, confirmation (1/0)
``signal_quality`` tags clinic, device           time = window end
                  fields sqi_ecg, sqi_ppg, quality_ok (0/1), inputs ("ecg+ppg"/"ppg"/"none"),
                  heart_rate_bpm, problems (comma-separated)
``signal_gap``    tags clinic, device            time = device time where the gap starts
                  fields missing_chunks, seq_from, seq_to, end_ns
``stream_event``  tags clinic, device, kind (clock_jump, format_change, stream_reset, window_error)
                  time = device time of the event's end; fields count (1), seq_first, seq_last, detail
``dead_letter``   tags stage, reason             time = receipt time (ns, unique per record)
                  fields count (1), source
``bp_notification`` tags clinic, device, channel, transition, outcome, severity
                  time = the attempt (notifier wall clock); fields count (1), attempt, alert_id, kind,
                  idempotency_key, target (host or mail domain), reason, status (HTTP status / SMTP code)
``pipeline``      tags service, instance         time = sample time
                  fields consumer_lag (messages), lag_ms, processed, rate_per_s
"""

from __future__ import annotations

import math
from collections.abc import Mapping

MEASUREMENT_ESTIMATE = "bp_estimate"
MEASUREMENT_ALERT = "bp_alert"
MEASUREMENT_CUFF = "bp_cuff"
MEASUREMENT_QUALITY = "signal_quality"
MEASUREMENT_GAP = "signal_gap"
MEASUREMENT_DEAD_LETTER = "dead_letter"
MEASUREMENT_PIPELINE = "pipeline"
MEASUREMENT_STREAM_EVENT = "stream_event"
MEASUREMENT_NOTIFICATION = "bp_notification"

FieldValue = float | int | bool | str


# InfluxDB reads a backslash in a measurement, tag or field key literally (it does not unescape "\\"), so
# only the separators are escaped; a line break would end the point, so it becomes a space.
def _escape_key(value: str) -> str:
    return value.replace("\n", " ").replace(",", r"\,").replace("=", r"\=").replace(" ", r"\ ")


def _escape_measurement(value: str) -> str:
    return value.replace("\n", " ").replace(",", r"\,").replace(" ", r"\ ")


def _field(value: FieldValue) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return None if not math.isfinite(value) else repr(value)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
    return f'"{escaped}"'


def line(measurement: str, tags: Mapping[str, str], fields: Mapping[str, FieldValue | None], time_ns: int) -> str:
    """One line-protocol point. Non-finite floats and None fields are left out; tags are sorted."""
    tag_part = "".join(f",{_escape_key(k)}={_escape_key(v)}" for k, v in sorted(tags.items()) if v != "")
    rendered = []
    for key, value in fields.items():
        if value is None:
            continue
        text = _field(value)
        if text is not None:
            rendered.append(f"{_escape_key(key)}={text}")
    if not rendered:
        raise ValueError(f"point {measurement} at {time_ns} has no finite field")
    return f"{_escape_measurement(measurement)}{tag_part} {','.join(rendered)} {int(time_ns)}"
