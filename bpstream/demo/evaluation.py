"""Scoring a simulated run against the simulator's ground truth: per-patient calibration, interval and alert
scorecards, and the clinic-wide alert metrics (false stage alerts per patient-hour, false crisis alerts per
patient-day, crisis sensitivity).

Pure functions over what InfluxDB stored (rows of ``bp_estimate`` and ``bp_alert``) and a ``FleetTruth``:
``bpstream demo`` uses them for its report, the unit tests on hand-made rows.

Definitions (the report repeats them):

* **true category** of a span: the ACC/AHA category (``bp_category``) of the mean true SBP/DBP of the beats in
  each 8 s window (2 s hop) of the span; a patient's *typical* category is that of the median window, its
  *peak* category the highest any window reached.
* **alert category**: ``crisis`` for crisis, ``stage2`` for stage 2, the category of the alert's own pressures
  for a deviation; hypotension and the info kinds (``calibration_due``, ``cuff_confirmation``) rank below.
* an alert is **above the truth** (a false alert) when no true window in its evidence span reached its
  category: the span is ``first_window_ns - 8 s .. event`` for alerts on estimates and the cuff's measurement
  span (10 s before the reading) for alerts on a cuff reading. Lenient to the alert by design.
* **crisis sensitivity**: of the patients whose true pressure reached crisis, the share with a crisis alert
  raised at or after the first true crisis window (latency = alert time - that window's end).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bpstream.shared.anomaly import CATEGORIES, bp_category
from bpstream.simulators.fleet import CUFF_SPAN_S, FleetTruth

NS = 1_000_000_000
WINDOW_NS = 8 * NS
HOP_NS = 2 * NS
#: Rank of each category; hypotension and info kinds rank below normal (never "above" anything).
RANK: dict[str, int] = {name: i for i, name in enumerate(CATEGORIES)}
CLINICAL_KINDS = ("crisis", "stage2", "deviation", "hypotension")


def window_truth(truth: FleetTruth, device: str, ends_ns: np.ndarray, window_ns: int = WINDOW_NS,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Mean true SBP/DBP of the beats in each window ``(end - window_ns, end]`` (NaN where no beat)."""
    t, sbp, dbp = truth.beats(device)
    ends = np.asarray(ends_ns, dtype=np.int64)
    if not len(t) or not len(ends):
        return np.full(len(ends), np.nan), np.full(len(ends), np.nan)
    order = np.argsort(t, kind="stable")
    t, sbp, dbp = t[order], sbp[order], dbp[order]
    hi = np.searchsorted(t, ends, side="right")
    lo = np.searchsorted(t, ends - window_ns, side="right")
    cs = np.concatenate([[0.0], np.cumsum(sbp)])
    cd = np.concatenate([[0.0], np.cumsum(dbp)])
    n = (hi - lo).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (cs[hi] - cs[lo]) / n, (cd[hi] - cd[lo]) / n


def _categories(sbp: np.ndarray, dbp: np.ndarray) -> list[str]:
    return [bp_category(float(s), float(d)) for s, d in zip(sbp, dbp, strict=True)
            if math.isfinite(s) and math.isfinite(d)]


def truth_grid(truth: FleetTruth, device: str) -> np.ndarray:
    """Window ends every 2 s over the device's beats (the processor's grid, near enough for scoring)."""
    t, _, _ = truth.beats(device)
    if not len(t):
        return np.zeros(0, dtype=np.int64)
    return np.arange(int(t.min()) + WINDOW_NS, int(t.max()) + 1, HOP_NS, dtype=np.int64)


def peak_category(truth: FleetTruth, device: str, start_ns: int, end_ns: int) -> str | None:
    """Highest true category of any 8 s window ending in ``[start_ns + 8 s, end_ns]`` (at least one window)."""
    ends = np.arange(min(start_ns + WINDOW_NS, end_ns), end_ns + 1, HOP_NS, dtype=np.int64)
    if not len(ends) or ends[-1] != end_ns:
        ends = np.append(ends, np.int64(end_ns))
    cats = _categories(*window_truth(truth, device, ends))
    return max(cats, key=RANK.__getitem__) if cats else None


def alert_category(alert: Mapping[str, Any]) -> str | None:
    """The ACC/AHA category an alert claims (None for hypotension and info kinds)."""
    kind = str(alert.get("kind"))
    if kind == "crisis":
        return "crisis"
    if kind == "stage2":
        return "stage2"
    if kind == "deviation" and alert.get("sbp") is not None and alert.get("dbp") is not None:
        return bp_category(float(alert["sbp"]), float(alert["dbp"]))
    return None


def evidence_span(alert: Mapping[str, Any]) -> tuple[int, int]:
    event = int(alert["time"])
    if alert.get("basis") == "cuff":
        return event - round(CUFF_SPAN_S * NS), event
    first = alert.get("first_window_ns")
    start = int(first) - WINDOW_NS if first is not None else event - WINDOW_NS
    return min(start, event - WINDOW_NS), event


@dataclass(slots=True)
class AlertCheck:
    device: str
    kind: str
    basis: str
    time_ns: int
    category: str
    true_category: str | None
    above_truth: bool


def check_alerts(truth: FleetTruth, device: str, alerts: Sequence[Mapping[str, Any]]) -> list[AlertCheck]:
    """Every raised clinical alert of a device, with the truth over its evidence span."""
    out = []
    for alert in sorted(alerts, key=lambda a: int(a["time"])):
        if alert.get("state") != "raised":
            continue
        category = alert_category(alert)
        if category is None:
            continue
        start, end = evidence_span(alert)
        true = peak_category(truth, device, start, end)
        above = true is None or RANK[category] > RANK[true]
        out.append(AlertCheck(device, str(alert["kind"]), str(alert.get("basis") or "estimates"), int(alert["time"]),
                              category, true, above))
    return out


@dataclass(slots=True)
class Scorecard:
    """One patient's run: truth, alerts, calibration, error, interval coverage, withheld windows."""

    device: str
    scenario: str
    typical_category: str | None
    peak_category: str | None
    alerted_category: str | None
    alerts_above_truth: int
    alerts: list[str]
    cuff_readings: int
    windows: int
    scored: int
    calibrated: int
    #: SBP/DBP MAE of the shown estimate on calibrated, not withheld windows, and of the model's raw
    #: (calibration-free) output on the same windows; and of the raw output on every scored window.
    sbp_mae_calibrated: float
    sbp_mae_uncal_same: float
    dbp_mae_calibrated: float
    dbp_mae_uncal_same: float
    sbp_mae_uncalibrated: float
    #: Share of windows whose true SBP lies in the served 90% interval, by mode.
    coverage_calibrated: float
    coverage_uncalibrated: float
    withheld: dict[str, int] = field(default_factory=dict)
    crisis_onset_ns: int | None = None
    crisis_alert_ns: int | None = None


def _f(row: Mapping[str, Any], key: str) -> float:
    value = row.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.mean(np.abs(a[ok] - b[ok]))) if ok.any() else math.nan


def _coverage(lo: np.ndarray, hi: np.ndarray, true: np.ndarray, mask: np.ndarray) -> float:
    ok = mask & np.isfinite(lo) & np.isfinite(hi) & np.isfinite(true)
    return float(np.mean((true[ok] >= lo[ok]) & (true[ok] <= hi[ok]))) if ok.any() else math.nan


def scorecard(device: str, scenario: str, rows: Sequence[Mapping[str, Any]], alerts: Sequence[Mapping[str, Any]],
              truth: FleetTruth) -> Scorecard:
    rows = sorted(rows, key=lambda r: int(r["time"]))
    ends = np.array([int(r["time"]) for r in rows], dtype=np.int64)
    true_sbp, true_dbp = window_truth(truth, device, ends)
    sbp, dbp = np.array([_f(r, "sbp") for r in rows]), np.array([_f(r, "dbp") for r in rows])
    raw_sbp, raw_dbp = np.array([_f(r, "raw_sbp") for r in rows]), np.array([_f(r, "raw_dbp") for r in rows])
    lo, hi = np.array([_f(r, "sbp_lo") for r in rows]), np.array([_f(r, "sbp_hi") for r in rows])
    scored = np.isfinite(sbp)
    withheld_reason = [r.get("withheld") for r in rows]
    shown = scored & np.array([w is None for w in withheld_reason], dtype=bool)
    calibrated = np.array([r.get("mode") == "calibrated" for r in rows], dtype=bool)
    cal_shown = shown & calibrated
    withheld: dict[str, int] = {}
    for reason in withheld_reason:
        if reason:
            withheld[str(reason)] = withheld.get(str(reason), 0) + 1

    grid = truth_grid(truth, device)
    grid_sbp, grid_dbp = window_truth(truth, device, grid)
    cats = _categories(grid_sbp, grid_dbp)
    typical = None
    if cats:
        ok = np.isfinite(grid_sbp) & np.isfinite(grid_dbp)
        typical = bp_category(float(np.median(grid_sbp[ok])), float(np.median(grid_dbp[ok])))
    peak = max(cats, key=RANK.__getitem__) if cats else None
    crisis_onset = None
    in_crisis = [i for i, (s, d) in enumerate(zip(grid_sbp, grid_dbp, strict=True))
                 if math.isfinite(s) and bp_category(float(s), float(d)) == "crisis"]
    if in_crisis:
        crisis_onset = int(grid[in_crisis[0]])
    checks = check_alerts(truth, device, alerts)
    alerted = max((c.category for c in checks), key=RANK.__getitem__, default=None)
    crisis_alert = None
    if crisis_onset is not None:
        # a crisis alert whose evidence reaches the true crisis (raised at or after its onset window)
        later = [c.time_ns for c in checks if c.kind == "crisis" and c.time_ns >= crisis_onset - WINDOW_NS]
        crisis_alert = min(later) if later else None
    described = [f"{a['kind']} {a['state']}" + (" (cuff)" if a.get("basis") == "cuff" else "")
                 for a in sorted(alerts, key=lambda a: int(a["time"]))]
    cuffs = sum(1 for c in truth.cuffs if c.device_id == device)
    return Scorecard(
        device=device, scenario=scenario, typical_category=typical, peak_category=peak, alerted_category=alerted,
        alerts_above_truth=sum(c.above_truth for c in checks), alerts=described, cuff_readings=cuffs,
        windows=len(rows), scored=int(scored.sum()), calibrated=int((calibrated & scored).sum()),
        sbp_mae_calibrated=_mae(sbp[cal_shown], true_sbp[cal_shown]),
        sbp_mae_uncal_same=_mae(raw_sbp[cal_shown], true_sbp[cal_shown]),
        dbp_mae_calibrated=_mae(dbp[cal_shown], true_dbp[cal_shown]),
        dbp_mae_uncal_same=_mae(raw_dbp[cal_shown], true_dbp[cal_shown]),
        sbp_mae_uncalibrated=_mae(raw_sbp[scored], true_sbp[scored]),
        coverage_calibrated=_coverage(lo, hi, true_sbp, shown & calibrated),
        coverage_uncalibrated=_coverage(lo, hi, true_sbp, scored & ~calibrated),
        withheld=withheld, crisis_onset_ns=crisis_onset, crisis_alert_ns=crisis_alert)


@dataclass(slots=True)
class AlertMetrics:
    """Clinic-wide alert performance of one arm of a run (enrolled or never calibrated)."""

    arm: str
    patients: int
    patient_hours: float
    stage_alerts: int
    false_stage_alerts: int
    false_stage_per_patient_hour: float
    crisis_alerts: int
    false_crisis_alerts: int
    false_crisis_per_patient_day: float
    crisis_patients: int
    crisis_detected: int
    crisis_sensitivity: float
    crisis_latency_s_median: float
    alerts_above_truth: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def alert_metrics(arm: str, truth: FleetTruth, alerts_by_device: Mapping[str, Sequence[Mapping[str, Any]]],
                  devices: Sequence[str], duration_s: float) -> AlertMetrics:
    checks = [c for d in devices for c in check_alerts(truth, d, alerts_by_device.get(d, ()))]
    hours = len(devices) * duration_s / 3600.0
    stage = [c for c in checks if c.kind == "stage2"]
    crisis = [c for c in checks if c.kind == "crisis"]
    onsets: dict[str, int] = {}
    for d in devices:
        grid = truth_grid(truth, d)
        s, dia = window_truth(truth, d, grid)
        hit = [int(grid[i]) for i in range(len(grid))
               if math.isfinite(s[i]) and bp_category(float(s[i]), float(dia[i])) == "crisis"]
        if hit:
            onsets[d] = hit[0]
    latencies = []
    for d, onset in onsets.items():
        times = [c.time_ns for c in crisis if c.device == d and c.time_ns >= onset - WINDOW_NS]
        if times:
            latencies.append((min(times) - onset) / NS)
    false_stage = sum(c.above_truth for c in stage)
    false_crisis = sum(c.above_truth for c in crisis)
    return AlertMetrics(
        arm=arm, patients=len(devices), patient_hours=round(hours, 3), stage_alerts=len(stage),
        false_stage_alerts=false_stage, false_stage_per_patient_hour=false_stage / hours if hours else math.nan,
        crisis_alerts=len(crisis), false_crisis_alerts=false_crisis,
        false_crisis_per_patient_day=false_crisis / (hours / 24.0) if hours else math.nan,
        crisis_patients=len(onsets), crisis_detected=len(latencies),
        crisis_sensitivity=len(latencies) / len(onsets) if onsets else math.nan,
        crisis_latency_s_median=float(np.median(latencies)) if latencies else math.nan,
        alerts_above_truth=sum(c.above_truth for c in checks))
