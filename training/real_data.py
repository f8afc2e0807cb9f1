"""Readers for the real recordings in ``../shared/data`` (never copied into the repository).

* ``mimic3-windows``: 60 s ICU records at 125 Hz, columns Time, II (ECG), PLETH (PPG), ABP in varying order,
  with empty cells (gaps), parsed by the simulator's reader (``bpstream.simulators.realdata``). Beat-to-beat
  SBP/DBP come from the ABP waveform after artefact screening (:func:`abp_beats`).
* ``cinc2015``: 5-5.5 min ICU bedside-monitor records at 250 Hz in WFDB format (``records/*.hea`` + ``*.mat``,
  ``RECORDS``), read with the ``wfdb`` package and resampled to 125 Hz; ECG lead II, PLETH and ABP. Seconds
  from :data:`CINC_USABLE_S` on are cut (the arrhythmia alarm at 300 s, and the arrhythmia before it).
* ``ppg-bp``: one 2.1 s fingertip PPG segment per subject at 1 kHz with a cuff reading. The model needs 8 s,
  so the segment is cut to whole beats (foot to foot) and those beats are repeated; this is stated in every
  report, because a repeated 2 s excerpt is not a real 8 s recording.

Both produce :class:`RealRecord` objects that :mod:`bpstream.training.data` windows like simulated records.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import signal

from bpstream.shared.errors import BpstreamError
from bpstream.shared.modelspec import WINDOW_SECONDS
from bpstream.simulators.errors import DataFormatError
from bpstream.simulators.realdata import read_mimic_columns

#: Where the real data lives relative to the repository root (``../shared/data``).
DEFAULT_REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MIMIC_FS = 125.0
PPGBP_FS = 1000.0


class RealDataError(BpstreamError):
    """A real-data folder that is missing or not in the documented format."""

    reason = "real_data"


@dataclass(slots=True)
class RealRecord:
    """One real recording: channels at ``sample_rate``, beat-level labels (or one reading for the record)."""

    subject_id: str
    sample_rate: float
    channels: dict[str, np.ndarray]
    beat_times_s: np.ndarray
    beat_sbp: np.ndarray
    beat_dbp: np.ndarray
    #: True when the pressure is one cuff reading for the whole record (PPG-BP), not beat-to-beat.
    single_reading: bool = False
    info: dict[str, object] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return len(next(iter(self.channels.values()))) / self.sample_rate


def _read_mimic_columns(path: Path) -> dict[str, np.ndarray]:
    """The simulator's MIMIC CSV parser, with its format errors reported as this module's ``RealDataError``."""
    try:
        return read_mimic_columns(path)
    except DataFormatError as exc:
        raise RealDataError(str(exc)) from exc


def abp_beats(abp: np.ndarray, fs: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Beat-to-beat (time of systolic peak, SBP, DBP) from an arterial pressure waveform, artefacts removed.

    Screening (each beat is dropped with a counted reason): gaps (NaN) inside the beat; flush or zeroing
    (values outside 20-300 mmHg or a flat beat); damping (pulse pressure < 15 mmHg) or implausible values
    (SBP outside 60-250, DBP outside 20-150, PP > 150); values pinned at the top of the range (several equal
    samples at the peak); and beats whose SBP jumps more than 30 mmHg from the median of their neighbours.
    """
    counts = {"beats": 0, "gap": 0, "range": 0, "damped": 0, "pinned": 0, "jump": 0}
    x = np.asarray(abp, dtype=np.float64)
    finite = np.isfinite(x)
    if finite.sum() < fs * 2:
        return np.zeros(0), np.zeros(0), np.zeros(0), counts
    filled = x.copy()
    idx = np.arange(x.size)
    filled[~finite] = np.interp(idx[~finite], idx[finite], x[finite])
    smooth = signal.savgol_filter(filled, 7, 2)
    peaks, _ = signal.find_peaks(smooth, distance=int(0.3 * fs), prominence=10.0)
    times, sbps, dbps = [], [], []
    for a, b in itertools.pairwise(peaks):
        counts["beats"] += 1
        seg = x[a:b + 1]
        if not np.isfinite(seg).all():
            counts["gap"] += 1
            continue
        sbp, dbp = float(x[a]), float(seg.min())
        if seg.max() > 300 or seg.min() < 20 or not (60 <= sbp <= 250 and 20 <= dbp <= 150):
            counts["range"] += 1
            continue
        if sbp - dbp < 15 or sbp - dbp > 150:
            counts["damped"] += 1
            continue
        top = x[max(0, a - 3):a + 4]
        if np.sum(np.abs(top - sbp) < 1e-6) >= 4:
            counts["pinned"] += 1
            continue
        times.append(a / fs)
        sbps.append(sbp)
        dbps.append(dbp)
    t, s, d = np.asarray(times), np.asarray(sbps), np.asarray(dbps)
    if s.size >= 5:
        med = signal.medfilt(s, 5)
        ok = np.abs(s - med) <= 30.0
        counts["jump"] = int((~ok).sum())
        t, s, d = t[ok], s[ok], d[ok]
    return t, s, d, counts


def load_mimic3(folder: Path) -> list[RealRecord]:
    """All records of ``mimic3-windows`` (``folder`` holds ``records/*.csv``)."""
    folder = Path(folder)
    rec_dir = folder / "records" if (folder / "records").is_dir() else folder
    files = sorted(rec_dir.glob("*.csv"))
    if not files:
        raise RealDataError(f"no MIMIC-III window CSVs in {rec_dir}")
    out = []
    for path in files:
        cols = _read_mimic_columns(path)
        t, s, d, counts = abp_beats(cols["ABP"], MIMIC_FS)
        gaps = {k: float(np.mean(~np.isfinite(v))) for k, v in cols.items()}
        out.append(RealRecord(subject_id=f"mimic3-{path.stem}", sample_rate=MIMIC_FS,
                              channels={"ecg": cols["II"], "ppg": cols["PLETH"]}, beat_times_s=t,
                              beat_sbp=s, beat_dbp=d, info={"abp_screening": counts, "gap_fraction": gaps}))
    return out


#: cinc2015: only the part of a record before the alarm (at 300 s) and the arrhythmia leading up to it is used.
CINC_USABLE_S = 295.0
CINC_FS = 250.0


def is_cinc2015(folder: Path) -> bool:
    """A folder in the cinc2015 layout: ``RECORDS`` and WFDB headers in ``records/``."""
    folder = Path(folder)
    return (folder / "RECORDS").is_file() and any((folder / "records").glob("*.hea"))


def load_cinc2015(folder: Path, names: list[str] | None = None) -> list[RealRecord]:
    """The cinc2015 records (those with ECG II, PLETH and ABP), ECG and PPG at 125 Hz, beats from the ABP.

    A record is returned even when its arterial line is unusable (no beats): windowing then labels nothing,
    and the caller counts it as rejected. ``info`` holds the ABP screen's counts and the NaN fractions.
    """
    import wfdb

    folder = Path(folder)
    if not is_cinc2015(folder):
        raise RealDataError(f"{folder} is not a cinc2015 folder (RECORDS and records/*.hea)")
    names = names or [n.strip() for n in (folder / "RECORDS").read_text().split() if n.strip()]
    out = []
    for name in names:
        try:
            rec = wfdb.rdrecord(str(folder / "records" / name))
        except (OSError, ValueError) as exc:
            raise RealDataError(f"cannot read cinc2015 record {name}: {exc}") from exc
        cols = {s: rec.p_signal[: int(CINC_USABLE_S * rec.fs), i] for i, s in enumerate(rec.sig_name)}
        if not {"II", "PLETH", "ABP"} <= cols.keys() or float(rec.fs) != CINC_FS:
            continue
        t, s, d, counts = abp_beats(cols["ABP"], CINC_FS)
        channels = {"ecg": _half_rate(cols["II"]), "ppg": _half_rate(cols["PLETH"])}
        gaps = {k: float(np.mean(~np.isfinite(v))) for k, v in cols.items()}
        out.append(RealRecord(subject_id=f"cinc-{name}", sample_rate=CINC_FS / 2, channels=channels,
                              beat_times_s=t, beat_sbp=s, beat_dbp=d,
                              info={"abp_screening": counts, "gap_fraction": gaps}))
    if not out:
        raise RealDataError(f"no cinc2015 record with ECG II, PLETH and ABP in {folder}")
    return out


def _half_rate(x: np.ndarray) -> np.ndarray:
    """250 -> 125 Hz with an anti-alias FIR; NaN stretches (lost signal) stay NaN in the output."""
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.full(x.size // 2, np.nan)
    filled = np.where(finite, x, np.interp(np.arange(x.size), np.flatnonzero(finite), x[finite]))
    y = signal.resample_poly(filled, 1, 2)
    n2 = min(y.size, x.size // 2)
    lost = ~finite[: 2 * n2].reshape(-1, 2).all(axis=1)
    y[:n2][lost] = np.nan
    return y


def _whole_beats(ppg: np.ndarray, fs: float) -> np.ndarray:
    """The part of a PPG segment from its first pulse foot to its last one (so copies join smoothly)."""
    feet, _ = signal.find_peaks(-ppg, distance=int(0.33 * fs), prominence=0.1 * float(np.ptp(ppg)) + 1e-12)
    if feet.size < 2:
        return ppg
    return ppg[feet[0]:feet[-1]]


def load_ppg_bp(folder: Path) -> list[RealRecord]:
    """One record per labelled PPG-BP subject: the chosen segment, whole beats repeated to 8 s."""
    folder = Path(folder)
    table = folder / "subjects.csv"
    if not table.is_file():
        raise RealDataError(f"no subjects.csv in {folder}")
    with table.open(newline="") as fh:
        rows = {row["subject_id"].strip(): row for row in csv.DictReader(fh)}
    chosen: dict[str, str] = {}
    opt = folder / "optimal_segments.txt"
    if opt.is_file():
        for line in opt.read_text().split():
            # e.g. "2_1" style entries naming the chosen segment file
            stem = line.strip().strip(",").removesuffix(".txt")
            if "_" in stem:
                chosen.setdefault(stem.split("_")[0], stem)
    out = []
    for path in sorted((folder / "segments").glob("*.txt")):
        sid = path.stem.split("_")[0]
        if sid not in rows or (sid in chosen and chosen[sid] != path.stem and
                               (folder / "segments" / f"{chosen[sid]}.txt").is_file()):
            continue
        if any(r.subject_id == f"ppgbp-{sid}" for r in out):
            continue
        text = path.read_text().replace("\t", ",").replace("\n", ",")
        values = np.asarray([float(v) for v in text.split(",") if v.strip()], dtype=np.float64)
        if values.size < PPGBP_FS:  # empty or truncated segment (3_3.txt is empty)
            continue
        values = values[: int(2.1 * PPGBP_FS)]  # 231_2.txt holds two segments: keep the first
        beats = _whole_beats(values, PPGBP_FS)
        reps = int(np.ceil(WINDOW_SECONDS * PPGBP_FS / max(beats.size, 1))) + 1
        ppg = np.tile(beats, reps)[: int(WINDOW_SECONDS * PPGBP_FS)]
        row = rows[sid]
        try:
            sbp, dbp = float(row["sbp_mmhg"]), float(row["dbp_mmhg"])
        except (KeyError, ValueError):
            continue
        out.append(RealRecord(subject_id=f"ppgbp-{sid}", sample_rate=PPGBP_FS, channels={"ppg": ppg},
                              beat_times_s=np.asarray([WINDOW_SECONDS / 2]), beat_sbp=np.asarray([sbp]),
                              beat_dbp=np.asarray([dbp]), single_reading=True,
                              info={"stage": row.get("hypertension", ""), "segment": path.stem,
                                    "beats_repeated_s": round(beats.size / PPGBP_FS, 3)}))
    if not out:
        raise RealDataError(f"no usable PPG-BP segments in {folder / 'segments'}")
    return out
