"""Readers for real recordings: the MIMIC-III 60 s windows in ``../shared/data/mimic3-windows``.

Each CSV has columns ``Time``, ``II`` (ECG lead II, mV), ``PLETH`` (PPG) and ``ABP`` (radial arterial
pressure, mmHg) in varying order, 125 Hz, with empty cells where the monitor had gaps. Columns are read by
name. Beat-level SBP/DBP come from the ABP wave after screening it for artefacts (flush, damping, pinned
values), as the data's PROVENANCE.md asks.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import signal

from bpstream.simulators.errors import DataFormatError

REQUIRED_COLUMNS = ("II", "PLETH", "ABP")
DEFAULT_MIMIC_DIR = Path(os.environ.get("BPSTREAM_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def mimic_dir() -> Path:
    """``../shared/data/mimic3-windows`` relative to the repository (or ``$BPSTREAM_DATA_DIR/mimic3-windows``)."""
    return DEFAULT_MIMIC_DIR / "mimic3-windows"


@dataclass(slots=True)
class RealRecord:
    name: str
    sample_rate: float
    ecg: np.ndarray  # float64, NaN in gaps
    ppg: np.ndarray
    abp: np.ndarray

    @property
    def gap_fraction(self) -> float:
        bad = ~(np.isfinite(self.ecg) & np.isfinite(self.ppg) & np.isfinite(self.abp))
        return float(bad.mean())


def read_mimic_columns(path: Path) -> dict[str, np.ndarray]:
    """The ``II``, ``PLETH`` and ``ABP`` columns of one window CSV (float64, keyed by column name).

    Columns are found by name because their order varies between files; empty or unparsable cells become NaN.
    This is the one MIMIC CSV parser: the replay, the calibration and ``bpstream.training.real_data`` all use it.
    """
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataFormatError(f"{path} is empty") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataFormatError(f"{path} lacks columns {missing} (has {header})")
        idx = [header.index(c) for c in REQUIRED_COLUMNS]
        cols: list[list[float]] = [[] for _ in REQUIRED_COLUMNS]
        for row in reader:
            for col, i in zip(cols, idx, strict=True):
                value = np.nan
                if i < len(row) and row[i].strip():
                    with contextlib.suppress(ValueError):
                        value = float(row[i])
                col.append(value)
    return {c: np.asarray(v, dtype=np.float64) for c, v in zip(REQUIRED_COLUMNS, cols, strict=True)}


def read_mimic_csv(path: Path, sample_rate: float = 125.0) -> RealRecord:
    """Read one window, columns by name; empty or unparsable cells become NaN."""
    path = Path(path)
    cols = read_mimic_columns(path)
    n = len(cols["ABP"])
    if n < sample_rate:
        raise DataFormatError(f"{path} holds {n} samples, less than one second")
    return RealRecord(path.stem, sample_rate, cols["II"], cols["PLETH"], cols["ABP"])


def list_mimic(directory: Path | None = None) -> list[Path]:
    """The CSV files of the MIMIC windows folder (``records/*.csv`` or ``*.csv``)."""
    d = Path(directory) if directory else mimic_dir()
    files = sorted((d / "records").glob("*.csv")) or sorted(d.glob("*.csv"))
    return files


def fill_short_gaps(x: np.ndarray, max_gap: int) -> np.ndarray:
    """Linearly interpolate NaN runs of at most ``max_gap`` samples; longer runs stay NaN."""
    x = np.array(x, dtype=float)
    bad = ~np.isfinite(x)
    if not bad.any() or bad.all():
        return x
    idx = np.arange(len(x))
    filled = np.interp(idx, idx[~bad], x[~bad])
    # run lengths of NaN stretches
    edges = np.diff(np.concatenate([[0], bad.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    for s, e in zip(starts, ends, strict=True):
        if e - s <= max_gap and s > 0 and e < len(x):
            x[s:e] = filled[s:e]
    return x


def abp_beats(abp: np.ndarray, fs: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Beat times (s, at the systolic peak), SBP and DBP from an arterial pressure wave, artefacts removed.

    A beat is kept when its SBP lies in 60-250, DBP in 25-150, pulse pressure 15-150 mmHg, and the wave around it
    is neither flat (pinned or zeroing) nor missing.
    """
    x = fill_short_gaps(abp, int(0.2 * fs))
    ok = np.isfinite(x)
    xf = np.where(ok, x, np.nanmedian(x) if ok.any() else 0.0)
    peaks, _ = signal.find_peaks(xf, distance=int(0.3 * fs), prominence=15)
    times, sbp, dbp = [], [], []
    for a, b in itertools.pairwise(peaks):
        seg = xf[a:b + 1]
        if not ok[a:b + 1].all():
            continue
        s, d = xf[b], seg.min()
        if 60 <= s <= 250 and 25 <= d <= 150 and 15 <= s - d <= 150 and np.ptp(seg) > 10:
            times.append(b / fs)
            sbp.append(s)
            dbp.append(d)
    return np.array(times), np.array(sbp), np.array(dbp)
