"""Accuracy metrics against hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bpstream.training.metrics import (
    bhs_grade,
    calibrate,
    carried_forward,
    error_metrics,
    paired_report,
    plot_pair,
    stage_confusion,
)

pytestmark = pytest.mark.unit


def test_error_metrics_hand_computed() -> None:
    ref = np.array([120.0, 130.0, 140.0, 150.0])
    est = np.array([124.0, 124.0, 152.0, 150.0])  # errors +4, -6, +12, 0
    m = error_metrics(est, ref)
    assert m["mae"] == pytest.approx(22 / 4)
    assert m["rmse"] == pytest.approx(np.sqrt((16 + 36 + 144 + 0) / 4))
    assert m["me"] == pytest.approx(10 / 4)
    assert m["sd"] == pytest.approx(np.std([4, -6, 12, 0], ddof=1))
    assert (m["within_5"], m["within_10"], m["within_15"]) == (0.5, 0.75, 1.0)
    assert m["n"] == 4
    assert m["sd"] == pytest.approx(np.sqrt(171 / 3))  # deviations 1.5, -8.5, 9.5, -2.5 from the mean 2.5
    assert m["bhs_grade"] == "B"  # 50/75/100 %: fails A (60 % within 5), meets B (50/75/90)
    assert m["aami_pass"] is True  # |ME| 2.5 <= 5 and SD 7.55 <= 8


def test_bhs_grade_boundaries() -> None:
    assert bhs_grade(0.60, 0.85, 0.95) == "A"
    assert bhs_grade(0.59, 0.85, 0.95) == "B"
    assert bhs_grade(0.50, 0.75, 0.90) == "B"
    assert bhs_grade(0.40, 0.65, 0.85) == "C"
    assert bhs_grade(0.39, 0.99, 0.99) == "D"


def test_aami_rule() -> None:
    ref = np.zeros(6)
    assert error_metrics(ref + np.array([5, 5, 5, 5, 5, 5.0]), ref)["aami_pass"] is True  # ME 5, SD 0
    assert error_metrics(ref + np.array([5.1] * 6), ref)["aami_pass"] is False
    wide = np.array([-9.0, 9.0, -9.0, 9.0, -9.0, 9.0])  # ME 0, SD 9.86
    assert error_metrics(ref + wide, ref)["aami_pass"] is False


def test_empty_metrics_have_every_key() -> None:
    m = error_metrics(np.zeros(0), np.zeros(0))
    assert set(m) == {"mae", "rmse", "me", "sd", "within_5", "within_10", "within_15", "bhs_grade", "aami_pass",
                      "n"}
    assert m["n"] == 0 and m["mae"] is None


def test_calibration_removes_each_subjects_offset_using_its_first_window_only() -> None:
    subject = np.array(["a", "a", "a", "b", "b"])
    t = np.array([10.0, 0.0, 20.0, 5.0, 0.0])  # first windows: index 1 for a, 4 for b
    ref = np.array([120.0, 118.0, 125.0, 140.0, 138.0])
    est = ref + np.array([10.0, 10.0, 10.0, -7.0, -7.0])  # constant per-subject offsets
    cal, _, keep = calibrate(est, ref, subject, t)
    assert keep.tolist() == [True, False, True, True, False]
    np.testing.assert_allclose(cal[keep], ref[keep])
    np.testing.assert_allclose(carried_forward(ref, subject, t), [118, 118, 118, 138, 138])


def test_paired_report_has_exactly_the_documented_keys() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(120, 10, 20)
    rep = paired_report(ref + 1, ref / 2 + 1, ref, ref / 2, np.repeat(["a", "b"], 10), np.tile(np.arange(10.0), 2))
    assert set(rep) == {"calibration_free", "calibrated", "n_subjects", "n_windows"}
    for sec in ("calibration_free", "calibrated"):
        assert set(rep[sec]) == {"sbp", "dbp"}
    assert rep["calibrated"]["sbp"]["n"] == 18 and rep["calibration_free"]["sbp"]["n"] == 20
    assert rep["calibrated"]["sbp"]["mae"] == pytest.approx(0.0, abs=1e-9)
    assert rep["n_subjects"] == 2
    json.dumps(rep)


def test_stage_confusion_counts() -> None:
    ref_s = np.array([110, 125, 135, 150, 190])
    ref_d = np.array([70, 70, 70, 95, 100])
    est_s = np.array([112, 135, 135, 150, 150])
    est_d = np.array([70, 70, 70, 95, 95])
    c = stage_confusion(est_s, est_d, ref_s, ref_d)
    m = np.array(c["matrix"])
    assert m.sum() == 5 and np.trace(m) == 4  # elevated read as stage1
    assert c["hypertension_sensitivity"] == 1.0
    assert c["hypertension_specificity"] == 0.5


def test_plot_is_written(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ref = np.linspace(100, 160, 30)
    plot_pair(ref + 2, ref, "test", tmp_path / "ba.png")
    assert (tmp_path / "ba.png").read_bytes()[:4] == b"\x89PNG"
