"""Inference's calibration stage (pure): references around the cuff time, calibrated values by the shared
formula, intervals per mode, withheld reasons, replacement of a calibration, restore after a restart."""

from __future__ import annotations

import pytest

from bpstream.services.inference.calibration import CalibrationBook, CalibrationPolicy
from bpstream.shared.messages import CalibrationRecord, CuffReading, Estimate
from bpstream.shared.model.calibration import Calibration, IntervalSpec, calibrated_pressure

pytestmark = pytest.mark.unit

HOP = 2 * 10**9
T0 = 1_760_000_000_000_000_000


def _raw(i: int, sbp: float = 120.0, dbp: float = 75.0, *, device: str = "d1", sd: float = 5.0,
         quality_ok: bool = True, version: str = "m1") -> Estimate:
    return Estimate(clinic_id="c1", device_id=device, window_start_ns=T0 + i * HOP - 8 * 10**9,
                    window_end_ns=T0 + i * HOP, sbp=sbp if quality_ok else 0.0, dbp=dbp if quality_ok else 0.0,
                    sbp_sd=sd, dbp_sd=sd / 2, anomaly_prob=0.0, sqi=0.9, quality_ok=quality_ok, inputs="ecg+ppg",
                    model_version=version)


def _cuff(i: int, sbp: float = 140.0, dbp: float = 90.0, device: str = "d1", cuff_id: str = "omron") -> CuffReading:
    return CuffReading(clinic_id="c1", device_id=device, sbp=sbp, dbp=dbp, time_ns=T0 + i * HOP, cuff_id=cuff_id)


def test_uncalibrated_estimates_carry_the_wide_interval_and_are_not_withheld() -> None:
    book = CalibrationBook()
    (out,), finished = book.process([_raw(0, 150.0, 95.0)])
    assert finished == []
    assert (out.mode, out.withheld, out.calibration_age_s, out.calibration_ns) == ("uncalibrated", None, None, None)
    spec = IntervalSpec()
    assert (out.sbp, out.raw_sbp, out.sbp_lo, out.sbp_hi) == (150.0, 150.0, 150.0 - spec.uncalibrated_sbp,
                                                              150.0 + spec.uncalibrated_sbp)
    assert (out.dbp_lo, out.dbp_hi) == (95.0 - spec.uncalibrated_dbp, 95.0 + spec.uncalibrated_dbp)


def test_reference_is_the_mean_output_on_windows_around_the_cuff_time_and_applies_after_them() -> None:
    spec = IntervalSpec(gain_sbp=0.5, gain_dbp=1.0)
    book = CalibrationBook(CalibrationPolicy(reference_window_s=10.0, spec=spec))
    book.add_cuff(_cuff(20))  # windows 15..25 end within 10 s of the cuff time
    outputs = [(100.0 + i, 70.0 + i / 2) for i in range(40)]
    estimates, finished = book.process([_raw(i, s, d) for i, (s, d) in enumerate(outputs)])
    (record,) = finished
    around = outputs[15:26]
    assert record.n_windows == 11 and record.model_version == "m1"
    assert record.reference_sbp == pytest.approx(sum(s for s, _ in around) / 11)
    assert record.reference_dbp == pytest.approx(sum(d for _, d in around) / 11)
    # Before the reference window closed the device is uncalibrated, from then on calibrated.
    assert {e.mode for e in estimates[:25]} == {"uncalibrated"}
    assert {e.mode for e in estimates[25:]} == {"calibrated"}
    last = estimates[-1]
    cal = Calibration(140.0, 90.0, record.reference_sbp, record.reference_dbp)
    expected = calibrated_pressure(139.0, 89.5, cal, gain_sbp=0.5, gain_dbp=1.0)
    assert (last.sbp, last.dbp) == pytest.approx(expected, abs=0.01)
    assert (last.raw_sbp, last.calibration_ns, last.calibration_cuff_id) == (139.0, T0 + 20 * HOP, "omron")
    assert last.calibration_age_s == pytest.approx(19 * 2.0)
    assert (last.sbp_hi - last.sbp, last.dbp - last.dbp_lo) == pytest.approx((spec.calibrated_sbp,
                                                                              spec.calibrated_dbp), abs=0.01)
    assert last.withheld is None


def test_a_new_reading_replaces_the_calibration_once_its_windows_are_in_and_other_devices_are_untouched() -> None:
    book = CalibrationBook(CalibrationPolicy(reference_window_s=4.0))
    book.add_cuff(_cuff(2, 130.0, 85.0))
    first, _ = book.process([_raw(i) for i in range(10)] + [_raw(i, device="d2") for i in range(10)])
    assert first[9].sbp == pytest.approx(130.0) and first[9].calibration_cuff_id == "omron"
    assert {e.mode for e in first[10:]} == {"uncalibrated"}  # d2 has no cuff reading
    book.add_cuff(_cuff(12, 150.0, 95.0, cuff_id="omron-2"))
    later, finished = book.process([_raw(i) for i in range(10, 20)])
    assert [r.cuff_id for r in finished] == ["omron-2"]
    # Windows 10..13 still use the first calibration; from the end of the new reference window, the new one.
    assert [e.calibration_cuff_id for e in later] == ["omron"] * 4 + ["omron-2"] * 6
    assert later[-1].sbp == pytest.approx(150.0)


def test_a_reading_sent_after_its_windows_were_scored_calibrates_from_the_buffer() -> None:
    book = CalibrationBook(CalibrationPolicy(reference_window_s=4.0))
    book.process([_raw(i, 110.0 + i) for i in range(30)])
    book.add_cuff(_cuff(10, 125.0, 80.0))
    (record,) = book.pending_finish()
    assert record.reference_sbp == pytest.approx(120.0) and record.n_windows == 5
    assert book.pending_finish() == []  # finished once
    (next_estimate,), _ = book.process([_raw(30, 140.0)])
    assert next_estimate.mode == "calibrated" and next_estimate.sbp == pytest.approx(125.0 + 140.0 - 120.0)


def test_a_reading_with_no_windows_around_it_leaves_the_device_uncalibrated() -> None:
    book = CalibrationBook(CalibrationPolicy(reference_window_s=4.0, buffer_s=20.0))
    book.process([_raw(i) for i in range(100)])
    book.add_cuff(_cuff(5))  # long before what is still buffered
    assert book.pending_finish() == []
    (out,), _ = book.process([_raw(100)])
    assert out.mode == "uncalibrated"


def test_withheld_reasons_signal_quality_stale_ood_and_wide_interval() -> None:
    policy = CalibrationPolicy(reference_window_s=2.0, max_age_s=60.0, max_half_width_sbp=25.0,
                               input_ranges={"heart_rate_bpm": [40.0, 150.0], "not_measured": [0.0, 1.0]})
    book = CalibrationBook(policy)
    book.restore([CalibrationRecord(clinic_id="c1", device_id="d1", cuff_sbp=130.0, cuff_dbp=80.0, time_ns=T0,
                                    cuff_id="omron", reference_sbp=120.0, reference_dbp=75.0, n_windows=3,
                                    model_version="m1")])
    features = {("c1", "d1", T0 + 1 * HOP): {"heart_rate_bpm": 72.0},
                ("c1", "d1", T0 + 2 * HOP): {"heart_rate_bpm": 190.0}}
    out, _ = book.process([_raw(1), _raw(2), _raw(3, sd=20.0), _raw(4, quality_ok=False), _raw(30), _raw(32)],
                          features)
    assert [e.withheld for e in out] == [None, "out_of_distribution", None, "signal_quality",
                                         None, "calibration_stale"]
    assert out[0].mode == "calibrated" and out[0].sbp == pytest.approx(130.0)
    # A calibrated interval is the conformal half-width of a change from the cuff; the model's own SD (about its
    # absolute error) does not widen it.
    assert out[2].sbp_hi - out[2].sbp == pytest.approx(policy.spec.calibrated_sbp, abs=0.01)
    wide = CalibrationPolicy(reference_window_s=2.0, max_half_width_sbp=25.0,
                             spec=IntervalSpec(calibrated_sbp=30.0))
    wide_book = CalibrationBook(wide)
    wide_book.restore([CalibrationRecord(clinic_id="c1", device_id="d1", cuff_sbp=130.0, cuff_dbp=80.0, time_ns=T0,
                                         cuff_id="omron", reference_sbp=120.0, reference_dbp=75.0, n_windows=3,
                                         model_version="m1")])
    (too_wide,), _ = wide_book.process([_raw(1)])
    assert too_wide.withheld == "interval_too_wide"
    assert out[3].sbp_lo is None and out[3].mode == "calibrated"  # unscored: no numbers, still says its mode
    assert out[5].calibration_age_s == pytest.approx(64.0)
    # Uncalibrated estimates are never withheld for their wide interval.
    (unc,), _ = CalibrationBook(policy).process([_raw(1, sd=30.0)])
    assert unc.mode == "uncalibrated" and unc.withheld is None
    assert unc.sbp_hi - unc.sbp == pytest.approx(1.6448536 * 30.0, abs=0.01)  # the model's own SD widens it


def test_restored_calibration_holds_for_its_model_version_only() -> None:
    record = CalibrationRecord(clinic_id="c1", device_id="d1", cuff_sbp=130.0, cuff_dbp=80.0, time_ns=T0,
                               cuff_id="omron", reference_sbp=120.0, reference_dbp=75.0, n_windows=3,
                               model_version="m1")
    book = CalibrationBook()
    book.restore([record])
    book.add_cuff(_cuff(0, 130.0, 80.0))  # the same reading, read back from the cuff topic at start
    (same,), finished = book.process([_raw(100)])
    assert same.mode == "calibrated" and finished == []
    (other,), _ = book.process([_raw(101, version="m2")])
    assert other.mode == "uncalibrated"


def test_interval_spec_comes_from_the_model_metadata() -> None:
    spec = IntervalSpec.from_dict({"calibrated": {"sbp": 8.0, "dbp": 5.0}, "uncalibrated": {"sbp": 30.0}})
    (out,), _ = CalibrationBook(CalibrationPolicy(spec=spec)).process([_raw(0, sd=1.0)])
    assert (out.sbp_hi - out.sbp, out.dbp_hi - out.dbp) == pytest.approx((30.0, IntervalSpec().uncalibrated_dbp))
