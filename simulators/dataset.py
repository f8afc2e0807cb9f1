"""Training datasets: a cohort simulated for some minutes, written as one compressed ``.npz`` per subject plus a
``manifest.json``, and read back by ``load_dataset``.

Format (``format: bpstream-sim-dataset``, ``version: 1``)::

    DIR/manifest.json      {"format", "version", "sample_rate", "label_names", "meta", "subjects": [
                            {"subject_id", "file", "n_samples", "n_beats", "profile"}, ...]}
    DIR/<subject_id>.npz   ecg float32 [T] (mV, lead II), ppg float32 [T] (a.u.), labels int8 [T],
                           beat_times_s float64 [B] (R peaks from record start), beat_sbp/beat_dbp float32 [B]
                           (mmHg), beat_pat_s float32 [B] (true pulse arrival time), beat_type int8 [B]
                           (0 sinus, 1 premature ventricular, 2 atrial fibrillation)

The same ``(n_subjects, minutes, seed, scenarios)`` always gives the same arrays.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bpstream.simulators.cohort import GENERATOR_VERSION, build_cohort
from bpstream.simulators.engine import BEAT_AF, BEAT_NORMAL, BEAT_PVC
from bpstream.simulators.errors import DataFormatError, InvalidParameterError
from bpstream.simulators.scenarios import LABEL_NAMES

FORMAT = "bpstream-sim-dataset"
VERSION = 1
BEAT_TYPES = {BEAT_NORMAL: "sinus", BEAT_PVC: "premature_ventricular", BEAT_AF: "atrial_fibrillation"}
_EMPTY_F32 = np.zeros(0, dtype=np.float32)


@dataclass(slots=True)
class SimRecord:
    """One subject's record: signals, beat-level ground truth and per-sample labels."""

    subject_id: str
    sample_rate: float
    ecg: np.ndarray
    ppg: np.ndarray
    beat_times_s: np.ndarray
    beat_sbp: np.ndarray
    beat_dbp: np.ndarray
    labels: np.ndarray
    profile: dict[str, float | str]
    beat_pat_s: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    beat_type: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))

    @property
    def duration_s(self) -> float:
        return len(self.ecg) / self.sample_rate

    def truth_between(self, start_s: float, end_s: float) -> tuple[float, float]:
        """Mean true SBP/DBP of the beats whose R peak lies in ``[start_s, end_s)`` (NaN when none)."""
        sel = (self.beat_times_s >= start_s) & (self.beat_times_s < end_s)
        if not sel.any():
            return float("nan"), float("nan")
        return float(self.beat_sbp[sel].mean()), float(self.beat_dbp[sel].mean())


@dataclass(slots=True)
class SimDataset:
    records: list[SimRecord]
    label_names: dict[int, str]
    meta: dict[str, object]


def simulate_cohort(n_subjects: int, minutes: float, seed: int, scenarios: str | Sequence[str] = "training", *,
                    sample_rate: float = 125.0, block_s: float = 10.0) -> SimDataset:
    """Simulate ``n_subjects`` for ``minutes`` each (vectorised over subjects).

    ``scenarios`` is a scenario name, a mix name (``training`` by default, ``mixed``, ``clinic``) or one name
    per subject. Crisis and hypotension onsets are drawn within each record.
    """
    if not np.isfinite(minutes) or minutes <= 0 or minutes > 24 * 60:
        raise InvalidParameterError(f"minutes must be in (0, 1440], got {minutes}")
    duration = float(minutes) * 60.0
    cohort = build_cohort(scenarios, n_subjects, seed, duration, sample_rate=sample_rate, crisis_onset_s=None)
    eng = cohort.engine
    n = len(cohort.names)
    total = round(duration * sample_rate)
    step = max(1, round(block_s * sample_rate))
    ecg = np.empty((n, total), dtype=np.float32)
    ppg = np.empty((n, total), dtype=np.float32)
    labels = np.empty((n, total), dtype=np.int8)
    beats: list[tuple[np.ndarray, ...]] = []
    done = 0
    while done < total:
        k = min(step, total - done)
        block = eng.step(k / sample_rate)
        ecg[:, done:done + k], ppg[:, done:done + k], labels[:, done:done + k] = block.ecg, block.ppg, block.labels
        beats.append((block.beat_device, block.beat_time, block.beat_sbp, block.beat_dbp, block.beat_pat,
                      block.beat_type))
        done += k
    dev, bt, sbp, dbp, pat, btype = (np.concatenate(parts) for parts in zip(*beats, strict=True))
    order = np.lexsort((bt, dev))
    dev, bt, sbp, dbp, pat, btype = dev[order], bt[order], sbp[order], dbp[order], pat[order], btype[order]
    bounds = np.searchsorted(dev, np.arange(n + 1))
    width = max(3, len(str(n - 1)))
    records = []
    for i in range(n):
        sl = slice(bounds[i], bounds[i + 1])
        records.append(SimRecord(
            subject_id=f"sim-{seed}-{i:0{width}d}", sample_rate=float(sample_rate), ecg=ecg[i], ppg=ppg[i],
            beat_times_s=bt[sl].astype(np.float64), beat_sbp=sbp[sl].astype(np.float32),
            beat_dbp=dbp[sl].astype(np.float32), labels=labels[i],
            profile=cohort.profiles.as_dict(i, cohort.names[i]),
            beat_pat_s=pat[sl].astype(np.float32), beat_type=btype[sl].astype(np.int8)))
    meta: dict[str, object] = {"seed": int(seed), "generator": GENERATOR_VERSION, "n_subjects": n,
                               "minutes": float(minutes), "sample_rate": float(sample_rate),
                               "scenarios": scenarios if isinstance(scenarios, str) else list(scenarios),
                               "beat_types": {str(k): v for k, v in BEAT_TYPES.items()}}
    return SimDataset(records=records, label_names=dict(LABEL_NAMES), meta=meta)


def write_dataset(ds: SimDataset, out_dir: Path) -> None:
    """Write ``manifest.json`` and one compressed ``.npz`` per subject into ``out_dir`` (created if needed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subjects = []
    for rec in ds.records:
        fname = f"{rec.subject_id}.npz"
        np.savez_compressed(out_dir / fname, ecg=rec.ecg.astype(np.float32), ppg=rec.ppg.astype(np.float32),
                            labels=rec.labels.astype(np.int8), beat_times_s=rec.beat_times_s.astype(np.float64),
                            beat_sbp=rec.beat_sbp.astype(np.float32), beat_dbp=rec.beat_dbp.astype(np.float32),
                            beat_pat_s=rec.beat_pat_s.astype(np.float32), beat_type=rec.beat_type.astype(np.int8))
        subjects.append({"subject_id": rec.subject_id, "file": fname, "sample_rate": rec.sample_rate,
                         "n_samples": len(rec.ecg), "n_beats": len(rec.beat_times_s), "profile": rec.profile})
    manifest = {"format": FORMAT, "version": VERSION, "label_names": {str(k): v for k, v in ds.label_names.items()},
                "meta": ds.meta, "subjects": subjects}
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out_dir / "manifest.json")


def load_dataset(path: Path) -> SimDataset:
    """Read a dataset written by ``write_dataset`` (``path`` is its folder or its ``manifest.json``)."""
    path = Path(path)
    manifest_path = path / "manifest.json" if path.is_dir() else path
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise DataFormatError(f"no simulator dataset at {path}: {manifest_path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataFormatError(f"{manifest_path} is not a {FORMAT} v{VERSION} manifest")
    root = manifest_path.parent
    records = []
    for subj in manifest["subjects"]:
        try:
            with np.load(root / subj["file"]) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError) as exc:
            raise DataFormatError(f"cannot read {root / subj['file']}: {exc}") from exc
        missing = {"ecg", "ppg", "labels", "beat_times_s", "beat_sbp", "beat_dbp"} - set(arrays)
        if missing:
            raise DataFormatError(f"{subj['file']} lacks arrays {sorted(missing)}")
        if len(arrays["ecg"]) != subj["n_samples"] or len(arrays["beat_times_s"]) != subj["n_beats"]:
            raise DataFormatError(f"{subj['file']} does not match its manifest entry (truncated?)")
        records.append(SimRecord(
            subject_id=subj["subject_id"], sample_rate=float(subj["sample_rate"]), ecg=arrays["ecg"],
            ppg=arrays["ppg"], beat_times_s=arrays["beat_times_s"], beat_sbp=arrays["beat_sbp"],
            beat_dbp=arrays["beat_dbp"], labels=arrays["labels"], profile=subj["profile"],
            beat_pat_s=arrays.get("beat_pat_s", _EMPTY_F32),
            beat_type=arrays.get("beat_type", np.zeros(0, dtype=np.int8))))
    labels = {int(k): v for k, v in manifest["label_names"].items()}
    return SimDataset(records=records, label_names=labels, meta=manifest["meta"])
