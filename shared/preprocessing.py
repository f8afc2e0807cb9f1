"""Window preprocessing shared by training and the stream processor: resample, band-pass, normalise, SQI.

One function, :func:`preprocess_window`, turns a raw ``(C, N)`` window of any subset of ``("ecg", "ppg")`` at
any sample rate into the model's input: float32 ``(2, 1000)`` in ``MODEL_CHANNELS`` order at 125 Hz, band-pass
filtered with a zero-phase Butterworth filter (reflection-padded, so it is applied to the whole window offline),
z-scored per channel, plus a signal-quality index per channel present. Training and the processor call the same
function, so the model never sees an input prepared differently from the one it was trained on.

The SQI (0 = unusable, 1 = clean) combines the checks that catch what wearables really produce:

* flat line / sensor off: almost no variance, or most consecutive samples identical;
* clipping: many samples pinned at the window's minimum or maximum;
* heavy motion noise: the filtered signal is not periodic (weak autocorrelation at the beat period) or most of
  the raw power is outside the physiological band;
* implausible heart rate: the dominant period is outside 30-220 bpm.

A missing channel (or an ECG too poor to use) is all zeros and listed in ``missing``; the model was trained with
ECG dropped out, so a PPG-only window is a valid input (``inputs == "ppg"``). A window without usable PPG is
flagged ``quality_ok = False`` and must not be scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import signal

from bpstream.shared.errors import BpstreamError
from bpstream.shared.modelspec import MODEL_CHANNELS, MODEL_SAMPLE_RATE, WINDOW_SAMPLES

#: Band-pass edges (Hz) per channel.
BANDS: Final[dict[str, tuple[float, float]]] = {"ecg": (0.5, 40.0), "ppg": (0.5, 8.0)}
FILTER_ORDER: Final = 4
#: Heart-rate range (bpm) a window must show to be plausible.
HR_MIN_BPM: Final = 30.0
HR_MAX_BPM: Final = 220.0
#: A channel whose SQI is below this is not used.
SQI_THRESHOLD: Final = 0.5
#: Normalised samples are clipped to +/- this many SDs so one spike cannot dominate a window.
NORM_CLIP: Final = 8.0
#: Windows may be at most this far from the nominal length (fraction) before being rejected.
LENGTH_TOLERANCE: Final = 0.1
#: More than this fraction of missing (NaN) samples in a channel makes it unusable.
MAX_GAP_FRACTION: Final = 0.1
PREPROCESSING_VERSION: Final = "1"


class PreprocessError(BpstreamError):
    """A window that cannot be prepared at all (wrong shape, unknown channel, far too short or long)."""

    reason = "bad_window"


@dataclass(slots=True, frozen=True)
class PreparedWindow:
    """The model's input for one window and what we know about its quality."""

    #: float32 ``(2, WINDOW_SAMPLES)`` in ``MODEL_CHANNELS`` order; missing or unusable channels are zeros.
    samples: npt.NDArray[np.float32]
    #: SQI in [0, 1] for each channel that was present in the raw window.
    sqi: dict[str, float]
    #: True when the window may be scored (PPG present and good enough).
    quality_ok: bool
    #: "ecg+ppg" when both channels are used, "ppg" when only PPG is, "none" when the window is unusable.
    inputs: str
    #: Model channels set to zeros (absent from the raw window or too poor to use).
    missing: tuple[str, ...] = ()
    #: Heart rate estimated from the best channel, or None when no periodicity was found.
    heart_rate_bpm: float | None = None
    #: Why the window is not usable (empty when ``quality_ok``).
    problems: tuple[str, ...] = field(default=())


def preprocessing_parameters() -> dict[str, object]:
    """The parameters an exported model records, so a consumer can check it prepares windows the same way."""
    return {
        "version": PREPROCESSING_VERSION,
        "sample_rate": MODEL_SAMPLE_RATE,
        "window_samples": WINDOW_SAMPLES,
        "channels": list(MODEL_CHANNELS),
        "bands_hz": {k: list(v) for k, v in BANDS.items()},
        "filter": f"butterworth order {FILTER_ORDER}, zero-phase (sosfiltfilt), odd-reflection padding",
        "normalisation": f"per-window per-channel z-score, clipped to +/-{NORM_CLIP}",
        "sqi_threshold": SQI_THRESHOLD,
        "hr_range_bpm": [HR_MIN_BPM, HR_MAX_BPM],
    }


def resample(x: npt.ArrayLike, fs_in: float, fs_out: float) -> npt.NDArray[np.float64]:
    """Resample along the last axis from ``fs_in`` to ``fs_out`` Hz (polyphase, anti-aliased).

    The output has ``round(n * fs_out / fs_in)`` samples.
    """
    arr = np.asarray(x, dtype=np.float64)
    if not (np.isfinite(fs_in) and np.isfinite(fs_out) and fs_in > 0 and fs_out > 0):
        raise PreprocessError(f"sample rates must be positive, got {fs_in} -> {fs_out}", reason="bad_sample_rate")
    n_out = round(arr.shape[-1] * fs_out / fs_in)
    if fs_in == fs_out:
        return arr.copy()
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    out = signal.resample_poly(arr, ratio.numerator, ratio.denominator, axis=-1, padtype="line")
    return _fit_length(np.asarray(out, dtype=np.float64), n_out)


def _fit_length(x: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.float64]:
    """Crop or edge-pad the last axis to exactly ``n`` samples."""
    if x.shape[-1] == n:
        return x
    if x.shape[-1] > n:
        return x[..., :n]
    pad = [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])]
    return np.pad(x, pad, mode="edge")


@lru_cache(maxsize=8)
def _bandpass(channel: str, fs: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Second-order sections of the channel's band-pass and their step-response initial state."""
    low, high = BANDS[channel]
    high = min(high, 0.45 * fs)
    sos: npt.NDArray[np.float64] = signal.butter(FILTER_ORDER, [low, high], btype="bandpass", fs=fs, output="sos")
    zi: npt.NDArray[np.float64] = signal.sosfilt_zi(sos)
    return sos, zi


def bandpass(x: npt.ArrayLike, channel: str, fs: float = MODEL_SAMPLE_RATE) -> npt.NDArray[np.float64]:
    """Zero-phase band-pass of one 1-D channel, odd-reflection padded so the window edges do not ring.

    Same result as ``scipy.signal.sosfiltfilt(..., padtype="odd")``, with the filter's initial state cached
    (scipy recomputes it on every call, which was a third of the per-window cost).
    """
    arr = np.asarray(x, dtype=np.float64)
    sos, zi = _bandpass(channel, fs)
    pad = min(arr.shape[-1] - 1, int(3 * fs))
    ext = np.concatenate([2 * arr[0] - arr[pad:0:-1], arr, 2 * arr[-1] - arr[-2:-pad - 2:-1]])
    fwd, _ = signal.sosfilt(sos, ext, zi=zi * ext[0])
    back, _ = signal.sosfilt(sos, fwd[::-1], zi=zi * fwd[-1])
    out: npt.NDArray[np.float64] = back[::-1][pad:pad + arr.shape[-1]]
    return out


def _fill_gaps(x: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], float]:
    """Linearly interpolate NaN/inf samples; return the filled signal and the fraction that was missing."""
    bad = ~np.isfinite(x)
    frac = float(bad.mean())
    if frac == 0.0:
        return x, 0.0
    if frac == 1.0:
        return np.zeros_like(x), 1.0
    idx = np.arange(x.size)
    filled = x.copy()
    filled[bad] = np.interp(idx[bad], idx[~bad], x[~bad])
    return filled, frac


def _periodicity(x: npt.NDArray[np.float64], fs: float) -> tuple[float, float | None]:
    """Strength (0-1) of the dominant beat period in [HR_MIN, HR_MAX] and the heart rate it implies.

    Uses the normalised autocorrelation; the first clear peak inside the plausible lag range is taken, so a
    clean pulse train gives a value near 1 and noise gives a value near 0.
    """
    x = x - x.mean()
    energy = float(np.dot(x, x))
    if energy <= 0.0:
        return 0.0, None
    n = x.size
    spec = np.fft.rfft(x, 2 * n)
    ac = np.fft.irfft(spec * np.conj(spec))[:n] / energy
    # Unbiased correction so long lags are not penalised for having fewer overlapping samples.
    ac = ac * n / np.maximum(n - np.arange(n), 1)
    # Search down to lags of 1.5x the highest plausible rate, so a too-fast rhythm is seen as such and not
    # mistaken for its own second multiple.
    lo = int(fs * 60.0 / (1.5 * HR_MAX_BPM))
    hi = min(n // 2, int(fs * 60.0 / HR_MIN_BPM * 1.1) + 1)
    lo = max(lo, 1)
    if hi <= lo + 2:
        return 0.0, None
    seg = ac[lo:hi]
    peaks, _ = signal.find_peaks(seg)
    if peaks.size == 0:
        return 0.0, None
    best = float(seg[peaks].max())
    # The first peak within 60% of the best one is the fundamental (not a multiple of the period).
    first = int(peaks[np.argmax(seg[peaks] >= 0.6 * best)])
    lag = lo + first
    hr = 60.0 * fs / lag
    return float(np.clip(best, 0.0, 1.0)), hr


def _envelope(x: npt.NDArray[np.float64], fs: float) -> npt.NDArray[np.float64]:
    """A smooth energy envelope of the ECG whose period is the RR interval (QRS complexes dominate)."""
    d = np.diff(x, prepend=x[0]) ** 2
    k = max(1, int(0.08 * fs))
    return np.convolve(d, np.ones(k) / k, mode="same")


def _detrend(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Remove the least-squares line (closed form: cheaper than scipy's general detrend)."""
    t = np.arange(x.size, dtype=np.float64) - (x.size - 1) / 2.0
    slope = float(np.dot(t, x) / np.dot(t, t)) if x.size > 1 else 0.0
    out: npt.NDArray[np.float64] = x - x.mean() - slope * t
    return out


def _saturation(native: npt.NDArray[np.float64], channel: str) -> tuple[float, list[str]]:
    """Flat-line and clipping checks on the samples at their native rate (resampling would hide plateaus).

    Returns a score in [0, 1] (0 for a flat line) and the names of the failed checks.
    """
    spread = float(np.ptp(native))
    sd = float(native.std())
    if spread == 0.0 or sd < 1e-6 * max(1.0, float(np.abs(native).mean())):
        return 0.0, [f"{channel}_flat"]
    same = float(np.mean(np.abs(np.diff(native)) <= 1e-9 * spread))
    if same > 0.5:
        return 0.0, [f"{channel}_flat"]
    # Clipping: samples within 0.5% of the range from either extreme. A clean beat spends little time there.
    tol = 0.005 * spread
    pinned = float(np.mean(native >= native.max() - tol) + np.mean(native <= native.min() + tol))
    score = float(np.clip(1.0 - (pinned - 0.04) / 0.11, 0.0, 1.0))
    return score, ([f"{channel}_clipping"] if score < 1.0 else [])


def channel_sqi(raw: npt.NDArray[np.float64], filtered: npt.NDArray[np.float64], channel: str,
                fs: float = MODEL_SAMPLE_RATE, native: npt.NDArray[np.float64] | None = None,
                ) -> tuple[float, float | None, list[str]]:
    """SQI in [0, 1] of one channel, the heart rate it shows, and the names of the checks it failed.

    ``raw`` and ``filtered`` are at ``fs``; ``native`` is the channel at its original rate (defaults to ``raw``).
    """
    clip_score, problems = _saturation(raw if native is None else native, channel)
    if clip_score == 0.0 and problems == [f"{channel}_flat"]:
        return 0.0, None, problems
    # Power inside the band versus the detrended raw signal: motion adds large low-frequency excursions.
    raw_dt = _detrend(raw)
    band_fraction = float(np.var(filtered)) / max(float(np.var(raw_dt)), 1e-12)
    band_score = float(np.clip(band_fraction / 0.3, 0.0, 1.0))
    if band_score < 1.0:
        problems.append(f"{channel}_out_of_band")
    series = _envelope(filtered, fs) if channel == "ecg" else filtered
    periodic, hr = _periodicity(series, fs)
    # An autocorrelation peak of 0.5 or more is a clearly repeating beat.
    periodic_score = float(np.clip((periodic - 0.2) / 0.4, 0.0, 1.0))
    if periodic_score < 1.0:
        problems.append(f"{channel}_not_periodic")
    hr_score = 1.0
    if hr is None or not (HR_MIN_BPM <= hr <= HR_MAX_BPM):
        hr_score = 0.0
        problems.append(f"{channel}_implausible_hr")
    sqi = clip_score * band_score * periodic_score * hr_score
    return float(np.clip(sqi, 0.0, 1.0)), hr, problems


def normalise(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Per-window z-score, clipped, so amplitude (which depends on the sensor and its placement) is ignored."""
    sd = float(x.std())
    if sd < 1e-12:
        return np.zeros_like(x)
    out: npt.NDArray[np.float64] = np.clip((x - x.mean()) / sd, -NORM_CLIP, NORM_CLIP)
    return out


def preprocess_window(samples: npt.ArrayLike, channels: Sequence[str], fs: float) -> PreparedWindow:
    """Prepare one raw window (``(C, N)``, ``channels`` naming the rows, ``fs`` Hz) for the model.

    Raises ``PreprocessError`` for a window that is not a window at all (bad shape, unknown or duplicate
    channel, length more than 10% off ``WINDOW_SECONDS``); every other defect is reported through the SQI,
    ``quality_ok`` and ``problems``, never by an exception, so the caller can flag and count it.
    """
    arr = np.asarray(samples, dtype=np.float64)
    channels = tuple(channels)
    if arr.ndim != 2 or arr.shape[0] != len(channels):
        raise PreprocessError(f"samples of shape {arr.shape} do not match channels {channels}", reason="bad_shape")
    if len(set(channels)) != len(channels):
        raise PreprocessError(f"duplicate channel in {channels}", reason="duplicate_channel")
    for name in channels:
        if name not in MODEL_CHANNELS:
            raise PreprocessError(f"unknown channel {name!r}; expected a subset of {MODEL_CHANNELS}",
                                  reason="unknown_channel")
    if not (np.isfinite(fs) and fs > 0):
        raise PreprocessError(f"sample rate {fs} is not positive", reason="bad_sample_rate")
    expected = WINDOW_SAMPLES / MODEL_SAMPLE_RATE * fs
    if abs(arr.shape[1] - expected) > LENGTH_TOLERANCE * expected:
        raise PreprocessError(f"window of {arr.shape[1]} samples at {fs:g} Hz is not "
                              f"{WINDOW_SAMPLES / MODEL_SAMPLE_RATE:g} s", reason="bad_length")

    out = np.zeros((len(MODEL_CHANNELS), WINDOW_SAMPLES), dtype=np.float32)
    sqi: dict[str, float] = {}
    hrs: dict[str, float | None] = {}
    problems: list[str] = []
    used: list[str] = []
    for row, name in enumerate(channels):
        native, gap = _fill_gaps(arr[row])
        raw = _fit_length(resample(native, fs, MODEL_SAMPLE_RATE), WINDOW_SAMPLES)
        filtered = bandpass(raw, name)
        score, hr, issues = channel_sqi(raw, filtered, name, native=native)
        if gap > MAX_GAP_FRACTION:
            score, issues = 0.0, [*issues, f"{name}_gaps"]
        elif gap > 0.0:
            score *= 1.0 - gap / MAX_GAP_FRACTION * 0.5
        sqi[name] = round(float(score), 4)
        hrs[name] = hr
        if score >= SQI_THRESHOLD:
            out[MODEL_CHANNELS.index(name)] = normalise(filtered).astype(np.float32)
            used.append(name)
        else:
            problems.extend(issues or [f"{name}_poor"])
    if "ppg" not in channels:
        problems.append("ppg_missing")
    quality_ok = "ppg" in used
    inputs = ("ecg+ppg" if "ecg" in used else "ppg") if quality_ok else "none"
    if not quality_ok:
        out[:] = 0.0
    missing = tuple(name for name in MODEL_CHANNELS if name not in used or not quality_ok)
    hr_best = hrs.get("ppg") if "ppg" in used else hrs.get("ecg") if "ecg" in used else None
    return PreparedWindow(samples=out, sqi=sqi, quality_ok=quality_ok, inputs=inputs, missing=missing,
                          heart_rate_bpm=None if hr_best is None else round(float(hr_best), 1),
                          problems=tuple(problems) if not quality_ok else tuple(p for p in problems))
