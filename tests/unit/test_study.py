"""The real-signal study: cinc2015 reader, calibration protocol, gains, conformal intervals, record bootstrap,
and a whole (small) record-grouped cross-validation run through the real training code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bpstream.shared.model.calibration import (
    Calibration,
    IntervalSpec,
    calibrated_array,
    calibrated_pressure,
    conformal_half_width,
)
from bpstream.shared.model.network import NetworkConfig
from bpstream.training.data import WindowSet, detect_and_load
from bpstream.training.real_data import DEFAULT_REAL_DATA, load_cinc2015
from bpstream.training.study import (
    StudyConfig,
    calibration_protocol,
    fit_gain,
    record_bootstrap,
    references,
    run_study,
)
from bpstream.training.train import TrainConfig, train_model

pytestmark = pytest.mark.unit
CINC = DEFAULT_REAL_DATA / "cinc2015"
needs_cinc = pytest.mark.skipif(not CINC.is_dir(), reason=f"real data not found at {CINC} (../shared/data/cinc2015)")


def windows(n_records: int = 8, per_record: int = 20, hop: float = 4.0, seed: int = 0) -> WindowSet:
    """Synthetic prepared windows whose PPG rate follows each window's SBP (so a network can learn it)."""
    rng = np.random.default_rng(seed)
    rows = []
    t = np.arange(1000) / 125.0
    for r in range(n_records):
        base = rng.uniform(100, 150)
        for i in range(per_record):
            sbp = base + 10 * np.sin(i / 5)
            f = 0.8 + (sbp - 100) / 60
            ppg = np.sin(2 * np.pi * f * t)
            rows.append((np.stack([np.zeros(1000), ppg]), sbp, 0.55 * sbp, f"rec-{r}", i * hop))
    x = np.stack([r[0] for r in rows]).astype(np.float32)
    n = len(rows)
    return WindowSet(x, np.array([r[1] for r in rows], np.float32), np.array([r[2] for r in rows], np.float32),
                     np.array([r[3] for r in rows]), np.array([r[4] for r in rows]), np.ones(n, bool),
                     np.ones(n, np.float32), np.array(["ppg"] * n), np.zeros(n, bool),
                     np.full(n, np.nan, np.float32), np.full(n, 70.0, np.float32))


def test_calibrated_estimate_is_the_cuff_plus_the_model_change_times_the_gain() -> None:
    cal = Calibration(cuff_sbp=140.0, cuff_dbp=85.0, reference_sbp=120.0, reference_dbp=70.0)
    assert calibrated_pressure(120.0, 70.0, cal) == (140.0, 85.0)
    assert calibrated_pressure(130.0, 60.0, cal, gain_sbp=0.5, gain_dbp=0.0) == (145.0, 85.0)
    got = calibrated_array(np.array([[130.0, 60.0]]), np.array([[140.0, 85.0]]), np.array([[120.0, 70.0]]),
                           np.array([0.5, 1.0]))
    np.testing.assert_allclose(got, [[145.0, 75.0]])
    spec = IntervalSpec.from_dict(IntervalSpec(calibrated_sbp=7.0, gain_sbp=0.3).to_dict())
    assert spec.half_widths("calibrated")[0] == 7.0 and spec.gain_sbp == 0.3
    assert IntervalSpec.from_dict({}) == IntervalSpec()


def test_conformal_half_width_covers_the_nominal_share_of_new_residuals() -> None:
    rng = np.random.default_rng(3)
    half = conformal_half_width(np.abs(rng.normal(0, 10, 2000)), 0.9)
    fresh = np.abs(rng.normal(0, 10, 20000))
    assert 0.88 <= float(np.mean(fresh <= half)) <= 0.92
    assert conformal_half_width(np.array([1.0, 2.0, 3.0, 4.0]), 0.5) == 3.0
    assert np.isnan(conformal_half_width(np.array([np.nan])))


def test_gain_is_recovered_and_clipped_to_zero_one() -> None:
    rng = np.random.default_rng(0)
    dx = rng.normal(0, 10, (500, 2))
    truth = np.zeros((500, 2)) + 0.6 * dx + rng.normal(0, 1, (500, 2))
    gain = fit_gain(dx, np.zeros((500, 2)), truth, np.zeros((500, 2)), np.ones(500, bool))
    np.testing.assert_allclose(gain, [0.6, 0.6], atol=0.05)
    anti = fit_gain(dx, np.zeros((500, 2)), -truth, np.zeros((500, 2)), np.ones(500, bool))
    np.testing.assert_array_equal(anti, [0.0, 0.0])


def test_calibration_protocol_uses_the_first_30_s_and_scores_only_after_them() -> None:
    ws = windows(n_records=3, per_record=12)
    # Record 2 has no usable window in its first 30 s: it cannot be calibrated and is not scored.
    usable = ws.subset(~((ws.subject == "rec-2") & (ws.t_start < 24)))
    cfg = StudyConfig(cuff_sd=5.0)
    cal = calibration_protocol(usable, ws, cfg)
    first = (ws.subject == "rec-0") & (ws.t_start + 8 <= 30)
    rec0 = usable.subject == "rec-0"
    np.testing.assert_allclose(cal.cal_true[rec0][0], [ws.sbp[first].mean(), ws.dbp[first].mean()], rtol=1e-6)
    assert 0 < abs(cal.cuff[rec0][0, 0] - cal.cal_true[rec0][0, 0]) < 20  # a simulated cuff error
    assert not cal.scored[usable.subject == "rec-2"].any()
    assert cal.info["records_without_usable_reference"] == 1
    assert (usable.t_start[cal.scored] >= 30).all() and cal.scored[rec0].sum() == (usable.t_start[rec0] >= 30).sum()
    # Same seed, same cuff: the protocol is reproducible.
    np.testing.assert_array_equal(cal.cuff, calibration_protocol(usable, ws, cfg).cuff)
    ref = references(np.stack([usable.sbp, usable.dbp], 1), usable.subject, cal.in_cal)
    np.testing.assert_allclose(ref[rec0][0], cal.cal_true[rec0][0], rtol=1e-6)


def test_record_bootstrap_brackets_the_mean_and_widens_with_record_spread() -> None:
    subject = np.repeat(np.arange(30), 10).astype(str)
    tight = np.repeat(np.linspace(4.5, 5.5, 30), 10)
    wide = np.repeat(np.linspace(0, 10, 30), 10)
    lo_t, hi_t = record_bootstrap(tight, subject, 500)
    lo_w, hi_w = record_bootstrap(wide, subject, 500)
    assert lo_t < 5.0 < hi_t and lo_w < 5.0 < hi_w
    assert (hi_w - lo_w) > 3 * (hi_t - lo_t)


def test_a_small_cross_validation_writes_the_documented_schema_and_never_leaks_records(tmp_path: Path) -> None:
    ws = windows(n_records=10, per_record=14)

    def train_fn(tr: WindowSet, va: WindowSet, seed: int):  # type: ignore[no-untyped-def]
        return train_model(tr, va, NetworkConfig(stem_channels=4, stage_channels=(4, 8), lstm_hidden=8,
                                                 ppg_derivatives=True),
                           TrainConfig(max_epochs=2, max_batches=3, batch_size=16, seed=seed, progress=False,
                                       time_warp=0.1, delay_jitter_s=0.04, wander=0.3, lowpass_max=5,
                                       loss="huber"))

    report = run_study(ws, tmp_path, StudyConfig(folds=3, seeds=(0, 1), bootstrap=100), train_fn=train_fn,
                       log=lambda _: None)
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["folds"] == 3 and stored["seeds"] == [0, 1]
    for mode, baselines in (("calibration_free", {"population_mean", "features"}),
                            ("calibrated", {"carried_forward", "features", "population_mean"})):
        section = stored[mode]
        assert set(section["baselines"]) == baselines
        for bp in ("sbp", "dbp"):
            assert section[bp]["mae"] > 0 and len(section[bp]["mae_per_seed"]) == 2
            lo, hi = section["ci95"]["mae"][bp]
            assert lo <= section[bp]["mae"] <= hi
            assert 0.0 <= section["intervals"][bp]["coverage"] <= 1.0
            assert section[bp]["aami_pass"] is None and "n/a" in section[bp]["verdicts"]
        assert set(section["by_range"]) == {"<90", "90-140", ">=140"}
    assert {"n", "model", "carried_forward", "ci95"} <= set(stored["calibrated"]["changes"])
    assert len(report["folds_detail"]) == 6
    for fold in report["folds_detail"]:
        assert fold["train_records"] + fold["val_records"] + fold["test_records"] == 10
    for plot in ("bland_altman_free_sbp.png", "bland_altman_calibrated_dbp.png"):
        assert (tmp_path / plot).stat().st_size > 1000


@needs_cinc
def test_cinc2015_records_read_at_125_hz_with_screened_beats() -> None:
    records = load_cinc2015(CINC, names=["a123l", "a142s"])
    assert [r.subject_id for r in records] == ["cinc-a123l", "cinc-a142s"]
    for r in records:
        assert r.sample_rate == 125.0
        assert len(r.channels["ecg"]) == len(r.channels["ppg"]) == 295 * 125
        assert r.info["abp_screening"]["beats"] > 0
        if r.beat_sbp.size:
            assert (r.beat_sbp > r.beat_dbp).all() and (r.beat_sbp >= 60).all() and (r.beat_sbp <= 250).all()


@needs_cinc
def test_detect_and_load_recognises_cinc2015_and_reports_what_the_screen_rejected() -> None:
    kind, ws = detect_and_load(CINC, hop_s=8.0)
    screening = ws.info["screening"]
    assert kind == "cinc2015" and screening["records"] == 165
    assert 0 < screening["records_without_usable_window"] < 165
    assert screening["windows_labelled"] == len(ws)
    assert screening["windows_failing_signal_quality"] == int((~ws.quality_ok).sum())
    assert sum(v for k, v in screening["beats"].items() if k != "beats") > 0
    ok = ws.quality_ok
    assert 100 < float(np.mean(ws.sbp[ok])) < 150 and 40 < float(np.mean(ws.dbp[ok])) < 90
