"""Readers of the real recordings in ../shared/data and `bpstream evaluate` on both real folders.

The data lives outside the repository; tests that need it skip with a clear message when it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bpstream.simulators.errors import DataFormatError
from bpstream.simulators.realdata import read_mimic_csv
from bpstream.training.real_data import DEFAULT_REAL_DATA, RealDataError, abp_beats, load_mimic3, load_ppg_bp

pytestmark = pytest.mark.unit
MIMIC = DEFAULT_REAL_DATA / "mimic3-windows"
PPGBP = DEFAULT_REAL_DATA / "ppg-bp"
needs_data = pytest.mark.skipif(not (MIMIC.is_dir() and PPGBP.is_dir()),
                                reason=f"real data not found at {DEFAULT_REAL_DATA} (../shared/data): "
                                       "mimic3-windows and ppg-bp are needed for this test")


def synthetic_abp(fs: float = 125.0, seconds: float = 20.0, sbp: float = 130.0, dbp: float = 70.0) -> np.ndarray:
    t = np.arange(int(seconds * fs)) / fs
    phase = (t * 75 / 60) % 1.0
    pulse = np.exp(-((phase - 0.15) ** 2) / 0.005) + 0.3 * np.exp(-((phase - 0.4) ** 2) / 0.004)
    pulse = (pulse - pulse.min()) / (pulse.max() - pulse.min())
    return dbp + (sbp - dbp) * pulse


def test_abp_beats_recover_sbp_and_dbp_and_screen_artefacts() -> None:
    fs = 125.0
    abp = synthetic_abp(fs)
    _t, s, d, _counts = abp_beats(abp, fs)
    assert len(s) >= 20
    assert np.median(s) == pytest.approx(130, abs=2) and np.median(d) == pytest.approx(70, abs=2)
    bad = abp.copy()
    bad[500:700] = 300.0  # flush
    bad[1200:1260] = np.nan  # gap
    t2, s2, _, counts2 = abp_beats(bad, fs)
    assert counts2["gap"] + counts2["range"] + counts2["pinned"] + counts2["jump"] >= 2
    assert np.all(s2 < 200)
    assert not np.any((t2 > 500 / fs - 0.5) & (t2 < 700 / fs))


def test_one_mimic_csv_parser_serves_the_replay_and_training(tmp_path: Path) -> None:
    # Columns in a different order than usual, an empty cell, an unparsable one and a short row.
    n = 2500
    abp = synthetic_abp(seconds=n / 125.0)
    rows = [f"{i / 125.0},{abp[i]:.3f},{0.1 * i:.2f},{0.5 + i % 7}" for i in range(n)]
    rows[10] = "0.08,,1.0,0.5"
    rows[11] = "0.088,120.0,oops,0.5"
    rows[12] = "0.096,121.0"
    folder = tmp_path / "mimic3-windows"
    (folder / "records").mkdir(parents=True)
    path = folder / "records" / "rec1.csv"
    path.write_text("Time,ABP,II,PLETH\n" + "\n".join(rows) + "\n")

    rec = read_mimic_csv(path)
    (loaded,) = load_mimic3(folder)
    assert rec.name == "rec1" and loaded.subject_id == "mimic3-rec1"
    assert np.array_equal(rec.ecg, loaded.channels["ecg"], equal_nan=True)
    assert np.array_equal(rec.ppg, loaded.channels["ppg"], equal_nan=True)
    assert np.isnan(rec.abp[10]) and np.isnan(rec.ecg[11]) and np.isnan(rec.ecg[12]) and np.isnan(rec.ppg[12])
    assert rec.abp[11] == 120.0 and rec.ppg[13] == pytest.approx(0.5 + 13 % 7)
    assert loaded.info["gap_fraction"] == pytest.approx({"II": 2 / n, "PLETH": 1 / n, "ABP": 1 / n})
    assert len(loaded.beat_sbp) > 20

    # The same format error, typed for each caller.
    path.write_text("Time,II,ABP\n0,1,2\n")
    with pytest.raises(DataFormatError, match="PLETH"):
        read_mimic_csv(path)
    with pytest.raises(RealDataError, match="PLETH"):
        load_mimic3(folder)


@needs_data
def test_mimic3_reader_reads_columns_by_name_with_gaps() -> None:
    records = load_mimic3(MIMIC)
    assert len(records) == 29
    for r in records:
        assert r.sample_rate == 125.0 and set(r.channels) == {"ecg", "ppg"}
        assert len(r.channels["ppg"]) == 7500
        if len(r.beat_sbp):
            assert 60 <= np.median(r.beat_sbp) <= 250 and np.all(r.beat_sbp > r.beat_dbp)
    assert any(r.info["gap_fraction"]["PLETH"] > 0 for r in records)  # the documented gaps are there
    assert sum(len(r.beat_sbp) > 30 for r in records) >= 25


@needs_data
def test_ppg_bp_reader_builds_8s_ppg_only_records() -> None:
    records = load_ppg_bp(PPGBP)
    assert len(records) == 217  # 219 segments, 3_3 empty, one unlabelled subject
    assert len({r.subject_id for r in records}) == len(records)
    r = records[0]
    assert set(r.channels) == {"ppg"} and len(r.channels["ppg"]) == 8000 and r.single_reading
    assert 80 <= r.beat_sbp[0] <= 200


@needs_data
@pytest.mark.slow
def test_evaluate_reads_both_real_folders(tmp_path: Path) -> None:
    from bpstream.training.evaluate import evaluate_folders

    results = evaluate_folders([MIMIC, PPGBP], tmp_path, None, folds=3, hop_s=8.0, finetune=False,
                               log=lambda _: None)
    assert set(results) == {"mimic3", "ppg-bp"}
    # mimic3-windows: an external test of the committed model with the study's metrics and protocol.
    mimic = json.loads((tmp_path / "mimic3" / "metrics.json").read_text())
    assert {"calibration_free", "calibrated", "n_subjects", "n_windows", "model_version"} <= set(mimic)
    assert mimic["n_subjects"] >= 25 and mimic["calibration_free"]["sbp"]["n"] == mimic["n_windows"] > 0
    assert set(mimic["calibrated"]["baselines"]) == {"carried_forward", "features", "population_mean"}
    assert 0.0 <= mimic["calibrated"]["intervals"]["coverage"] <= 1.0
    assert (tmp_path / "mimic3" / "bland_altman_calibrated_sbp.png").is_file()
    # ppg-bp: a robustness check only (one repeated 2 s excerpt and one non-simultaneous cuff per subject).
    ppg = json.loads((tmp_path / "ppg-bp" / "metrics.json").read_text())
    assert set(ppg) == {"calibration_free", "calibrated", "n_subjects", "n_windows"}
    for bp in ("sbp", "dbp"):
        assert set(ppg["calibration_free"][bp]) == {"mae", "rmse", "me", "sd", "within_5", "within_10",
                                                    "within_15", "bhs_grade", "aami_pass", "n"}
    assert ppg["n_subjects"] >= 200 and ppg["calibrated"]["sbp"]["n"] == 0  # one reading per subject
    details = json.loads((tmp_path / "ppg-bp" / "details.json").read_text())
    assert {"population_mean_cv", "calibration_carried_forward"} <= set(details["baselines"])
