"""The demo's scoring against ground truth: window truth, alerts above the true category, per-patient
calibration scorecards and the clinic-wide alert metrics, on hand-made truth and stored rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bpstream.demo.evaluation import alert_metrics, check_alerts, scorecard, window_truth
from bpstream.simulators.fleet import CuffTruth, FleetTruth

NS = 1_000_000_000
T0 = 1_700_000_000 * NS


def _truth(pressures: dict[str, list[tuple[float, float]]]) -> FleetTruth:
    """One beat per second per device, with the given (SBP, DBP) per second."""
    truth = FleetTruth({d: "x" for d in pressures})
    for device, values in pressures.items():
        for k, (s, d) in enumerate(values):
            truth.add_chunk(device, k, T0 + k * NS, np.array([T0 + k * NS + NS // 2], dtype=np.int64),
                            np.array([s]), np.array([d]), "normal")
    return truth


def test_window_truth_is_the_mean_of_the_beats_in_each_window() -> None:
    truth = _truth({"a": [(100.0 + k, 70.0) for k in range(30)]})
    sbp, dbp = window_truth(truth, "a", np.array([T0 + 8 * NS, T0 + 20 * NS, T0 - NS]))
    assert sbp[0] == pytest.approx(np.mean([100 + k for k in range(8)]))
    assert sbp[1] == pytest.approx(np.mean([100 + k for k in range(12, 20)]))
    assert dbp[0] == 70.0
    assert math.isnan(sbp[2])  # no beats before the start


def _alert(kind: str, at_s: int, *, first_s: int | None = None, basis: str = "estimates", state: str = "raised",
           sbp: float = 150.0, dbp: float = 95.0) -> dict[str, object]:
    return {"time": T0 + at_s * NS, "kind": kind, "state": state, "basis": basis, "sbp": sbp, "dbp": dbp,
            "first_window_ns": None if first_s is None else T0 + first_s * NS}


def test_an_alert_is_above_truth_only_when_no_true_window_in_its_evidence_reached_its_category() -> None:
    # stage 1 for 60 s, then stage 2 for 60 s
    truth = _truth({"a": [(134.0, 84.0)] * 60 + [(150.0, 92.0)] * 60})
    checks = check_alerts(truth, "a", [
        _alert("stage2", 40, first_s=30),                  # stage 1 truth: false
        _alert("stage2", 100, first_s=90),                 # stage 2 truth: right
        _alert("crisis", 110, basis="cuff"),               # a cuff in crisis range over stage-2 truth: false
        _alert("stage2", 100, first_s=90, state="resolved"),  # resolves are not alerts
        _alert("calibration_due", 50),                    # info kinds are not clinical alerts
    ])
    assert [(c.kind, c.true_category, c.above_truth) for c in checks] == [
        ("stage2", "stage1", True), ("stage2", "stage2", False), ("crisis", "stage2", True)]


def test_scorecard_compares_calibrated_and_raw_error_coverage_and_withheld() -> None:
    truth = _truth({"a": [(120.0, 75.0)] * 40})
    truth.cuffs.append(CuffTruth("a", T0 + 10 * NS, 122.0, 81.0, 120.0, 80.0, "sim-cuff", 0))
    rows = []
    for k in range(10, 40, 2):
        calibrated = k >= 20
        rows.append({"time": T0 + k * NS, "sbp": 121.0 if calibrated else 140.0, "dbp": 80.0,
                     "raw_sbp": 140.0, "raw_dbp": 90.0, "mode": "calibrated" if calibrated else "uncalibrated",
                     "sbp_lo": 110.0 if calibrated else 100.0, "sbp_hi": 130.0 if calibrated else 118.0,
                     "withheld": "calibration_stale" if k >= 36 else None})
    rows.append({"time": T0 + 40 * NS, "sbp": None, "dbp": None, "mode": "calibrated", "withheld": "signal_quality"})
    card = scorecard("a", "normotensive", rows, [], truth)
    assert card.cuff_readings == 1
    assert (card.windows, card.scored, card.calibrated) == (16, 15, 10)
    assert card.sbp_mae_calibrated == pytest.approx(1.0)
    assert card.sbp_mae_uncal_same == pytest.approx(20.0)
    assert card.coverage_calibrated == 1.0 and card.coverage_uncalibrated == 0.0
    assert card.withheld == {"calibration_stale": 2, "signal_quality": 1}
    assert card.typical_category == card.peak_category == "elevated"
    assert card.alerted_category is None and card.alerts_above_truth == 0


def test_alert_metrics_count_false_alerts_per_time_and_crisis_sensitivity() -> None:
    truth = _truth({"crisis-1": [(150.0, 95.0)] * 60 + [(200.0, 125.0)] * 60,
                    "crisis-2": [(150.0, 95.0)] * 60 + [(200.0, 125.0)] * 60,
                    "normal": [(112.0, 72.0)] * 120})
    alerts = {"crisis-1": [_alert("crisis", 70, basis="cuff")],
              "crisis-2": [_alert("crisis", 30, first_s=20)],  # before the true crisis: false, not a detection
              "normal": [_alert("stage2", 100, first_s=80)]}
    m = alert_metrics("enrolled", truth, alerts, ["crisis-1", "crisis-2", "normal"], 120.0)
    assert m.patient_hours == pytest.approx(0.1)
    assert (m.stage_alerts, m.false_stage_alerts) == (1, 1)
    assert m.false_stage_per_patient_hour == pytest.approx(10.0)
    assert (m.crisis_alerts, m.false_crisis_alerts) == (2, 1)
    assert m.false_crisis_per_patient_day == pytest.approx(240.0)
    assert (m.crisis_patients, m.crisis_detected, m.crisis_sensitivity) == (2, 1, 0.5)
    # the first true crisis window ends at 64.5 s (5 of its 8 beats at 200/125 put its mean above 180)
    assert m.crisis_latency_s_median == pytest.approx(70 - 64.5)
