"""The simulator's physiology and datasets: determinism, heart rate, PAT-pressure relation, scenario ranges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bpstream.shared.errors import BpstreamError
from bpstream.simulators.dataset import SimDataset, load_dataset, simulate_cohort, write_dataset
from bpstream.simulators.errors import DataFormatError, InvalidParameterError, UnknownScenarioError
from bpstream.simulators.fleet import FleetConfig
from bpstream.simulators.scenarios import LABEL_CODES, SCENARIOS, assign_scenarios, scenario_spec

pytestmark = pytest.mark.unit
FS = 125.0


def _pat_from_signals(rec) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """PAT measured on the signals: R peak (truth time) to the PPG maximum upslope in the next 0.08-0.6 s."""
    slope = np.gradient(rec.ppg.astype(float)) * FS
    pats, sbps = [], []
    for t, sbp in zip(rec.beat_times_s, rec.beat_sbp, strict=True):
        a, b = int(t * FS + 0.08 * FS), int(t * FS + 0.6 * FS)
        if b >= len(slope):
            break
        pats.append((a + int(np.argmax(slope[a:b]))) / FS - t)
        sbps.append(sbp)
    return np.array(pats), np.array(sbps)


@pytest.fixture(scope="module")
def ten_minutes() -> SimDataset:
    names = ["normotensive", "elevated", "stage1", "stage2", "normotensive", "stage1", "elevated", "stage2"]
    return simulate_cohort(len(names), 10, seed=11, scenarios=names)


def test_same_seed_gives_identical_dataset_and_other_seed_differs() -> None:
    a = simulate_cohort(3, 0.5, seed=5)
    b = simulate_cohort(3, 0.5, seed=5)
    c = simulate_cohort(3, 0.5, seed=6)
    for ra, rb in zip(a.records, b.records, strict=True):
        for name in ("ecg", "ppg", "labels", "beat_times_s", "beat_sbp", "beat_dbp"):
            assert np.array_equal(getattr(ra, name), getattr(rb, name)), name
        assert ra.profile == rb.profile
    assert not np.array_equal(a.records[0].ecg, c.records[0].ecg)


def test_dataset_shapes_units_and_roundtrip(tmp_path: Path) -> None:
    ds = simulate_cohort(4, 1, seed=2)
    rec = ds.records[0]
    assert rec.sample_rate == 125.0 and rec.ecg.dtype == np.float32 and rec.ppg.dtype == np.float32
    assert rec.ecg.shape == rec.ppg.shape == rec.labels.shape == (7500,)
    assert rec.labels.dtype == np.int8 and rec.beat_times_s.dtype == np.float64
    assert len(rec.beat_times_s) == len(rec.beat_sbp) == len(rec.beat_dbp) > 40
    assert np.all(np.diff(rec.beat_times_s) > 0) and np.all(rec.beat_dbp < rec.beat_sbp)
    assert 0.2 < np.ptp(rec.ecg) < 5.0  # mV scale
    assert set(ds.label_names.values()) >= {"normal", "crisis", "motion", "sensor_off"}
    for key in ("age", "sex", "sbp0", "dbp0", "hr0", "pwv_ref", "path_m", "pep0", "scenario"):
        assert key in rec.profile
    write_dataset(ds, tmp_path / "ds")
    back = load_dataset(tmp_path / "ds")
    assert back.meta["seed"] == 2 and back.label_names == ds.label_names
    for ra, rb in zip(ds.records, back.records, strict=True):
        assert ra.subject_id == rb.subject_id and ra.profile == rb.profile
        assert np.array_equal(ra.ecg, rb.ecg) and np.array_equal(ra.beat_sbp, rb.beat_sbp)
        assert np.array_equal(ra.labels, rb.labels)


def test_load_dataset_rejects_missing_and_truncated(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError):
        load_dataset(tmp_path / "nothing")
    ds = simulate_cohort(1, 0.2, seed=1)
    write_dataset(ds, tmp_path / "ds")
    (tmp_path / "ds" / f"{ds.records[0].subject_id}.npz").write_bytes(b"not a zip")
    with pytest.raises(DataFormatError):
        load_dataset(tmp_path / "ds")


def test_heart_rate_from_detected_r_peaks_matches_truth(ten_minutes: SimDataset) -> None:
    import neurokit2 as nk

    for rec in ten_minutes.records[:3]:
        ecg = rec.ecg[: int(90 * FS)].astype(float)
        _, info = nk.ecg_peaks(nk.ecg_clean(ecg, sampling_rate=FS), sampling_rate=FS)
        detected = np.asarray(info["ECG_R_Peaks"]) / FS
        true = rec.beat_times_s[rec.beat_times_s < 90]
        hr_detected = 60 / np.diff(detected).mean()
        hr_true = 60 / np.diff(true).mean()
        assert abs(hr_detected - hr_true) < 1.0
        nearest = np.abs(detected[:, None] - true[None, :]).min(axis=0)
        assert (nearest < 0.03).mean() > 0.98  # nearly every true beat has a detected R peak within 30 ms


def test_pulse_arrival_time_falls_as_pressure_rises_within_each_patient(ten_minutes: SimDataset) -> None:
    for rec in ten_minutes.records:
        pat, sbp = _pat_from_signals(rec)
        assert sbp.std() > 3, "the record should move pressure over ten minutes"
        assert np.corrcoef(pat, sbp)[0, 1] < -0.3, rec.profile["scenario"]


def test_pat_pressure_mapping_differs_between_patients(ten_minutes: SimDataset) -> None:
    slopes, pat_at_120, residual_own, xs, ys = [], [], [], [], []
    for rec in ten_minutes.records:
        pat, sbp = _pat_from_signals(rec)
        coef = np.polyfit(sbp, pat * 1000, 1)  # ms per mmHg
        slopes.append(coef[0])
        pat_at_120.append(np.polyval(coef, 120.0))
        own = np.polyfit(pat, sbp, 1)
        residual_own.append(np.abs(np.polyval(own, pat) - sbp).mean())
        xs.append(pat)
        ys.append(sbp)
    slopes_arr = np.array(slopes)
    assert np.all(slopes_arr < 0)
    assert slopes_arr.std() / abs(slopes_arr.mean()) > 0.1  # sensitivity differs between patients
    assert np.ptp(pat_at_120) > 0.04 * 1000  # and so does the PAT at the same pressure (> 40 ms)
    x, y = np.concatenate(xs), np.concatenate(ys)
    universal = np.abs(np.polyval(np.polyfit(x, y, 1), x) - y).mean()
    assert universal > 1.5 * np.mean(residual_own)  # one curve for everyone fits much worse


def _pulse_centroid(rec, t0: float, t1: float) -> float:  # type: ignore[no-untyped-def]
    """Time centroid (s) of the ensemble-averaged PPG pulse over 0.5 s from each true pulse foot in [t0, t1)."""
    n = int(0.5 * FS)
    pulses = []
    for t, pat in zip(rec.beat_times_s, rec.beat_pat_s, strict=True):
        a = round((t + pat) * FS)
        if t0 <= t < t1 and a + n <= len(rec.ppg):
            seg = rec.ppg[a:a + n].astype(float)
            pulses.append(seg - seg[0])
    mean = np.clip(np.mean(pulses, axis=0), 0, None)
    return float((mean * np.arange(n) / FS).sum() / mean.sum())


def test_ppg_shape_changes_with_pressure_and_age() -> None:
    crisis = simulate_cohort(4, 4, seed=3, scenarios=["crisis"] * 4)
    for rec in crisis.records:
        onset = np.argmax(rec.labels == LABEL_CODES["crisis"]) / FS
        before = _pulse_centroid(rec, 0, max(5.0, onset - 25))
        during = _pulse_centroid(rec, onset + 5, onset + 60)
        assert during < before - 0.01  # earlier, larger reflected wave and faster rise at high pressure
    calm = simulate_cohort(12, 1, seed=4, scenarios=["normotensive"] * 12)
    ages = [float(r.profile["age"]) for r in calm.records]
    centroids = [_pulse_centroid(r, 0, 60) for r in calm.records]
    assert np.corrcoef(ages, centroids)[0, 1] > 0.5  # older arteries: later-peaking, augmented pulse


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_scenario_stays_in_its_pressure_range(name: str) -> None:
    spec = scenario_spec(name)
    for seed in (1, 2):
        ds = simulate_cohort(6, 4, seed=seed, scenarios=[name] * 6)
        for rec in ds.records:
            assert spec.sbp_limits[0] <= rec.beat_sbp.min() and rec.beat_sbp.max() <= spec.sbp_limits[1]
            assert spec.dbp_limits[0] <= rec.beat_dbp.min() and rec.beat_dbp.max() <= spec.dbp_limits[1]
            if name != "crisis":
                assert not ((rec.beat_sbp > 180) | (rec.beat_dbp > 120)).any()
            lo, hi = spec.baseline_sbp
            assert lo - 12 <= float(rec.profile["sbp0"]) <= hi + 12


def test_crisis_and_hypotension_reach_their_thresholds_after_onset() -> None:
    from bpstream.simulators.cohort import build_cohort

    cohort = build_cohort(["crisis"] * 5 + ["hypotension"] * 5, 10, seed=3, duration_s=120, crisis_onset_s=30)
    blocks = [cohort.engine.step(1.0) for _ in range(120)]
    dev = np.concatenate([b.beat_device for b in blocks])
    t = np.concatenate([b.beat_time for b in blocks])
    sbp = np.concatenate([b.beat_sbp for b in blocks])
    dbp = np.concatenate([b.beat_dbp for b in blocks])
    after = t >= 30 + 20  # onset + ramp
    crisis, hypo = dev < 5, dev >= 5
    assert ((sbp > 180) | (dbp > 120))[after & crisis].all()
    assert not ((sbp > 180) | (dbp > 120))[(t < 30) & crisis].any()
    assert (sbp[after & hypo] < 100).all() and sbp[after & hypo].mean() < 90
    assert (sbp[(t < 30) & hypo] > 90).all()


def test_fault_and_rhythm_scenarios_are_visible_in_signals_and_labels() -> None:
    from scipy.signal import welch

    ds = simulate_cohort(5, 5, seed=4, scenarios=["arrhythmia", "sensor_off", "motion", "noisy", "normotensive"])
    af, off, motion, noisy, clean = ds.records
    assert (af.labels == LABEL_CODES["atrial_fibrillation"]).any() and (af.beat_type == 2).any()
    assert (af.beat_type == 1).any()  # ectopic beats
    # beat-to-beat RR change relative to RR, over three consecutive beats of the same rhythm
    rr = np.diff(af.beat_times_s)
    jump = np.abs(np.diff(rr)) / rr[1:]
    kind = af.beat_type
    in_af = (kind[2:] == 2) & (kind[1:-1] == 2) & (kind[:-2] == 2)
    sinus = (kind[2:] == 0) & (kind[1:-1] == 0) & (kind[:-2] == 0)
    assert jump[in_af].mean() > 4 * jump[sinus].mean()
    sensor_off = off.labels == LABEL_CODES["sensor_off"]
    assert sensor_off.any() and np.ptp(off.ppg[sensor_off]) < 0.05
    dropout = off.labels == LABEL_CODES["dropout"]
    assert dropout.any() and np.all(off.ecg[dropout] == 0)
    assert (motion.labels == LABEL_CODES["motion"]).any()
    def band(x: np.ndarray, lo: float, hi: float) -> float:
        f, p = welch(x.astype(float), fs=FS, nperseg=1024)
        return float(p[(f >= lo) & (f < hi)].sum())

    assert band(noisy.ecg, 40, 62.5) > 10 * band(clean.ecg, 40, 62.5)  # powerline and muscle noise
    assert band(noisy.ecg, 0, 0.5) > 3 * band(clean.ecg, 0, 0.5)  # baseline wander


def test_clinic_mix_has_exactly_one_crisis_and_one_noisy_device() -> None:
    names = assign_scenarios("clinic", 12, np.random.default_rng(0))
    assert names.count("crisis") == 1 and names.count("noisy") == 1
    assert set(names) <= {"crisis", "noisy", "normotensive", "elevated", "stage1", "stage2"}


def test_bad_names_and_impossible_parameters_raise_clear_typed_errors() -> None:
    with pytest.raises(UnknownScenarioError, match="known scenarios: normotensive"):
        simulate_cohort(2, 1, seed=0, scenarios="hypertensive-ish")
    with pytest.raises(UnknownScenarioError):
        FleetConfig("127.0.0.1", 1883, devices=3, duration_s=10, scenario="nope")
    bad_configs = [dict(devices=0), dict(speed=0.0), dict(speed=float("nan")), dict(duration_s=0.5),
                   dict(loss_rate=1.5), dict(duplicate_rate=-0.1), dict(clock_drift_ppm=-1.0),
                   dict(reconnect_every_s=0.0), dict(clinic_id="bad clinic/"), dict(connections=99)]
    for override in bad_configs:
        kwargs: dict[str, object] = dict(mqtt_host="127.0.0.1", mqtt_port=1883, devices=3, duration_s=10)
        kwargs.update(override)
        with pytest.raises(InvalidParameterError) as info:
            FleetConfig(**kwargs)  # type: ignore[arg-type]
        assert isinstance(info.value, BpstreamError) and info.value.reason == "invalid_parameter"
    for args in ((0, 1.0), (3, -1.0), (3, float("inf"))):
        with pytest.raises(InvalidParameterError):
            simulate_cohort(args[0], args[1], seed=0)
    with pytest.raises(InvalidParameterError):
        simulate_cohort(2, 1, seed=-1)
    with pytest.raises(InvalidParameterError):
        FleetConfig("127.0.0.1", 1883, devices=3, duration_s=10, scenarios=("stage1",))


def test_the_noisy_sensor_is_seen_by_the_signal_quality_index() -> None:
    # The demo's noisy sensor must show up as poor windows, while a clean patient's windows all pass.
    from bpstream.shared.preprocessing import preprocess_windows
    from bpstream.simulators.cohort import build_cohort

    engine = build_cohort(["noisy", "normotensive"], 2, 11, 185.0).engine
    blocks = [engine.step(1.0) for _ in range(180)]
    ecg = np.concatenate([b.ecg for b in blocks], axis=1)
    ppg = np.concatenate([b.ppg for b in blocks], axis=1)
    poor = []
    for device in range(2):
        windows = [(np.stack([ecg[device, s:s + 1000], ppg[device, s:s + 1000]]), ("ecg", "ppg"), 125.0)
                   for s in range(0, ecg.shape[1] - 1000, 250)]
        poor.append(np.mean([not r.quality_ok for r in preprocess_windows(windows)]))  # type: ignore[union-attr]
    assert poor[0] >= 0.25, poor
    assert poor[1] == 0.0, poor
