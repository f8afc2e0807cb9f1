"""Hand-made pulse features of a prepared window, for the feature-model baseline.

Heart rate, pulse-arrival time (ECG R peak to PPG upslope) and PPG morphology from the window's ensemble-
averaged beat and its first and second derivatives: rise time, width at half height, the second-derivative
b/a and d/a ratios, the dicrotic share of the beat. These are the classic cuffless-BP features; the baseline
built on them says how much the network adds over them on the same folds.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

from bpstream.shared.modelspec import MODEL_SAMPLE_RATE

FEATURE_NAMES = ("hr", "pat", "rise_s", "width50_s", "b_a", "d_a", "late_area", "peak_slope", "beat_sd")


def _mean_beat(ppg: np.ndarray, fs: float) -> tuple[np.ndarray, float] | None:
    feet, _ = signal.find_peaks(-ppg, distance=int(0.33 * fs), prominence=0.3)
    if feet.size < 3:
        return None
    rr = np.diff(feet)
    period = int(np.median(rr))
    if period < int(0.27 * fs) or period > int(2.0 * fs):
        return None
    beats = [ppg[a:a + period] for a in feet[:-1] if a + period <= ppg.size]
    if len(beats) < 2:
        return None
    stack = np.stack(beats)
    return stack.mean(axis=0), float(np.mean(stack.std(axis=0)))


def window_features(window: np.ndarray, hr: float, pat: float, fs: float = MODEL_SAMPLE_RATE) -> np.ndarray:
    """The :data:`FEATURE_NAMES` of one prepared ``(2, T)`` window; NaN where a feature cannot be measured."""
    out = np.full(len(FEATURE_NAMES), np.nan)
    out[0], out[1] = hr, pat
    found = _mean_beat(np.asarray(window[1], dtype=np.float64), fs)
    if found is None:
        return out
    beat, beat_sd = found
    beat = beat - beat.min()
    top = float(beat.max())
    if top <= 0:
        return out
    beat /= top
    peak = int(np.argmax(beat))
    above = np.flatnonzero(beat >= 0.5)
    d1 = np.gradient(beat)
    d2 = np.gradient(d1)
    a_idx = int(np.argmax(d2[: max(peak, 1)])) if peak > 0 else 0
    a = float(d2[a_idx])
    after = d2[a_idx:]
    b = float(after.min()) if after.size else np.nan
    late = d2[peak:] if peak < d2.size else np.zeros(1)
    d = float(late.min()) if late.size else np.nan
    out[2] = peak / fs
    out[3] = (above[-1] - above[0]) / fs if above.size else np.nan
    out[4] = b / a if a > 1e-9 else np.nan
    out[5] = d / a if a > 1e-9 else np.nan
    out[6] = float(beat[peak:].sum() / max(beat.sum(), 1e-9))
    out[7] = float(d1.max())
    out[8] = beat_sd
    return out


def feature_matrix(x: np.ndarray, hr: np.ndarray, pat: np.ndarray) -> np.ndarray:
    """``(N, len(FEATURE_NAMES))`` for prepared windows ``x`` of shape ``(N, 2, T)``."""
    return np.stack([window_features(x[i], float(hr[i]), float(pat[i])) for i in range(len(x))]) \
        if len(x) else np.zeros((0, len(FEATURE_NAMES)))
