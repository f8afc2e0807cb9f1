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
* implausible heart rate: the dominant period is outside 30-220 bpm;
* a PPG rhythm that is not the heart's: with a usable ECG, the PPG's heart rate differs from the ECG's by more
  than 25% (a loose sensor moving at 0.6-3 Hz looks like a clean pulse train otherwise).

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
#: With a usable ECG, a PPG whose heart rate differs from the ECG's by more than this fraction is unusable:
#: its rhythm is not the pulse (motion at 0.6-3 Hz passes the band-pass and looks periodic).
MAX_HR_DISAGREEMENT: Final = 0.25
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
        "max_ppg_ecg_hr_disagreement": MAX_HR_DISAGREEMENT,
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
    """Zero-phase band-pass along the last axis (one channel, or a stack of windows of one channel),
    odd-reflection padded so the window edges do not ring.

    Same result as ``scipy.signal.sosfiltfilt(..., padtype="odd")``, with the filter's initial state cached
    (scipy recomputes it on every call, which was a third of the per-window cost).
    """
    arr = np.asarray(x, dtype=np.float64)
    sos, zi = _bandpass(channel, fs)
    n = arr.shape[-1]
    pad = min(n - 1, int(3 * fs))
    first, last = arr[..., :1], arr[..., -1:]
    ext = np.concatenate([2 * first - arr[..., pad:0:-1], arr, 2 * last - arr[..., -2:-pad - 2:-1]], axis=-1)
    # The step-response state scaled by each row's first sample: shape (sections, *rows, 2).
    lead = (slice(None),) + (None,) * (arr.ndim - 1) + (slice(None),)
    fwd, _ = signal.sosfilt(sos, ext, axis=-1, zi=zi[lead] * ext[..., 0][None, ..., None])
    rev = fwd[..., ::-1]
    back, _ = signal.sosfilt(sos, rev, axis=-1, zi=zi[lead] * rev[..., 0][None, ..., None])
    out: npt.NDArray[np.float64] = back[..., ::-1][..., pad:pad + n]
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


def _periodicity(x: npt.NDArray[np.float64], fs: float) -> tuple[npt.NDArray[np.float64], list[float | None]]:
    """Strength (0-1) of the dominant beat period in [HR_MIN, HR_MAX] of each row, and the heart rate it implies.

    Uses the normalised autocorrelation; the first clear peak inside the plausible lag range is taken, so a
    clean pulse train gives a value near 1 and noise gives a value near 0.
    """
    rows, n = x.shape
    strength = np.zeros(rows)
    rates: list[float | None] = [None] * rows
    x = x - x.mean(axis=-1, keepdims=True)
    energy = np.einsum("ij,ij->i", x, x)
    # Search down to lags of 1.5x the highest plausible rate, so a too-fast rhythm is seen as such and not
    # mistaken for its own second multiple.
    lo = max(int(fs * 60.0 / (1.5 * HR_MAX_BPM)), 1)
    hi = min(n // 2, int(fs * 60.0 / HR_MIN_BPM * 1.1) + 1)
    if hi <= lo + 2:
        return strength, rates
    spec = np.fft.rfft(x, 2 * n, axis=-1)
    ac = np.fft.irfft(spec * np.conj(spec), axis=-1)[:, :n]
    # Unbiased correction so long lags are not penalised for having fewer overlapping samples.
    ac = ac * (n / np.maximum(n - np.arange(n), 1))
    for r in range(rows):
        if energy[r] <= 0.0:
            continue
        seg = ac[r, lo:hi] / energy[r]
        peaks, _ = signal.find_peaks(seg)
        if peaks.size == 0:
            continue
        best = float(seg[peaks].max())
        # The first peak within 60% of the best one is the fundamental (not a multiple of the period).
        first = int(peaks[np.argmax(seg[peaks] >= 0.6 * best)])
        strength[r] = float(np.clip(best, 0.0, 1.0))
        rates[r] = 60.0 * fs / (lo + first)
    return strength, rates


def _envelope(x: npt.NDArray[np.float64], fs: float) -> npt.NDArray[np.float64]:
    """A smooth energy envelope of each ECG row whose period is the RR interval (QRS complexes dominate)."""
    d = np.diff(x, axis=-1, prepend=x[:, :1]) ** 2
    k = max(1, int(0.08 * fs))
    kernel = np.ones(k) / k
    return np.stack([np.convolve(row, kernel, mode="same") for row in d])


def _detrend(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Remove each row's least-squares line (closed form: cheaper than scipy's general detrend)."""
    n = x.shape[-1]
    t = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    slope = x @ t / np.dot(t, t) if n > 1 else np.zeros(x.shape[0])
    out: npt.NDArray[np.float64] = x - x.mean(axis=-1, keepdims=True) - slope[:, None] * t
    return out


def _saturation(native: npt.NDArray[np.float64], channel: str) -> tuple[npt.NDArray[np.float64], list[list[str]]]:
    """Flat-line and clipping checks of each row at its native rate (resampling would hide plateaus).

    Returns a score in [0, 1] per row (0 for a flat line) and the names of the failed checks.
    """
    spread = np.ptp(native, axis=-1)
    sd = native.std(axis=-1)
    scale = np.maximum(1.0, np.abs(native).mean(axis=-1))
    same = np.mean(np.abs(np.diff(native, axis=-1)) <= 1e-9 * spread[:, None], axis=-1)
    flat = (spread == 0.0) | (sd < 1e-6 * scale) | (same > 0.5)
    # Clipping: samples within 0.5% of the range from either extreme. A clean beat spends little time there.
    tol = (0.005 * spread)[:, None]
    pinned = (np.mean(native >= native.max(axis=-1, keepdims=True) - tol, axis=-1)
              + np.mean(native <= native.min(axis=-1, keepdims=True) + tol, axis=-1))
    score = np.where(flat, 0.0, np.clip(1.0 - (pinned - 0.04) / 0.11, 0.0, 1.0))
    problems = [[f"{channel}_flat"] if f else [f"{channel}_clipping"] if v < 1.0 else []
                for f, v in zip(flat.tolist(), score.tolist(), strict=True)]
    return score, problems


def channel_sqi(raw: npt.NDArray[np.float64], filtered: npt.NDArray[np.float64], channel: str,
                fs: float = MODEL_SAMPLE_RATE, native: npt.NDArray[np.float64] | None = None,
                ) -> tuple[list[float], list[float | None], list[list[str]]]:
    """SQI in [0, 1] of one channel in each row, the heart rate it shows, and the names of the checks it failed.

    ``raw`` and ``filtered`` are ``(windows, samples)`` at ``fs``; ``native`` is the channel at its original
    rate (defaults to ``raw``).
    """
    clip_score, problems = _saturation(raw if native is None else native, channel)
    # Power inside the band versus the detrended raw signal: motion adds large low-frequency excursions.
    band_fraction = filtered.var(axis=-1) / np.maximum(_detrend(raw).var(axis=-1), 1e-12)
    band_score = np.clip(band_fraction / 0.3, 0.0, 1.0)
    series = _envelope(filtered, fs) if channel == "ecg" else filtered
    periodic, rates = _periodicity(series, fs)
    # An autocorrelation peak of 0.5 or more is a clearly repeating beat.
    periodic_score = np.clip((periodic - 0.2) / 0.4, 0.0, 1.0)
    scores: list[float] = []
    for r, hr in enumerate(rates):
        if problems[r] == [f"{channel}_flat"]:
            scores.append(0.0)
            rates[r] = None
            continue
        hr_score = 1.0
        if band_score[r] < 1.0:
            problems[r].append(f"{channel}_out_of_band")
        if periodic_score[r] < 1.0:
            problems[r].append(f"{channel}_not_periodic")
        if hr is None or not (HR_MIN_BPM <= hr <= HR_MAX_BPM):
            hr_score = 0.0
            problems[r].append(f"{channel}_implausible_hr")
        sqi = float(clip_score[r]) * float(band_score[r]) * float(periodic_score[r]) * hr_score
        scores.append(float(np.clip(sqi, 0.0, 1.0)))
    return scores, rates, problems


def normalise(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Per-window (per-row) z-score, clipped, so amplitude (which depends on the sensor and its placement) is
    ignored. A row without variance becomes zeros."""
    sd = x.std(axis=-1, keepdims=True)
    flat = sd < 1e-12
    out: npt.NDArray[np.float64] = np.where(
        flat, 0.0, np.clip((x - x.mean(axis=-1, keepdims=True)) / np.where(flat, 1.0, sd), -NORM_CLIP, NORM_CLIP))
    return out


#: One raw window to prepare: samples ``(C, N)``, the channel name of each row, and the sample rate in Hz.
RawWindow = tuple[npt.ArrayLike, Sequence[str], float]


def _validated(samples: npt.ArrayLike, channels: Sequence[str], fs: float) -> tuple[npt.NDArray[np.float64],
                                                                                       tuple[str, ...]]:
    arr = np.asarray(samples, dtype=np.float64)
    names = tuple(channels)
    if arr.ndim != 2 or arr.shape[0] != len(names):
        raise PreprocessError(f"samples of shape {arr.shape} do not match channels {names}", reason="bad_shape")
    if len(set(names)) != len(names):
        raise PreprocessError(f"duplicate channel in {names}", reason="duplicate_channel")
    for name in names:
        if name not in MODEL_CHANNELS:
            raise PreprocessError(f"unknown channel {name!r}; expected a subset of {MODEL_CHANNELS}",
                                  reason="unknown_channel")
    if not (np.isfinite(fs) and fs > 0):
        raise PreprocessError(f"sample rate {fs} is not positive", reason="bad_sample_rate")
    expected = WINDOW_SAMPLES / MODEL_SAMPLE_RATE * fs
    if abs(arr.shape[1] - expected) > LENGTH_TOLERANCE * expected:
        raise PreprocessError(f"window of {arr.shape[1]} samples at {fs:g} Hz is not "
                              f"{WINDOW_SAMPLES / MODEL_SAMPLE_RATE:g} s", reason="bad_length")
    return arr, names


@dataclass(slots=True)
class _PreparedChannel:
    """One channel of a stack of windows: model-rate band-passed rows, SQI, heart rate and failed checks."""

    filtered: npt.NDArray[np.float64]
    scores: list[float]
    rates: list[float | None]
    problems: list[list[str]]


def _prepare_channel(x: npt.NDArray[np.float64], name: str, fs: float) -> _PreparedChannel:
    """Gap-fill, resample, band-pass and score one channel of ``(windows, samples)``."""
    gaps = np.zeros(x.shape[0])
    native = x
    broken = np.flatnonzero(~np.isfinite(x).all(axis=-1))
    if broken.size:
        native = x.copy()
        for row in broken.tolist():
            native[row], gaps[row] = _fill_gaps(x[row])
    raw = _fit_length(resample(native, fs, MODEL_SAMPLE_RATE), WINDOW_SAMPLES)
    filtered = bandpass(raw, name)
    scores, rates, problems = channel_sqi(raw, filtered, name, native=native)
    for r, gap in enumerate(gaps.tolist()):
        if gap > MAX_GAP_FRACTION:
            scores[r], problems[r] = 0.0, [*problems[r], f"{name}_gaps"]
        elif gap > 0.0:
            scores[r] *= 1.0 - gap / MAX_GAP_FRACTION * 0.5
    return _PreparedChannel(filtered, scores, rates, problems)


def preprocess_windows(windows: Sequence[RawWindow], *, max_hr_disagreement: float = MAX_HR_DISAGREEMENT,
                       ) -> list[PreparedWindow | PreprocessError]:
    """Prepare many raw windows at once; the result for each is what :func:`preprocess_window` gives it.

    Windows with the same channels, rate and length are stacked and prepared with array operations over the
    stack (per-call overhead, not arithmetic, dominates a single 8 s window). A window that is not a window
    at all gets its ``PreprocessError`` in its place instead of raising, so one bad window cannot fail the
    others. ``max_hr_disagreement`` is there to measure the SQI without that check (``inf``); keep the default.
    """
    results: list[PreparedWindow | PreprocessError | None] = [None] * len(windows)
    arrays: dict[int, npt.NDArray[np.float64]] = {}
    groups: dict[tuple[tuple[str, ...], float, int], list[int]] = {}
    for i, (samples, channels, fs) in enumerate(windows):
        try:
            arr, names = _validated(samples, channels, fs)
        except PreprocessError as exc:
            results[i] = exc
            continue
        arrays[i] = arr
        groups.setdefault((names, float(fs), arr.shape[1]), []).append(i)
    for (names, fs, _n), members in groups.items():
        stack = np.stack([arrays[i] for i in members])
        prepared = {name: _prepare_channel(stack[:, row, :], name, fs) for row, name in enumerate(names)}
        normalised = {name: normalise(p.filtered).astype(np.float32) for name, p in prepared.items()}
        for k, i in enumerate(members):
            results[i] = _assemble(names, prepared, normalised, k, max_hr_disagreement)
    return [r if r is not None else PreprocessError("not prepared") for r in results]


def _assemble(names: tuple[str, ...], prepared: dict[str, _PreparedChannel],
              normalised: dict[str, npt.NDArray[np.float32]], k: int, max_hr_disagreement: float) -> PreparedWindow:
    """The :class:`PreparedWindow` of row ``k`` of a prepared stack."""
    out = np.zeros((len(MODEL_CHANNELS), WINDOW_SAMPLES), dtype=np.float32)
    sqi: dict[str, float] = {}
    hrs: dict[str, float | None] = {}
    problems: list[str] = []
    used: list[str] = []
    ecg_rate = prepared["ecg"].rates[k] if "ecg" in prepared and prepared["ecg"].scores[k] >= SQI_THRESHOLD else None
    for name in names:
        channel = prepared[name]
        score = channel.scores[k]
        rate = channel.rates[k]
        if name == "ppg" and ecg_rate and rate and abs(rate / ecg_rate - 1.0) > max_hr_disagreement:
            score = 0.0
            channel.problems[k] = [*channel.problems[k], "ppg_ecg_hr_mismatch"]
        sqi[name] = round(float(score), 4)
        hrs[name] = channel.rates[k]
        if score >= SQI_THRESHOLD:
            out[MODEL_CHANNELS.index(name)] = normalised[name][k]
            used.append(name)
        else:
            problems.extend(channel.problems[k] or [f"{name}_poor"])
    if "ppg" not in names:
        problems.append("ppg_missing")
    quality_ok = "ppg" in used
    inputs = ("ecg+ppg" if "ecg" in used else "ppg") if quality_ok else "none"
    if not quality_ok:
        out[:] = 0.0
    missing = tuple(name for name in MODEL_CHANNELS if name not in used or not quality_ok)
    hr_best = hrs.get("ppg") if "ppg" in used else hrs.get("ecg") if "ecg" in used else None
    return PreparedWindow(samples=out, sqi=sqi, quality_ok=quality_ok, inputs=inputs, missing=missing,
                          heart_rate_bpm=None if hr_best is None else round(float(hr_best), 1),
                          problems=tuple(problems))


def preprocess_window(samples: npt.ArrayLike, channels: Sequence[str], fs: float) -> PreparedWindow:
    """Prepare one raw window (``(C, N)``, ``channels`` naming the rows, ``fs`` Hz) for the model.

    Raises ``PreprocessError`` for a window that is not a window at all (bad shape, unknown or duplicate
    channel, length more than 10% off ``WINDOW_SECONDS``); every other defect is reported through the SQI,
    ``quality_ok`` and ``problems``, never by an exception, so the caller can flag and count it.
    """
    result = preprocess_windows([(samples, channels, fs)])[0]
    if isinstance(result, PreprocessError):
        raise result
    return result
