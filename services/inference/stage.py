"""Inference's pure stage: decoded windows -> model batch -> estimates. No Kafka, no clock of its own.

Windows the processor flagged ``quality_ok = False`` (no usable PPG) are not scored, but they are not
dropped either: each yields an *unscored* Estimate (``quality_ok = False``, ``inputs = "none"``, pressures
and SDs 0.0 as placeholders because the JSON contract has no NaN) so the gap is visible downstream; the
writer stores such estimates without pressure fields and the alert detector ignores them.
Windows that do not match the model's input contract (channels, rate, length, finite values) are rejected
with a reason for the dead-letter topic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from bpstream.shared.messages import Estimate, Window
from bpstream.shared.model.runtime import Predictions


@dataclass(slots=True, frozen=True)
class InputSpec:
    """The model's input contract, read from the loaded artefact's metadata."""

    channels: tuple[str, ...]
    sample_rate: float
    n_samples: int


@dataclass(slots=True, frozen=True)
class Rejected:
    """A window that cannot be scored nor flagged: it goes to the dead-letter topic."""

    index: int
    reason: str
    detail: str


@dataclass(slots=True)
class PreparedBatch:
    """Windows split into the model batch and the unscored ones, with rejections."""

    scored: list[Window] = field(default_factory=list)
    inputs: npt.NDArray[np.float32] | None = None
    unscored: list[Window] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def check_window(window: Window, spec: InputSpec) -> tuple[str, str] | None:
    """``(reason, detail)`` when the window breaks the model's input contract, else None."""
    if tuple(window.channels) != spec.channels:
        return "channel_mismatch", f"window channels {window.channels} != model channels {spec.channels}"
    if abs(window.sample_rate - spec.sample_rate) > 1e-6:
        return "sample_rate_mismatch", f"window at {window.sample_rate} Hz, model expects {spec.sample_rate} Hz"
    if window.n_samples != spec.n_samples:
        return "length_mismatch", f"window of {window.n_samples} samples, model expects {spec.n_samples}"
    if window.end_ns <= window.start_ns:
        return "bad_window_time", "window end is not after its start"
    return None


def prepare_batch(windows: Sequence[Window], spec: InputSpec) -> PreparedBatch:
    """Split windows into scored (stacked into one float32 array), unscored and rejected."""
    out = PreparedBatch()
    arrays: list[npt.NDArray[np.float32]] = []
    for index, window in enumerate(windows):
        problem = check_window(window, spec)
        if problem is not None:
            out.rejected.append(Rejected(index, *problem))
            continue
        if not window.quality_ok:
            out.unscored.append(window)
            continue
        samples = window.array()
        if not np.isfinite(samples).all():
            out.rejected.append(Rejected(index, "non_finite", "window samples contain NaN or inf"))
            continue
        out.scored.append(window)
        arrays.append(samples)
    if arrays:
        out.inputs = np.stack(arrays).astype(np.float32, copy=False)
    return out


def _used_channels(window: Window, samples: npt.NDArray[np.float32]) -> list[str]:
    # Preprocessing zeroes a channel it could not use (the model was trained with ECG dropped out).
    return [name for row, name in enumerate(window.channels) if np.any(samples[row])]


def scored_estimate(window: Window, index: int, predictions: Predictions, model_version: str,
                    estimated_ns: int) -> Estimate:
    """The Estimate of the ``index``-th scored window of a batch."""
    samples = window.array()
    used = _used_channels(window, samples)
    sqi = min((window.sqi.get(name, 0.0) for name in used), default=0.0)
    return Estimate(clinic_id=window.clinic_id, device_id=window.device_id, window_start_ns=window.start_ns,
                    window_end_ns=window.end_ns, sbp=round(float(predictions.sbp[index]), 2),
                    dbp=round(float(predictions.dbp[index]), 2),
                    sbp_sd=round(float(predictions.sbp_sd[index]), 2),
                    dbp_sd=round(float(predictions.dbp_sd[index]), 2),
                    anomaly_prob=round(float(predictions.anomaly_prob[index]), 4), sqi=round(float(sqi), 4),
                    quality_ok=True, inputs="+".join(used) if used else "none", model_version=model_version,
                    received_ns=window.received_ns, estimated_ns=estimated_ns)


def unscored_estimate(window: Window, model_version: str, estimated_ns: int) -> Estimate:
    """A quality-flagged placeholder for a window too poor to score (pressures are not estimates)."""
    return Estimate(clinic_id=window.clinic_id, device_id=window.device_id, window_start_ns=window.start_ns,
                    window_end_ns=window.end_ns, sbp=0.0, dbp=0.0, sbp_sd=0.0, dbp_sd=0.0, anomaly_prob=0.0,
                    sqi=round(float(window.sqi.get("ppg", 0.0)), 4), quality_ok=False, inputs="none",
                    model_version=model_version, received_ns=window.received_ns, estimated_ns=estimated_ns)


def estimates_for(batch: PreparedBatch, predictions: Predictions | None, model_version: str,
                  clock_ns: Callable[[], int]) -> list[Estimate]:
    """Every estimate of a batch: ``predictions`` (the model's output for ``batch.inputs``) and unscored ones."""
    estimates: list[Estimate] = []
    if batch.inputs is not None:
        if predictions is None or len(predictions.sbp) != len(batch.scored):
            raise ValueError("predictions do not match the batch's scored windows")
        now = clock_ns()
        estimates.extend(scored_estimate(w, i, predictions, model_version, now)
                         for i, w in enumerate(batch.scored))
    now = clock_ns()
    estimates.extend(unscored_estimate(w, model_version, now) for w in batch.unscored)
    return estimates
