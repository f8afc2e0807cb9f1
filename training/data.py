"""Cut records (simulated or real) into labelled, preprocessed 8 s windows: the one input format of training,
validation, baselines and evaluation.

Every window goes through :func:`bpstream.shared.preprocessing.preprocess_window`, exactly as the stream
processor does. A window's label is the mean SBP/DBP of the beats inside it (windows without a valid beat are
dropped). Windows that fail the quality check are kept with ``quality_ok = False`` so callers can exclude them
from training and count them in reports, never score them silently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from scipy import signal

from bpstream.shared.modelspec import MODEL_CHANNELS, MODEL_SAMPLE_RATE, WINDOW_SAMPLES, WINDOW_SECONDS
from bpstream.shared.preprocessing import preprocess_window

#: Simulator labels that mean the signal itself is corrupted (used to score the SQI, not to train).
FAULT_LABELS = ("motion", "sensor_off", "dropout", "saturation")


def anomaly_label(sbp: np.ndarray, dbp: np.ndarray) -> np.ndarray:
    """Target of the anomaly head: pressure outside the normal-to-stage-1 range (stage 2, crisis, SBP < 90)."""
    return ((sbp >= 140.0) | (dbp >= 90.0) | (sbp < 90.0)).astype(np.float32)


@dataclass(slots=True)
class WindowSet:
    """Preprocessed windows with labels and provenance, all arrays aligned on the first axis."""

    x: np.ndarray  # float32 (N, 2, 1000)
    sbp: np.ndarray  # float32 (N,)
    dbp: np.ndarray  # float32 (N,)
    subject: np.ndarray  # str (N,)
    t_start: np.ndarray  # float64 (N,) seconds from record start
    quality_ok: np.ndarray  # bool (N,)
    sqi: np.ndarray  # float32 (N,) PPG SQI (0 when PPG absent)
    inputs: np.ndarray  # str (N,)
    fault: np.ndarray  # bool (N,) simulator says the signal is corrupted (False for real data)
    pat: np.ndarray  # float32 (N,) median pulse arrival time (s), NaN without ECG
    hr: np.ndarray  # float32 (N,) heart rate (bpm), NaN when unknown
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.sbp.shape[0])

    def subset(self, mask: np.ndarray) -> WindowSet:
        return WindowSet(self.x[mask], self.sbp[mask], self.dbp[mask], self.subject[mask], self.t_start[mask],
                         self.quality_ok[mask], self.sqi[mask], self.inputs[mask], self.fault[mask],
                         self.pat[mask], self.hr[mask], dict(self.info))

    @property
    def subjects(self) -> list[str]:
        return sorted(set(self.subject.tolist()))

    @property
    def anomaly(self) -> np.ndarray:
        return anomaly_label(self.sbp, self.dbp)

    def fingerprint(self) -> str:
        """A short hash of the labels and subject ids: identifies the training data in the model metadata."""
        h = hashlib.sha256()
        h.update("|".join(self.subject.tolist()).encode())
        h.update(np.ascontiguousarray(self.sbp).tobytes())
        h.update(np.ascontiguousarray(self.dbp).tobytes())
        h.update(np.ascontiguousarray(self.x[:, :, ::50]).tobytes())
        return h.hexdigest()[:16]

    @staticmethod
    def concat(sets: Sequence[WindowSet]) -> WindowSet:
        return WindowSet(*(np.concatenate([getattr(s, f) for s in sets]) for f in (
            "x", "sbp", "dbp", "subject", "t_start", "quality_ok", "sqi", "inputs", "fault", "pat", "hr")),
            info=dict(sets[0].info) if sets else {})


class RecordLike(Protocol):
    """What windowing needs of a record (``SimRecord`` and ``RealRecord`` adapt to it below)."""

    subject_id: str
    sample_rate: float
    beat_times_s: np.ndarray
    beat_sbp: np.ndarray
    beat_dbp: np.ndarray


def pulse_arrival_time(window: np.ndarray, fs: float = MODEL_SAMPLE_RATE) -> float:
    """Median delay (s) from each ECG R peak to the next PPG maximum upslope in a prepared window.

    NaN when the ECG channel is zeros (PPG only) or fewer than 3 beats pair up.
    """
    ecg, ppg = window[0], window[1]
    if not np.any(ecg):
        return float("nan")
    r, _ = signal.find_peaks(ecg, distance=int(0.3 * fs), height=max(1.5, float(np.percentile(ecg, 98)) * 0.5))
    slope = np.gradient(ppg)
    up, _ = signal.find_peaks(slope, distance=int(0.3 * fs), height=float(np.percentile(slope, 90)) * 0.5)
    if r.size < 3 or up.size < 3:
        return float("nan")
    j = np.searchsorted(up, r + int(0.05 * fs))
    ok = j < up.size
    d = (up[j[ok]] - r[ok]) / fs
    d = d[(d > 0.05) & (d < 1.0)]
    return float(np.median(d)) if d.size >= 3 else float("nan")


def _window_starts(duration_s: float, hop_s: float) -> np.ndarray:
    if duration_s < WINDOW_SECONDS:
        return np.zeros(0)
    return np.arange(0.0, duration_s - WINDOW_SECONDS + 1e-9, hop_s)


def windows_from_arrays(subject_id: str, channels: dict[str, np.ndarray], fs: float, beat_times_s: np.ndarray,
                        beat_sbp: np.ndarray, beat_dbp: np.ndarray, hop_s: float,
                        labels: np.ndarray | None = None, label_names: dict[int, str] | None = None,
                        single_reading: bool = False, min_beats: int = 3, robust_label: bool = False) -> WindowSet:
    """Window one record. ``labels`` (per sample, simulator) marks windows whose signal is corrupted.

    A window's pressure is the mean of its beats (the simulator's exact truth), or with ``robust_label`` the
    median (real arterial lines: one artefactual beat the screen let through cannot move it)."""
    stat = np.median if robust_label else np.mean
    names = tuple(n for n in MODEL_CHANNELS if n in channels)
    raw = np.stack([np.asarray(channels[n], dtype=np.float64) for n in names])
    n_win = round(WINDOW_SECONDS * fs)
    fault_codes = [c for c, n in (label_names or {}).items() if n in FAULT_LABELS]
    rows: dict[str, list[Any]] = {k: [] for k in ("x", "sbp", "dbp", "t", "ok", "sqi", "inputs", "fault",
                                                  "pat", "hr")}
    for t0 in _window_starts(raw.shape[1] / fs, hop_s):
        a = round(t0 * fs)
        if single_reading:
            sbp, dbp = float(np.mean(beat_sbp)), float(np.mean(beat_dbp))
        else:
            sel = (beat_times_s >= t0) & (beat_times_s < t0 + WINDOW_SECONDS)
            if sel.sum() < min_beats:
                continue
            sbp, dbp = float(stat(beat_sbp[sel])), float(stat(beat_dbp[sel]))
        prepared = preprocess_window(raw[:, a:a + n_win], names, fs)
        fault = False
        if labels is not None and fault_codes:
            fault = bool(np.isin(labels[a:a + n_win], fault_codes).mean() > 0.1)
        rows["x"].append(prepared.samples)
        rows["sbp"].append(sbp)
        rows["dbp"].append(dbp)
        rows["t"].append(t0)
        rows["ok"].append(prepared.quality_ok)
        rows["sqi"].append(prepared.sqi.get("ppg", 0.0))
        rows["inputs"].append(prepared.inputs)
        rows["fault"].append(fault)
        rows["pat"].append(pulse_arrival_time(prepared.samples) if prepared.quality_ok else np.nan)
        rows["hr"].append(np.nan if prepared.heart_rate_bpm is None else prepared.heart_rate_bpm)
    n = len(rows["sbp"])
    return WindowSet(
        x=np.asarray(rows["x"], dtype=np.float32).reshape(n, len(MODEL_CHANNELS), WINDOW_SAMPLES),
        sbp=np.asarray(rows["sbp"], dtype=np.float32), dbp=np.asarray(rows["dbp"], dtype=np.float32),
        subject=np.asarray([subject_id] * n, dtype=object).astype(str).reshape(n),
        t_start=np.asarray(rows["t"], dtype=np.float64), quality_ok=np.asarray(rows["ok"], dtype=bool),
        sqi=np.asarray(rows["sqi"], dtype=np.float32), inputs=np.asarray(rows["inputs"], dtype=str).reshape(n),
        fault=np.asarray(rows["fault"], dtype=bool), pat=np.asarray(rows["pat"], dtype=np.float32),
        hr=np.asarray(rows["hr"], dtype=np.float32))


def windows_from_sim(records: Iterable[Any], hop_s: float, label_names: dict[int, str] | None = None,
                     progress: bool = False) -> WindowSet:
    """Window simulator records (``bpstream.simulators.dataset.SimRecord``)."""
    recs = list(records)
    it: Iterable[Any] = recs
    if progress:
        from tqdm import tqdm

        it = tqdm(recs, desc="windows", unit="subject", leave=False)
    sets = [windows_from_arrays(r.subject_id, {"ecg": r.ecg, "ppg": r.ppg}, r.sample_rate, r.beat_times_s,
                                r.beat_sbp, r.beat_dbp, hop_s, labels=r.labels, label_names=label_names)
            for r in it]
    ws = WindowSet.concat(sets) if sets else _empty()
    ws.info["source"] = "simulated"
    return ws


def windows_from_real(records: Iterable[Any], hop_s: float) -> WindowSet:
    """Window real records (``bpstream.training.real_data.RealRecord``)."""
    sets = [windows_from_arrays(r.subject_id, r.channels, r.sample_rate, r.beat_times_s, r.beat_sbp,
                                r.beat_dbp, hop_s, single_reading=r.single_reading, robust_label=True)
            for r in records]
    ws = WindowSet.concat(sets) if sets else _empty()
    ws.info["source"] = "real"
    return ws


def screening_report(records: Sequence[Any], ws: WindowSet) -> dict[str, Any]:
    """What the arterial-line and signal screens rejected: beats by rule, windows, whole records."""
    beats: dict[str, int] = {}
    for r in records:
        for k, v in r.info.get("abp_screening", {}).items():
            beats[k] = beats.get(k, 0) + int(v)
    labelled = set(ws.subject.tolist())
    usable = set(ws.subject[ws.quality_ok].tolist())
    return {
        "records": len(records),
        "records_without_labelled_window": len(records) - len(labelled),
        "records_without_usable_window": len(records) - len(usable),
        "beats": beats,
        "windows_labelled": len(ws),
        "windows_failing_signal_quality": int((~ws.quality_ok).sum()),
    }


def _empty() -> WindowSet:
    z = np.zeros(0, dtype=np.float32)
    return WindowSet(np.zeros((0, len(MODEL_CHANNELS), WINDOW_SAMPLES), np.float32), z, z,
                     np.zeros(0, dtype=str), z.astype(np.float64), z.astype(bool), z, np.zeros(0, dtype=str),
                     z.astype(bool), z, z)


def detect_and_load(path: Path, hop_s: float = 2.0, progress: bool = False) -> tuple[str, WindowSet]:
    """Recognise a data folder (simulated dataset, mimic3-windows or ppg-bp) and window it.

    Returns the kind ("simulated", "mimic3", "ppg-bp") and the windows.
    """
    from bpstream.training.real_data import RealDataError, is_cinc2015, load_cinc2015, load_mimic3, load_ppg_bp

    path = Path(path)
    if (path / "manifest.json").is_file() or path.name == "manifest.json":
        from bpstream.simulators.dataset import load_dataset

        ds = load_dataset(path)
        ws = windows_from_sim(ds.records, hop_s, ds.label_names, progress=progress)
        ws.info.update(kind="simulated", meta=ds.meta)
        return "simulated", ws
    if is_cinc2015(path):
        records = load_cinc2015(path)
        ws = windows_from_real(records, hop_s)
        ws.info.update(kind="cinc2015", screening=screening_report(records, ws))
        return "cinc2015", ws
    if (path / "records").is_dir() or (any(path.glob("*.csv")) and not (path / "subjects.csv").is_file()):
        ws = windows_from_real(load_mimic3(path), hop_s)
        ws.info["kind"] = "mimic3"
        return "mimic3", ws
    if (path / "subjects.csv").is_file():
        ws = windows_from_real(load_ppg_bp(path), hop_s)
        ws.info["kind"] = "ppg-bp"
        return "ppg-bp", ws
    raise RealDataError(f"{path} is neither a simulated dataset (manifest.json), mimic3-windows (records/*.csv) "
                        "nor ppg-bp (subjects.csv + segments/)")
