"""The shared window preprocessing: shapes, resampling, filtering, normalisation and the quality index."""

from __future__ import annotations

import numpy as np
import pytest

from bpstream.shared.modelspec import MODEL_CHANNELS, WINDOW_SAMPLES
from bpstream.shared.preprocessing import PreprocessError, bandpass, preprocess_window, resample

pytestmark = pytest.mark.unit


def pulse_train(fs: float, seconds: float = 8.0, hr: float = 72.0, seed: int = 0) -> np.ndarray:
    """A PPG-like periodic wave (systolic peak plus a smaller reflected wave) with a little noise."""
    t = np.arange(round(seconds * fs)) / fs
    phase = (t * hr / 60.0) % 1.0
    wave = np.exp(-((phase - 0.2) ** 2) / 0.004) + 0.4 * np.exp(-((phase - 0.45) ** 2) / 0.006)
    return wave + np.random.default_rng(seed).normal(0, 0.01, t.size)


def ecg_train(fs: float, seconds: float = 8.0, hr: float = 72.0, seed: int = 0) -> np.ndarray:
    """R peak, S dip and T wave, with sensor noise (no real ECG has an exactly flat baseline)."""
    t = np.arange(round(seconds * fs)) / fs
    phase = (t * hr / 60.0) % 1.0
    wave = (1.2 * np.exp(-((phase - 0.1) ** 2) / 0.00005) - 0.25 * np.exp(-((phase - 0.12) ** 2) / 0.00005)
            + 0.2 * np.exp(-((phase - 0.4) ** 2) / 0.003))
    return wave + np.random.default_rng(seed).normal(0, 0.02, t.size)


def test_resample_changes_rate_and_keeps_a_sine() -> None:
    fs_in, fs_out = 500.0, 125.0
    t = np.arange(4000) / fs_in
    x = np.sin(2 * np.pi * 1.5 * t)
    y = resample(x, fs_in, fs_out)
    assert y.shape == (1000,)
    t_out = np.arange(1000) / fs_out
    assert np.max(np.abs(y[50:-50] - np.sin(2 * np.pi * 1.5 * t_out[50:-50]))) < 0.02
    # non-integer ratio, 2-D input along the last axis
    assert resample(np.zeros((2, 1024)), 128.0, 125.0).shape == (2, 1000)


def test_bandpass_removes_baseline_wander_and_keeps_the_pulse() -> None:
    fs = 125.0
    t = np.arange(1000) / fs
    pulse = np.sin(2 * np.pi * 1.2 * t)
    wander = 3.0 * np.sin(2 * np.pi * 0.05 * t)
    out = bandpass(pulse + wander, "ppg", fs)
    assert np.corrcoef(out[100:-100], pulse[100:-100])[0, 1] > 0.98
    # zero phase: the filtered pulse is not delayed
    assert np.argmax(np.correlate(out[100:-100], pulse[100:-100], "full")) == 799


@pytest.mark.parametrize("fs", [125.0, 250.0, 500.0, 1000.0])
def test_clean_window_at_any_rate_is_model_ready(fs: float) -> None:
    raw = np.stack([ecg_train(fs), pulse_train(fs)])
    w = preprocess_window(raw, ("ecg", "ppg"), fs)
    assert w.samples.shape == (len(MODEL_CHANNELS), WINDOW_SAMPLES)
    assert w.samples.dtype == np.float32
    assert w.quality_ok and w.inputs == "ecg+ppg" and w.missing == ()
    assert w.sqi["ppg"] > 0.8 and w.sqi["ecg"] > 0.8
    assert w.heart_rate_bpm == pytest.approx(72.0, abs=3.0)
    # normalised: zero mean, unit variance per channel
    assert np.allclose(w.samples.mean(axis=1), 0.0, atol=1e-3)
    assert np.allclose(w.samples.std(axis=1), 1.0, atol=0.05)


def test_ppg_only_window_zeros_and_flags_the_ecg() -> None:
    w = preprocess_window(pulse_train(125.0)[None, :], ["ppg"], 125.0)
    assert w.quality_ok and w.inputs == "ppg"
    assert w.missing == ("ecg",)
    assert not np.any(w.samples[MODEL_CHANNELS.index("ecg")])
    assert set(w.sqi) == {"ppg"}


def test_channel_order_of_the_input_does_not_matter() -> None:
    ecg, ppg = ecg_train(125.0), pulse_train(125.0)
    a = preprocess_window(np.stack([ecg, ppg]), ("ecg", "ppg"), 125.0)
    b = preprocess_window(np.stack([ppg, ecg]), ("ppg", "ecg"), 125.0)
    np.testing.assert_array_equal(a.samples, b.samples)


def test_flat_line_is_flagged() -> None:
    w = preprocess_window(np.full((1, 1000), 2.5), ["ppg"], 125.0)
    assert not w.quality_ok and w.inputs == "none"
    assert w.sqi["ppg"] == 0.0
    assert "ppg_flat" in w.problems
    assert not np.any(w.samples)


def test_clipping_is_flagged() -> None:
    ppg = pulse_train(125.0)
    clipped = np.clip(ppg, None, np.percentile(ppg, 75))
    w = preprocess_window(clipped[None, :], ["ppg"], 125.0)
    assert w.sqi["ppg"] < preprocess_window(ppg[None, :], ["ppg"], 125.0).sqi["ppg"]
    assert not w.quality_ok
    assert any(p.startswith("ppg_clipping") or p == "ppg_flat" for p in w.problems)


def test_heavy_motion_noise_is_flagged() -> None:
    rng = np.random.default_rng(3)
    motion = np.cumsum(rng.normal(0, 0.3, 1000)) + rng.normal(0, 1.0, 1000)
    w = preprocess_window((pulse_train(125.0) + motion)[None, :], ["ppg"], 125.0)
    assert not w.quality_ok
    assert w.sqi["ppg"] < 0.5


def test_implausible_heart_rate_is_flagged() -> None:
    # 300 bpm "pulse": periodic but not a human heart
    w = preprocess_window(pulse_train(125.0, hr=300.0)[None, :], ["ppg"], 125.0)
    assert not w.quality_ok
    assert "ppg_implausible_hr" in w.problems


def test_poor_ecg_is_dropped_but_good_ppg_is_still_scored() -> None:
    noise = np.random.default_rng(1).normal(size=1000)
    w = preprocess_window(np.stack([noise, pulse_train(125.0)]), ("ecg", "ppg"), 125.0)
    assert w.quality_ok and w.inputs == "ppg" and "ecg" in w.missing
    assert not np.any(w.samples[0])


def test_small_gaps_are_interpolated_and_large_gaps_flagged() -> None:
    ppg = pulse_train(125.0)
    small = ppg.copy()
    small[100:120] = np.nan
    assert preprocess_window(small[None, :], ["ppg"], 125.0).quality_ok
    large = ppg.copy()
    large[100:400] = np.nan
    w = preprocess_window(large[None, :], ["ppg"], 125.0)
    assert not w.quality_ok and "ppg_gaps" in w.problems


@pytest.mark.parametrize(("samples", "channels", "fs", "reason"), [
    (np.zeros((2, 1000)), ("ppg",), 125.0, "bad_shape"),
    (np.zeros((1, 1000)), ("abp",), 125.0, "unknown_channel"),
    (np.zeros((2, 1000)), ("ppg", "ppg"), 125.0, "duplicate_channel"),
    (np.zeros((1, 500)), ("ppg",), 125.0, "bad_length"),
    (np.zeros((1, 1000)), ("ppg",), 0.0, "bad_sample_rate"),
])
def test_malformed_windows_raise_a_clear_error(samples: np.ndarray, channels: tuple[str, ...], fs: float,
                                               reason: str) -> None:
    with pytest.raises(PreprocessError) as info:
        preprocess_window(samples, channels, fs)
    assert info.value.reason == reason


def test_bandpass_equals_scipy_sosfiltfilt() -> None:
    from scipy import signal

    from bpstream.shared.preprocessing import _bandpass

    x = np.random.default_rng(5).normal(size=1000).cumsum()
    for channel in ("ecg", "ppg"):
        sos, _ = _bandpass(channel, 125.0)
        np.testing.assert_allclose(bandpass(x, channel), signal.sosfiltfilt(sos, x, padtype="odd", padlen=375),
                                   atol=1e-9)


def test_a_batch_prepares_each_window_as_if_it_were_alone() -> None:
    from bpstream.shared.preprocessing import preprocess_windows

    clean = np.stack([ecg_train(125.0), pulse_train(125.0)])
    gappy = clean.copy()
    gappy[1, 100:400] = np.nan
    noisy = clean + np.random.default_rng(2).normal(0, 2.0, clean.shape)
    batch = [
        (clean, ("ecg", "ppg"), 125.0),
        (np.full((2, 1000), 2.5), ("ecg", "ppg"), 125.0),  # flat
        (gappy, ("ecg", "ppg"), 125.0),
        (np.zeros((1, 500)), ("ppg",), 125.0),  # not a window: its error takes its place
        (noisy, ("ecg", "ppg"), 125.0),
        (clean[1:], ("ppg",), 125.0),
        (np.stack([ecg_train(250.0), pulse_train(250.0)]), ("ecg", "ppg"), 250.0),
        (clean[::-1], ("ppg", "ecg"), 125.0),
    ]
    results = preprocess_windows(batch)
    assert len(results) == len(batch)
    assert isinstance(results[3], PreprocessError) and results[3].reason == "bad_length"
    for (samples, channels, fs), got in zip(batch, results, strict=True):
        if isinstance(got, PreprocessError):
            continue
        alone = preprocess_window(samples, channels, fs)
        np.testing.assert_array_equal(got.samples, alone.samples)
        assert (got.sqi, got.quality_ok, got.inputs, got.missing, got.heart_rate_bpm, got.problems) == (
            alone.sqi, alone.quality_ok, alone.inputs, alone.missing, alone.heart_rate_bpm, alone.problems)
    assert results[0].quality_ok and not results[1].quality_ok and not results[2].quality_ok  # type: ignore[union-attr]
    np.testing.assert_array_equal(results[7].samples, results[0].samples)  # type: ignore[union-attr]


def test_a_ppg_rhythm_that_is_not_the_hearts_is_flagged() -> None:
    # A loose sensor moving at 1.8 Hz looks like a clean pulse train at 108 bpm; the ECG says 72 bpm.
    window = np.stack([ecg_train(125.0, hr=72.0), pulse_train(125.0, hr=108.0)])
    w = preprocess_window(window, ["ecg", "ppg"], 125.0)
    assert not w.quality_ok and w.sqi["ppg"] == 0.0 and "ppg_ecg_hr_mismatch" in w.problems
    agreeing = preprocess_window(np.stack([ecg_train(125.0, hr=72.0), pulse_train(125.0, hr=74.0)]),
                                 ["ecg", "ppg"], 125.0)
    assert agreeing.quality_ok and agreeing.inputs == "ecg+ppg"
    # Without an ECG there is nothing to compare with: the same PPG alone is scored.
    assert preprocess_window(window[1:], ["ppg"], 125.0).quality_ok
