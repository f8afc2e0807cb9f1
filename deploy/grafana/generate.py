"""Generate bpstream's Grafana provisioning files (datasource, dashboards, alert rules, notifications).

The files Grafana reads are committed (deploy/grafana/provisioning and deploy/grafana/dashboards); this
script is their source. Run it after changing a query or threshold:

    .venv/bin/python deploy/grafana/generate.py          # rewrite the files
    .venv/bin/python deploy/grafana/generate.py --check  # exit 1 if a committed file is out of date

Every query is InfluxQL against the schema in shared/influx.py (docs/INFLUX_SCHEMA.md). Grafana expands
$VARS in provisioning files from its environment, except in alert rule models and annotations; the
datasource and contact points take their URLs and credentials from BPSTREAM_* variables that way.
tests/integration/test_grafana_queries.py runs every query here against a real InfluxDB.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DATASOURCE_UID = "bpstream-influxdb"
DATASOURCE = {"type": "influxdb", "uid": DATASOURCE_UID}
FOLDER = "bpstream"

#: Clinical thresholds (mmHg), ACC/AHA 2017: stage 2 is SBP >= 140 or DBP >= 90; a hypertensive crisis is
#: SBP > 180 and/or DBP > 120.
CRISIS_SBP, CRISIS_DBP = 180, 120
STAGE2_SBP, STAGE2_DBP = 140, 90
#: A device is silent when it sent no estimate (scored or not) for three whole minutes.
SILENT_MINUTES = 3
#: Consumer lag (messages) above which a pipeline stage is falling behind, averaged over 5 minutes.
LAG_MESSAGES = 10_000
#: Dead letters in 10 minutes above which operators are told (about one per minute).
DLQ_PER_10_MIN = 10
#: Failed or retried notification attempts per channel in 10 minutes before operators are told.
NOTIFY_FAILURES_PER_10_MIN = 3
#: How far back an open alert episode is looked for (its raise may be days old).
EPISODE_LOOKBACK_S = 7 * 24 * 3600

CLINIC_FILTER = '"clinic" =~ /^$clinic$/'
DEVICE_FILTER = '"device" =~ /^$device$/'
#: Estimates that may be shown as a number and alerted on (inference's ``withheld`` is absent).
SHOWN = '"withheld_flag" = 0'
#: The inference's default CALIBRATION_MAX_AGE_S (24 h): a calibration older than this is stale.
CALIBRATION_DUE_S = 24 * 3600
#: How far back the "calibration due" rule looks for the device's latest calibration_due event (7 days).
CALIBRATION_DUE_LOOKBACK_S = 7 * 24 * 3600


# ---------------------------------------------------------------------------------------------- dashboards
def _target(query: str, ref: str = "A", *, fmt: str = "time_series",
            alias: str | None = None) -> dict[str, Any]:
    target: dict[str, Any] = {"refId": ref, "datasource": DATASOURCE, "query": query, "rawQuery": True,
                              "resultFormat": fmt}
    if alias:
        target["alias"] = alias
    return target


Steps = list[tuple[float | None, str]]


def _panel(pid: int, kind: str, title: str, grid: tuple[int, int, int, int], targets: list[dict[str, Any]], *,
           unit: str = "short", description: str = "", thresholds: Steps | None = None,
           options: dict[str, Any] | None = None, decimals: int | None = None) -> dict[str, Any]:
    x, y, w, h = grid
    steps = [{"color": color, "value": value} for value, color in (thresholds or [(None, "green")])]
    defaults: dict[str, Any] = {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}}
    if decimals is not None:
        defaults["decimals"] = decimals
    if thresholds and kind == "timeseries":
        defaults["custom"] = {"thresholdsStyle": {"mode": "line+area"}}
    return {"id": pid, "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
            "gridPos": {"x": x, "y": y, "w": w, "h": h}, "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options or {}}


def _variable(name: str, label: str, query: str, *, multi: bool) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE, "query": query,
            "definition": query, "refresh": 2, "sort": 1, "multi": multi, "includeAll": multi,
            "current": {}, "options": [], "hide": 0}


def _dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]],
               variables: list[dict[str, Any]], time_from: str = "now-6h") -> dict[str, Any]:
    return {"uid": uid, "title": title, "description": description, "tags": ["bpstream"],
            "timezone": "browser", "editable": False, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
            "refresh": "30s", "time": {"from": time_from, "to": "now"},
            "templating": {"list": variables}, "annotations": {"list": []},
            "links": [{"title": "bpstream", "type": "dashboards", "tags": ["bpstream"], "asDropdown": True}],
            "panels": panels}


CLINIC_VARIABLE = _variable("clinic", "Clinic", 'SHOW TAG VALUES FROM "bp_estimate" WITH KEY = "clinic"',
                            multi=True)
BP_THRESHOLDS: Steps = [(None, "green"), (130, "yellow"), (STAGE2_SBP, "orange"),
                                                 (CRISIS_SBP, "red")]


def fleet_overview() -> dict[str, Any]:
    panels = [
        _panel(1, "stat", "Devices reporting (last 5 min)", (0, 0, 6, 4), [_target(
            'SELECT count("last") FROM (SELECT last("sqi") FROM "bp_estimate" '
            f"WHERE {CLINIC_FILTER} AND time > now() - 5m GROUP BY \"device\")")],
            description="Devices with at least one window (scored or not) in the last five minutes."),
        _panel(2, "stat", "Active alerts", (6, 0, 6, 4), [_target(
            'SELECT sum("active") FROM (SELECT last("active") AS "active" FROM "bp_alert" '
            f'WHERE {CLINIC_FILTER} AND $timeFilter GROUP BY "device", "kind")')],
            thresholds=[(None, "green"), (1, "red")],
            description="Alert episodes whose latest event in the time range is 'raised'."),
        _panel(3, "stat", "Windows scored (good quality)", (12, 0, 6, 4), [_target(
            f'SELECT mean("quality_ok") FROM "bp_estimate" WHERE {CLINIC_FILTER} AND $timeFilter')],
            unit="percentunit", decimals=1,
            thresholds=[(None, "red"), (0.6, "yellow"), (0.85, "green")]),
        _panel(4, "stat", "Dead letters", (18, 0, 6, 4), [_target(
            'SELECT sum("count") FROM "dead_letter" WHERE $timeFilter')],
            thresholds=[(None, "green"), (1, "orange")], description="Malformed input at any hop."),
        _panel(5, "table", "Latest reading per patient", (0, 4, 12, 10), [_target(
            'SELECT last("sbp") AS "SBP", last("dbp") AS "DBP", last("sqi") AS "SQI" FROM "bp_estimate" '
            f'WHERE {CLINIC_FILTER} AND $timeFilter GROUP BY "clinic", "device"', fmt="table")],
            unit="mmHg", thresholds=BP_THRESHOLDS,
            options={"showHeader": True, "sortBy": [{"displayName": "SBP", "desc": True}]}),
        _panel(6, "table", "Alert events", (12, 4, 12, 10), [_target(
            'SELECT "state", "sbp", "dbp", "n_windows", "confidence", "message" FROM "bp_alert" '
            f'WHERE {CLINIC_FILTER} AND $timeFilter GROUP BY "device", "kind", "severity"', fmt="table")],
            options={"showHeader": True, "sortBy": [{"displayName": "Time", "desc": True}]}),
        _panel(7, "timeseries", "Systolic pressure by patient", (0, 14, 24, 9), [_target(
            f'SELECT mean("sbp") FROM "bp_estimate" WHERE {CLINIC_FILTER} AND {SHOWN} AND $timeFilter '
            'GROUP BY time($__interval), "device" fill(none)', alias="$tag_device")],
            unit="mmHg", thresholds=BP_THRESHOLDS,
            description="Estimates that may be shown (withheld windows are left out; see the patient dashboard)."),
        _panel(8, "table", "Calibration per patient", (0, 23, 24, 9), [_target(
            'SELECT last("mode") AS "mode", last("calibration_age_s") / 3600 AS "calibration age (h)", '
            'sum("withheld_flag") AS "withheld windows", count("withheld_flag") AS "windows" FROM "bp_estimate" '
            f'WHERE {CLINIC_FILTER} AND $timeFilter GROUP BY "clinic", "device"', fmt="table")],
            options={"showHeader": True, "sortBy": [{"displayName": "calibration age (h)", "desc": True}]},
            description=("Each patient's latest estimate mode (calibrated on a cuff reading or uncalibrated), the "
                         "age of the calibration in use, and how many windows in the range were withheld "
                         "(poor signal, out of distribution, interval too wide, stale calibration).")),
    ]
    return _dashboard("bpstream-fleet", "bpstream / Fleet overview",
                      "Every patient of the selected clinics: latest pressures, alerts and signal quality.",
                      panels, [CLINIC_VARIABLE])


def patient_detail() -> dict[str, Any]:
    device_variable = _variable(
        "device", "Patient device",
        f'SHOW TAG VALUES FROM "bp_estimate" WITH KEY = "device" WHERE {CLINIC_FILTER}', multi=False)
    panels = [
        _panel(1, "stat", "Latest SBP / DBP", (0, 0, 8, 4), [_target(
            'SELECT last("sbp") AS "SBP", last("dbp") AS "DBP" FROM "bp_estimate" '
            f"WHERE {DEVICE_FILTER} AND $timeFilter")], unit="mmHg", thresholds=BP_THRESHOLDS),
        _panel(2, "stat", "Model version", (8, 0, 8, 4), [_target(
            f'SELECT last("model_version") FROM "bp_estimate" WHERE {DEVICE_FILTER} AND $timeFilter')],
            options={"colorMode": "none", "textMode": "value"}),
        _panel(3, "stat", "Heart rate", (16, 0, 8, 4), [_target(
            f'SELECT last("heart_rate_bpm") FROM "signal_quality" WHERE {DEVICE_FILTER} AND $timeFilter')],
            unit="bpm"),
        _panel(4, "timeseries", "Blood pressure trend", (0, 4, 24, 10), [
            _target('SELECT mean("sbp") AS "SBP", mean("dbp") AS "DBP" FROM "bp_estimate" '
                    f"WHERE {DEVICE_FILTER} AND $timeFilter GROUP BY time($__interval) fill(none)"),
            _target('SELECT mean("sbp") - 2 * mean("sbp_sd") AS "SBP low", mean("sbp") + 2 * mean("sbp_sd") '
                    f'AS "SBP high" FROM "bp_estimate" WHERE {DEVICE_FILTER} AND $timeFilter '
                    "GROUP BY time($__interval) fill(none)", ref="B")],
            unit="mmHg", thresholds=BP_THRESHOLDS,
            description="Estimates of good-quality windows; the band is +/- 2 model standard deviations."),
        _panel(5, "timeseries", "Signal quality", (0, 14, 12, 8), [_target(
            'SELECT mean("sqi_ecg") AS "ECG SQI", mean("sqi_ppg") AS "PPG SQI", mean("quality_ok") '
            f'AS "scored share" FROM "signal_quality" WHERE {DEVICE_FILTER} AND $timeFilter '
            "GROUP BY time($__interval) fill(none)")], unit="percentunit"),
        _panel(6, "timeseries", "Gaps and stream events", (12, 14, 12, 8), [
            _target('SELECT sum("missing_chunks") AS "missing chunks" FROM "signal_gap" '
                    f"WHERE {DEVICE_FILTER} AND $timeFilter GROUP BY time($__interval) fill(0)"),
            _target('SELECT sum("count") FROM "stream_event" '
                    f'WHERE {DEVICE_FILTER} AND $timeFilter GROUP BY time($__interval), "kind" fill(0)',
                    ref="B", alias="$tag_kind")],
            options={"legend": {"displayMode": "table", "placement": "right"}}),
        _panel(7, "table", "Alerts", (0, 22, 24, 8), [_target(
            'SELECT "state", "sbp", "dbp", "n_windows", "confidence", "basis", "mode", "message" FROM "bp_alert" '
            f'WHERE {DEVICE_FILTER} AND $timeFilter GROUP BY "kind", "severity"', fmt="table")],
            options={"showHeader": True, "sortBy": [{"displayName": "Time", "desc": True}]},
            description="Each episode is raised once and resolved once (same alert_id), with its evidence."),
        _panel(8, "stat", "Estimate mode", (0, 30, 8, 4), [_target(
            f'SELECT last("mode") FROM "bp_estimate" WHERE {DEVICE_FILTER} AND $timeFilter')],
            options={"colorMode": "none", "textMode": "value"},
            description=("calibrated: tracks change from the patient's cuff reading; uncalibrated: shown as a "
                         "category with its (wide) interval only.")),
        _panel(9, "stat", "Calibration age", (8, 30, 8, 4), [_target(
            f'SELECT last("calibration_age_s") FROM "bp_estimate" WHERE {DEVICE_FILTER} AND $timeFilter')],
            unit="s", thresholds=[(None, "green"), (CALIBRATION_DUE_S * 0.75, "yellow"), (CALIBRATION_DUE_S, "red")],
            description="Time since the cuff reading the current calibration rests on (no value: never enrolled)."),
        _panel(10, "stat", "Cuff readings", (16, 30, 8, 4), [_target(
            'SELECT last("sbp") AS "cuff SBP", last("dbp") AS "cuff DBP", count("sbp") AS "readings" '
            f'FROM "bp_cuff" WHERE {DEVICE_FILTER} AND $timeFilter')], unit="none",
            description="The latest cuff reading (enrolment or re-calibration) and how many in the range."),
        _panel(11, "timeseries", "Estimate with its 90% interval", (0, 34, 24, 10), [
            _target('SELECT mean("sbp") AS "SBP", mean("dbp") AS "DBP" FROM "bp_estimate" '
                    f"WHERE {DEVICE_FILTER} AND {SHOWN} AND $timeFilter GROUP BY time($__interval) fill(none)"),
            _target('SELECT mean("sbp_lo") AS "SBP 90% low", mean("sbp_hi") AS "SBP 90% high", '
                    'mean("dbp_lo") AS "DBP 90% low", mean("dbp_hi") AS "DBP 90% high" FROM "bp_estimate" '
                    f"WHERE {DEVICE_FILTER} AND {SHOWN} AND $timeFilter GROUP BY time($__interval) fill(none)",
                    ref="B"),
            _target('SELECT mean("calibrated") AS "calibrated share" FROM "bp_estimate" '
                    f"WHERE {DEVICE_FILTER} AND $timeFilter GROUP BY time($__interval) fill(none)", ref="C")],
            unit="mmHg", thresholds=BP_THRESHOLDS,
            description=("Estimates that may be shown, with the served 90% interval (calibrated: the conformal "
                         "half-width of a change from the cuff; uncalibrated: wide, read it as a category) and "
                         "the share of windows in calibrated mode (0..1).")),
        _panel(12, "timeseries", "Withheld windows by reason", (0, 44, 12, 8), [_target(
            'SELECT count("withheld_flag") FROM "bp_estimate" '
            f'WHERE {DEVICE_FILTER} AND "withheld_flag" = 1 AND $timeFilter '
            'GROUP BY time($__interval) fill(0)', alias="withheld windows"),
            _target('SELECT count("withheld_flag") FROM "bp_estimate" '
                    f'WHERE {DEVICE_FILTER} AND "withheld_flag" = 0 AND $timeFilter '
                    'GROUP BY time($__interval) fill(0)', ref="B", alias="shown windows")],
            description="Windows stored but not shown nor alerted on, against the windows shown."),
        _panel(13, "table", "Withheld windows (latest)", (12, 44, 12, 8), [_target(
            'SELECT "withheld" AS "reason", "mode", "calibration_age_s" FROM "bp_estimate" '
            f'WHERE {DEVICE_FILTER} AND "withheld_flag" = 1 AND $timeFilter ORDER BY time DESC LIMIT 200',
            fmt="table")],
            options={"showHeader": True},
            description="The latest withheld windows with their reason (signal_quality, out_of_distribution, "
                        "interval_too_wide, calibration_stale)."),
    ]
    return _dashboard("bpstream-patient", "bpstream / Patient detail",
                      "One patient's pressure trend with its uncertainty, signal quality, gaps and alerts.",
                      panels, [CLINIC_VARIABLE, device_variable], time_from="now-3h")


def pipeline_health() -> dict[str, Any]:
    panels = [
        _panel(1, "timeseries", "Estimates per second", (0, 0, 12, 8), [_target(
            'SELECT count("sqi") * 1000 / $__interval_ms AS "windows/s" FROM "bp_estimate" '
            "WHERE $timeFilter GROUP BY time($__interval) fill(0)")], unit="reqps",
            description="Windows estimated per second across the fleet (scored or not)."),
        _panel(2, "timeseries", "Writer throughput", (12, 0, 12, 8), [_target(
            'SELECT mean("rate_per_s") FROM "pipeline" WHERE "service" = \'bpstream-writer\' AND $timeFilter '
            'GROUP BY time($__interval), "instance" fill(none)', alias="$tag_instance")], unit="reqps"),
        _panel(3, "timeseries", "Consumer lag by group", (0, 8, 12, 8), [_target(
            'SELECT max("consumer_lag") FROM "pipeline" WHERE $timeFilter '
            'GROUP BY time($__interval), "service" fill(none)', alias="$tag_service")],
            thresholds=[(None, "green"), (LAG_MESSAGES, "red")],
            description="Messages each consumer group is behind (end offset minus committed offset)."),
        _panel(4, "timeseries", "End-to-end latency", (12, 8, 12, 8), [_target(
            'SELECT percentile("latency_ms", 50) AS "p50", percentile("latency_ms", 95) AS "p95", '
            'percentile("stored_latency_ms", 95) AS "p95 stored" FROM "bp_estimate" WHERE $timeFilter '
            "GROUP BY time($__interval) fill(none)")], unit="ms",
            description="Bridge receipt of the newest chunk -> estimate (and -> stored in InfluxDB)."),
        _panel(5, "timeseries", "Dead letters per minute", (0, 16, 12, 8), [_target(
            'SELECT sum("count") * 60000 / $__interval_ms FROM "dead_letter" WHERE $timeFilter '
            'GROUP BY time($__interval), "stage", "reason" fill(0)', alias="$tag_stage: $tag_reason")],
            unit="short"),
        _panel(6, "table", "Dead letters by stage and reason", (12, 16, 12, 8), [_target(
            'SELECT sum("count") AS "records" FROM "dead_letter" WHERE $timeFilter '
            'GROUP BY "stage", "reason"', fmt="table")]),
        _panel(8, "timeseries", "Notification attempts", (0, 31, 12, 8), [_target(
            'SELECT sum("count") FROM "bp_notification" WHERE $timeFilter '
            'GROUP BY time($__interval), "channel", "outcome" fill(0)', alias="$tag_channel: $tag_outcome")],
            unit="short", description="Every delivery attempt of the notifier (webhook, e-mail, escalation)."),
        _panel(9, "table", "Notifications", (12, 31, 12, 8), [_target(
            'SELECT "alert_id", "kind", "attempt", "target", "reason", "status" FROM "bp_notification" '
            'WHERE $timeFilter GROUP BY "transition", "channel", "outcome"', fmt="table")],
            description="Who was told what: one row per attempt, newest last."),
        _panel(7, "timeseries", "Writer lag", (0, 24, 24, 7), [_target(
            'SELECT mean("lag_ms") FROM "pipeline" WHERE "service" = \'bpstream-writer\' AND $timeFilter '
            "GROUP BY time($__interval) fill(none)")], unit="ms",
            description="Time since the newest record the writer stored was received by the bridge."),
    ]
    return _dashboard("bpstream-pipeline", "bpstream / Pipeline health",
                      "Throughput, consumer lag, latency and dead letters of the streaming pipeline.",
                      panels, [], time_from="now-1h")


DASHBOARDS = {"fleet-overview.json": fleet_overview, "patient-detail.json": patient_detail,
              "pipeline-health.json": pipeline_health}


# ---------------------------------------------------------------------------------------------- alerting
def _query(ref: str, query: str, seconds: int) -> dict[str, Any]:
    return {"refId": ref, "relativeTimeRange": {"from": seconds, "to": 0}, "datasourceUid": DATASOURCE_UID,
            "model": {"refId": ref, "datasource": DATASOURCE, "query": query, "rawQuery": True,
                      "resultFormat": "time_series", "intervalMs": 1000, "maxDataPoints": 43200}}


def _reduce(ref: str, source: str, reducer: str) -> dict[str, Any]:
    return {"refId": ref, "relativeTimeRange": {"from": 0, "to": 0}, "datasourceUid": "__expr__",
            "model": {"refId": ref, "type": "reduce", "expression": source, "reducer": reducer,
                      "settings": {"mode": "dropNN"}, "datasource": {"type": "__expr__", "uid": "__expr__"}}}


def _math(ref: str, expression: str) -> dict[str, Any]:
    return {"refId": ref, "relativeTimeRange": {"from": 0, "to": 0}, "datasourceUid": "__expr__",
            "model": {"refId": ref, "type": "math", "expression": expression,
                      "datasource": {"type": "__expr__", "uid": "__expr__"}}}


def _threshold(ref: str, source: str, op: str, value: float) -> dict[str, Any]:
    return {"refId": ref, "relativeTimeRange": {"from": 0, "to": 0}, "datasourceUid": "__expr__",
            "model": {"refId": ref, "type": "threshold", "expression": source,
                      "conditions": [{"evaluator": {"type": op, "params": [value]}}],
                      "datasource": {"type": "__expr__", "uid": "__expr__"}}}


def _rule(uid: str, title: str, condition: str, data: list[dict[str, Any]], *, pending: str,
          labels: dict[str, str], summary: str, description: str, dashboard: str) -> dict[str, Any]:
    return {"uid": uid, "title": title, "condition": condition, "data": data, "noDataState": "OK",
            "execErrState": "Error", "for": pending, "isPaused": False, "labels": labels,
            "annotations": {"summary": summary, "description": description,
                            "__dashboardUid__": dashboard, "runbook_url": "docs/DEPLOY.md#alerts"}}


def _per_device(field: str, aggregate: str, bucket: str, *, calibrated_only: bool = False) -> str:
    # Only scored windows carry pressures; quality_ok keeps an unscored window out explicitly, and withheld
    # estimates (poor evidence) are never alerted on. Stage 2 needs calibrated estimates (issue 12).
    mode = ' AND "calibrated" = 1' if calibrated_only else ""
    return (f'SELECT {aggregate}("{field}") FROM "bp_estimate" WHERE "quality_ok" = 1 AND {SHOWN}{mode} '
            f'AND $timeFilter GROUP BY time({bucket}), "clinic", "device" fill(none)')


def _episode_rule(severity: str) -> dict[str, Any]:
    """An alerting-service episode that is open (its last bp_alert point is a raise): a backstop to the
    notifier, which delivers each transition once (docs/SERVING.md)."""
    return _rule(f"bpstream-alert-episode-{severity}", f"Alert episode open ({severity})", "C", [
        _query("A", 'SELECT last("active") FROM "bp_alert" WHERE "severity" = \'' + severity + '\' AND $timeFilter '
                    'GROUP BY "clinic", "device", "kind"', EPISODE_LOOKBACK_S),
        _reduce("B", "A", "last"), _threshold("C", "B", "gt", 0.5)],
        pending="0s", labels={"severity": severity, "team": "clinical", "source": "bp_alert"},
        summary="{{ $labels.kind }} alert open: device {{ $labels.device }} (clinic {{ $labels.clinic }})",
        description=("The alerting service raised a " + severity + " {{ $labels.kind }} episode for this "
                     "patient and has not resolved it. Acknowledge with `bpstream alerts ack ID` "
                     "(`bpstream alerts list` shows the id)."),
        dashboard="bpstream-patient")


def alert_rules() -> dict[str, Any]:
    clinical = [
        _rule("bpstream-hypertensive-crisis", "Hypertensive crisis", "E", [
            _query("A", _per_device("sbp", "mean", "1m"), 300),
            _query("B", _per_device("dbp", "mean", "1m"), 300),
            _reduce("C", "A", "last"), _reduce("D", "B", "last"),
            _math("E", f"$C > {CRISIS_SBP} || $D > {CRISIS_DBP}")],
            pending="2m", labels={"severity": "critical", "team": "clinical", "kind": "crisis"},
            summary="Hypertensive crisis: device {{ $labels.device }} (clinic {{ $labels.clinic }})",
            description=("Last minute's mean estimate is SBP {{ humanize $values.C.Value }} / DBP "
                         "{{ humanize $values.D.Value }} mmHg (crisis: SBP > 180 and/or DBP > 120) and has "
                         "stayed there for 2 minutes."),
            dashboard="bpstream-patient"),
        _rule("bpstream-sustained-stage2", "Sustained stage 2 hypertension", "E", [
            _query("A", _per_device("sbp", "mean", "5m", calibrated_only=True), 1800),
            _query("B", _per_device("dbp", "mean", "5m", calibrated_only=True), 1800),
            _reduce("C", "A", "mean"), _reduce("D", "B", "mean"),
            _math("E", f"$C >= {STAGE2_SBP} || $D >= {STAGE2_DBP}")],
            pending="10m", labels={"severity": "warning", "team": "clinical", "kind": "stage2"},
            summary="Sustained stage 2 hypertension: device {{ $labels.device }}",
            description=("Mean over 30 minutes of calibrated estimates SBP {{ humanize $values.C.Value }} / DBP "
                         "{{ humanize $values.D.Value }} mmHg (stage 2: SBP >= 140 or DBP >= 90)."),
            dashboard="bpstream-patient"),
        _rule("bpstream-device-silent", "Device silent", "C", [
            # Windows per minute, averaged over the last three one-minute buckets; fill(0) gives the minutes
            # after a device's last window a zero, so a device that stops drops to 0 within three minutes.
            _query("A", f'SELECT moving_average(count("sqi"), {SILENT_MINUTES}) FROM "bp_estimate" '
                        'WHERE $timeFilter GROUP BY time(1m), "clinic", "device" fill(0)', 3600),
            _reduce("B", "A", "last"), _threshold("C", "B", "lt", 0.5)],
            pending="1m", labels={"severity": "warning", "team": "clinical", "kind": "device_silent"},
            summary="No data from device {{ $labels.device }} (clinic {{ $labels.clinic }})",
            description=("The device sent no window for at least 3 minutes after sending within the last "
                         "hour: check the wearable, its battery and the clinic's gateway."),
            dashboard="bpstream-patient"),
        *(_episode_rule(severity) for severity in ("critical", "warning")),
        _rule("bpstream-calibration-due", "Calibration due", "C", [
            # The latest calibration_due event of each device in the last 7 days: 1 raised, 0 resolved. The
            # alerting service raises it when inference withholds an estimate for a stale calibration
            # (CALIBRATION_MAX_AGE_S, 24 h) and resolves it when a new calibration is in use.
            _query("A", 'SELECT last("active") FROM "bp_alert" WHERE "kind" = \'calibration_due\' AND $timeFilter '
                        'GROUP BY "clinic", "device"', CALIBRATION_DUE_LOOKBACK_S),
            _reduce("B", "A", "last"), _threshold("C", "B", "gt", 0.5)],
            pending="0s", labels={"severity": "info", "team": "clinical", "kind": "calibration_due"},
            summary="Calibration due: device {{ $labels.device }} (clinic {{ $labels.clinic }})",
            description=("The patient's cuff calibration expired: estimates are withheld until a new cuff "
                         "reading is taken (bpstream calibrate or the clinic's cuff)."),
            dashboard="bpstream-patient"),
    ]
    pipeline = [
        _rule("bpstream-pipeline-lag", "Pipeline consumer lag too high", "C", [
            _query("A", 'SELECT max("consumer_lag") FROM "pipeline" WHERE $timeFilter '
                        'GROUP BY time(1m), "service" fill(none)', 300),
            _reduce("B", "A", "mean"), _threshold("C", "B", "gt", LAG_MESSAGES)],
            pending="5m", labels={"severity": "warning", "team": "operations"},
            summary="{{ $labels.service }} is {{ humanize $values.B.Value }} messages behind",
            description=("Consumer group lag averaged over 5 minutes exceeds 10000 messages: scale the stage "
                         "(KEDA does it up to the partition count) or look for a stuck consumer."),
            dashboard="bpstream-pipeline"),
        _rule("bpstream-dead-letter-rate", "Dead-letter rate", "C", [
            _query("A", 'SELECT sum("count") FROM "dead_letter" WHERE $timeFilter GROUP BY "stage"', 600),
            _reduce("B", "A", "sum"), _threshold("C", "B", "gt", DLQ_PER_10_MIN)],
            pending="0s", labels={"severity": "warning", "team": "operations"},
            summary="{{ humanize $values.B.Value }} dead letters at {{ $labels.stage }} in 10 minutes",
            description=("More than 10 records in 10 minutes went to signals.dlq: see the reasons on the "
                         "pipeline health dashboard."),
            dashboard="bpstream-pipeline"),
        _rule("bpstream-notification-failing", "Notification delivery failing", "C", [
            _query("A", 'SELECT sum("count") FROM "bp_notification" WHERE "outcome" != \'delivered\' '
                        'AND $timeFilter GROUP BY "channel"', 600),
            _reduce("B", "A", "sum"), _threshold("C", "B", "gt", NOTIFY_FAILURES_PER_10_MIN)],
            pending="0s", labels={"severity": "warning", "team": "operations"},
            summary="{{ humanize $values.B.Value }} failed notification attempts on {{ $labels.channel }}",
            description=("The notifier could not reach the {{ $labels.channel }} receiver in the last 10 "
                         "minutes (it keeps retrying; refused deliveries are given up): see Notifications "
                         "on the pipeline health dashboard."),
            dashboard="bpstream-pipeline"),
    ]
    return {"apiVersion": 1, "groups": [
        {"orgId": 1, "name": "bpstream-clinical", "folder": FOLDER, "interval": "1m", "rules": clinical},
        {"orgId": 1, "name": "bpstream-pipeline", "folder": FOLDER, "interval": "1m", "rules": pipeline}]}


def contact_points() -> dict[str, Any]:
    message = '{{ template "bpstream.message" . }}'
    return {"apiVersion": 1, "contactPoints": [
        {"orgId": 1, "name": "bpstream-clinicians", "receivers": [
            {"uid": "bpstream-clinicians-email", "type": "email", "disableResolveMessage": False,
             "settings": {"addresses": "${BPSTREAM_ALERT_EMAIL}", "singleEmail": False,
                          "subject": '{{ template "bpstream.subject" . }}', "message": message}},
            {"uid": "bpstream-clinicians-webhook", "type": "webhook", "disableResolveMessage": False,
             "settings": {"url": "${BPSTREAM_ALERT_WEBHOOK_URL}", "httpMethod": "POST",
                          "title": '{{ template "bpstream.subject" . }}', "message": message}}]},
        {"orgId": 1, "name": "bpstream-operators", "receivers": [
            {"uid": "bpstream-operators-email", "type": "email", "disableResolveMessage": False,
             "settings": {"addresses": "${BPSTREAM_OPS_EMAIL}", "singleEmail": True,
                          "subject": '{{ template "bpstream.subject" . }}', "message": message}}]}]}


def notification_policies() -> dict[str, Any]:
    return {"apiVersion": 1, "policies": [{
        "orgId": 1, "receiver": "bpstream-operators", "group_by": ["grafana_folder", "alertname"],
        "group_wait": "30s", "group_interval": "5m", "repeat_interval": "4h",
        "routes": [
            # A crisis is paged at once and repeated every 15 minutes while it lasts, one notification per
            # patient (grouped by device) so that two patients' crises never hide each other.
            {"receiver": "bpstream-clinicians", "object_matchers": [["team", "=", "clinical"],
                                                                     ["severity", "=", "critical"]],
             "group_by": ["alertname", "clinic", "device"], "group_wait": "0s", "group_interval": "1m",
             "repeat_interval": "15m", "continue": False},
            {"receiver": "bpstream-clinicians", "object_matchers": [["team", "=", "clinical"]],
             "group_by": ["alertname", "clinic", "device"], "group_wait": "30s", "group_interval": "5m",
             "repeat_interval": "2h", "continue": False},
            {"receiver": "bpstream-operators", "object_matchers": [["team", "=", "operations"]],
             "group_by": ["alertname", "service", "stage"], "repeat_interval": "1h"}]}]}


NOTIFICATION_TEMPLATE = """\
{{ define "bpstream.subject" -}}
[{{ .Status | toUpper }}{{ if eq .Status "firing" }}:{{ .Alerts.Firing | len }}{{ end }}]
{{- " " }}{{ .CommonLabels.alertname }}
{{- if .CommonLabels.device }} - device {{ .CommonLabels.device }}{{ end }}
{{- end }}

{{ define "bpstream.message" -}}
{{ range .Alerts -}}
{{ .Status | toUpper }}: {{ .Annotations.summary }}
{{ .Annotations.description }}
Since: {{ .StartsAt.Format "2006-01-02 15:04:05 MST" }}
{{- if .Labels.clinic }}
Clinic: {{ .Labels.clinic }}{{ end }}
{{- if .Labels.device }}
Device: {{ .Labels.device }}{{ end }}
{{- if .DashboardURL }}
Dashboard: {{ .DashboardURL }}{{ end }}

{{ end -}}
{{- end }}
"""


def templates() -> dict[str, Any]:
    return {"apiVersion": 1,
            "templates": [{"orgId": 1, "name": "bpstream", "template": NOTIFICATION_TEMPLATE}]}


#: Where Grafana finds the CA of InfluxDB's certificate (docker-compose mounts ${BPSTREAM_PKI_DIR}/ca.crt here).
GRAFANA_CA_FILE = "/etc/grafana/pki/ca.crt"


def datasource() -> dict[str, Any]:
    return {"apiVersion": 1, "datasources": [{
        "name": "bpstream InfluxDB", "uid": DATASOURCE_UID, "type": "influxdb", "access": "proxy",
        "url": "${BPSTREAM_INFLUX_URL}", "user": "${BPSTREAM_INFLUX_READ_USERNAME}", "isDefault": True,
        "editable": False,
        # HTTPS, verified against the deployment's CA (mounted at GRAFANA_CA_FILE; Grafana reads $__file{})
        "jsonData": {"version": "InfluxQL", "dbName": "${BPSTREAM_INFLUX_DATABASE}", "httpMode": "POST",
                     "timeInterval": "2s", "tlsAuthWithCACert": True, "tlsSkipVerify": False},
        "secureJsonData": {"password": "${BPSTREAM_INFLUX_READ_PASSWORD}",
                           "tlsCACert": "$__file{" + GRAFANA_CA_FILE + "}"}}]}


def dashboard_provider() -> dict[str, Any]:
    return {"apiVersion": 1, "providers": [{
        "name": "bpstream", "orgId": 1, "folder": FOLDER, "type": "file", "disableDeletion": True,
        "allowUiUpdates": False, "updateIntervalSeconds": 60,
        "options": {"path": "/var/lib/grafana/dashboards/bpstream", "foldersFromFilesStructure": False}}]}


class _NoAliases(yaml.SafeDumper):
    """Write repeated values out in full: a reader of the file should not meet YAML anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _block_strings(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line strings (the notification template) as literal blocks, the way a person writes them.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_NoAliases.add_representer(str, _block_strings)


def _yaml(data: dict[str, Any], header: str) -> str:
    body = yaml.dump(data, Dumper=_NoAliases, sort_keys=False, width=110, allow_unicode=True)
    return f"# {header}\n# Generated by deploy/grafana/generate.py: edit that script, not this file.\n{body}"


def rendered() -> dict[Path, str]:
    """Every provisioning file, by path, as the generator writes it."""
    provisioning = HERE / "provisioning"
    files = {
        provisioning / "datasources" / "influxdb.yaml": _yaml(
            datasource(), "InfluxDB 1.13.1 (the influxdb:1.13.1 image), InfluxQL over /query with the read user.\n"
            "# Flux would need flux-enabled on the server, which the deployed InfluxDB 1.x leaves off."),
        provisioning / "dashboards" / "bpstream.yaml": _yaml(dashboard_provider(), "Dashboards from files."),
        provisioning / "alerting" / "rules.yaml": _yaml(alert_rules(), "Unified alerting rules."),
        provisioning / "alerting" / "contact-points.yaml": _yaml(contact_points(), "Contact points."),
        provisioning / "alerting" / "notification-policies.yaml": _yaml(
            notification_policies(), "Notification policy tree."),
        provisioning / "alerting" / "templates.yaml": _yaml(templates(), "Notification message templates."),
    }
    for name, build in DASHBOARDS.items():
        files[HERE / "dashboards" / name] = json.dumps(build(), indent=2) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if a committed file differs")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"out of date: {path.relative_to(HERE.parents[1])}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
