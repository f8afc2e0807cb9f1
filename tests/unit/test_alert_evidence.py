"""Alerts only where the evidence holds (pure detector): withheld estimates, calibrated interval evidence for
stage 2, uncalibrated crisis asking for a cuff, cuff readings that raise, confirm or contradict, calibration due,
and the evidence every alert names."""

from __future__ import annotations

import pytest

from bpstream.shared.anomaly import AlertConfig, AlertDetector
from bpstream.shared.messages import Alert, CuffReading, Estimate

pytestmark = pytest.mark.unit

HOP = 2 * 10**9
T0 = 1_760_000_000_000_000_000
CAL_NS = T0 - 3600 * 10**9


def _est(i: int, sbp: float, dbp: float, *, mode: str = "calibrated", half: float = 15.0,
         withheld: str | None = None, cal_ns: int | None = CAL_NS) -> Estimate:
    calibrated = mode == "calibrated"
    return Estimate(clinic_id="c1", device_id="p1", window_start_ns=T0 + i * HOP - 8 * 10**9,
                    window_end_ns=T0 + i * HOP, sbp=sbp, dbp=dbp, sbp_sd=4.0, dbp_sd=3.0, anomaly_prob=0.0, sqi=0.9,
                    quality_ok=True, inputs="ecg+ppg", model_version="m1", raw_sbp=sbp, raw_dbp=dbp, mode=mode,
                    calibration_ns=cal_ns if calibrated else None, calibration_cuff_id="omron" if calibrated else None,
                    sbp_lo=sbp - half, sbp_hi=sbp + half, dbp_lo=dbp - half / 2, dbp_hi=dbp + half / 2,
                    withheld=withheld)


def _run(det: AlertDetector, estimates: list[Estimate]) -> list[Alert]:
    return [a for e in estimates for a in det.update(e)]


def _cuff(i: int, sbp: float, dbp: float) -> CuffReading:
    return CuffReading(clinic_id="c1", device_id="p1", sbp=sbp, dbp=dbp, time_ns=T0 + i * HOP, cuff_id="cuff-9",
                       confirmation=True)


def test_withheld_estimates_never_alert_whatever_their_numbers() -> None:
    det = AlertDetector()
    reasons = ["signal_quality", "out_of_distribution", "interval_too_wide"]
    alerts = _run(det, [_est(i, 210.0, 130.0, withheld=reasons[i % 3]) for i in range(60)])
    assert alerts == []
    assert det.state.withheld_windows == {r: 20 for r in reasons}


def test_stage2_needs_calibrated_estimates_whose_interval_lies_in_the_stage() -> None:
    # Point estimate in stage 2 but the interval reaches below 140: no stage-2 alert (within persistence).
    assert _run(AlertDetector(), [_est(i, 148.0, 85.0) for i in range(60)]) == []
    # The same numbers uncalibrated: never a stage alert, even with a narrow interval.
    assert _run(AlertDetector(), [_est(i, 165.0, 85.0, mode="uncalibrated", half=5.0) for i in range(200)]) == []
    # Calibrated, interval wholly in stage 2: raised, naming its evidence.
    alerts = _run(AlertDetector(), [_est(i, 160.0, 85.0) for i in range(20)])
    (raised,) = alerts
    assert (raised.kind, raised.state, raised.basis, raised.mode) == ("stage2", "raised", "estimates", "calibrated")
    assert (raised.calibration_ns, raised.calibration_cuff_id) == (CAL_NS, "omron")
    assert raised.first_window_ns == T0 and raised.event_ns == T0 + 4 * HOP


def test_stage2_by_persistence_of_calibrated_estimates() -> None:
    det = AlertDetector(AlertConfig(stage_persistence=30))
    alerts = _run(det, [_est(i, 148.0, 85.0) for i in range(40)])
    assert [(a.kind, a.state) for a in alerts] == [("stage2", "raised")]
    # 30 calibrated windows in the stage make the evidence; then the usual persistence of 5 windows.
    assert (alerts[0].first_window_ns, alerts[0].event_ns) == (T0 + 29 * HOP, T0 + 33 * HOP)


def test_uncalibrated_crisis_fires_and_asks_for_a_cuff_which_resolves_the_request_and_confirms() -> None:
    det = AlertDetector()
    alerts = _run(det, [_est(i, 200.0, 110.0, mode="uncalibrated", half=35.0) for i in range(10)])
    assert [(a.kind, a.state) for a in alerts] == [("crisis", "raised"), ("cuff_confirmation", "raised")]
    assert alerts[0].mode == "uncalibrated" and alerts[0].calibration_ns is None
    confirmed = det.cuff(_cuff(12, 195.0, 112.0))
    assert [(a.kind, a.state, a.basis, a.cuff_id) for a in confirmed] == [
        ("cuff_confirmation", "resolved", "cuff", "cuff-9")]
    assert det.active == ("crisis",)


def test_contradicting_cuff_resolves_the_crisis_downgrades_to_stage2_and_holds_off_a_re_raise() -> None:
    det = AlertDetector()
    _run(det, [_est(i, 200.0, 110.0, mode="uncalibrated", half=35.0) for i in range(10)])
    events = det.cuff(_cuff(12, 150.0, 92.0))
    assert [(a.kind, a.state, a.basis) for a in events] == [
        ("cuff_confirmation", "resolved", "cuff"), ("crisis", "resolved", "cuff"), ("stage2", "raised", "cuff")]
    assert "contradicted" in events[1].message and events[2].sbp == 150.0
    # The uncalibrated estimates that follow (inference has not recalibrated yet) cannot raise it again.
    assert _run(det, [_est(i, 200.0, 110.0, mode="uncalibrated", half=35.0) for i in range(13, 60)]) == []
    # A cuff reading below stage 2 resolves the stage-2 alert.
    later = det.cuff(_cuff(70, 125.0, 78.0))
    assert [(a.kind, a.state) for a in later] == [("stage2", "resolved")]
    assert det.cuff(_cuff(70, 125.0, 78.0)) == []  # a replayed reading does nothing


def test_cuff_in_crisis_range_raises_crisis_at_once_and_old_backlog_raises_nothing() -> None:
    det = AlertDetector()
    (alert,) = det.cuff(_cuff(0, 190.0, 100.0))
    assert (alert.kind, alert.state, alert.basis, alert.event_ns, alert.started_ns) == (
        "crisis", "raised", "cuff", T0, T0)
    quiet = AlertDetector()
    assert quiet.cuff(_cuff(0, 190.0, 100.0), raise_alerts=False) == []
    assert quiet.active == () and quiet.state.last_cuff_ns == T0


def test_stale_calibration_raises_calibration_due_once_and_a_new_calibration_resolves_it() -> None:
    det = AlertDetector()
    stale = _run(det, [_est(i, 120.0, 78.0) for i in range(5)]
                 + [_est(i, 210.0, 130.0, withheld="calibration_stale") for i in range(5, 40)])
    assert [(a.kind, a.state, a.severity) for a in stale] == [("calibration_due", "raised", "info")]
    fresh = _run(det, [_est(i, 120.0, 78.0, cal_ns=T0 + 39 * HOP) for i in range(40, 45)])
    assert [(a.kind, a.state) for a in fresh] == [("calibration_due", "resolved")]
    assert fresh[0].alert_id == stale[0].alert_id


def test_a_crisis_raised_by_a_cuff_is_not_flapped_by_a_re_calibration() -> None:
    det = AlertDetector()
    # Calibrated on an old, normal cuff reading: the estimates say normal.
    assert _run(det, [_est(i, 125.0, 80.0) for i in range(15)]) == []
    raised = det.cuff(_cuff(15, 205.0, 125.0))
    assert [(a.kind, a.state, a.basis) for a in raised] == [("crisis", "raised", "cuff")]
    crisis_cuff_ns = T0 + 15 * HOP
    # Until inference re-calibrates on that reading, estimates still rest on the old calibration and look calm:
    # they must not resolve the crisis the cuff raised.
    assert _run(det, [_est(i, 125.0, 80.0) for i in range(16, 60)]) == []
    assert det.active == ("crisis",)
    # Calibrated on the crisis reading: still in crisis, so nothing new (no second raise).
    assert _run(det, [_est(i, 200.0, 122.0, cal_ns=crisis_cuff_ns) for i in range(60, 80)]) == []
    # The pressure really falls: estimates that know the crisis reading resolve it, once.
    resolved = _run(det, [_est(i, 150.0, 85.0, cal_ns=crisis_cuff_ns) for i in range(80, 110)])
    assert [(a.kind, a.state) for a in resolved if a.kind == "crisis"] == [("crisis", "resolved")]
    assert "crisis" not in det.active
