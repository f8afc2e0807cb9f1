"""Inference's pure stage: which windows are scored, flagged or rejected, and what each estimate says."""

from __future__ import annotations

import numpy as np
import pytest

from bpstream.services.inference.stage import InputSpec, estimates_for, prepare_batch
from bpstream.shared.messages import Window
from bpstream.shared.model.runtime import Predictions

pytestmark = pytest.mark.unit

SPEC = InputSpec(channels=("ecg", "ppg"), sample_rate=125.0, n_samples=1000)
T_END = 1_760_000_008_000_000_000


def _window(device: str, *, quality_ok: bool = True, ecg: bool = True, n: int = 1000,
            channels: tuple[str, ...] = ("ecg", "ppg"), value: float = 0.5) -> Window:
    samples = np.full((len(channels), n), value, dtype="<f4")
    if not ecg:
        samples[0] = 0.0
    return Window(clinic_id="c", device_id=device, start_ns=T_END - 8 * 10**9, end_ns=T_END, sample_rate=125.0,
                  channels=channels, n_samples=n, samples=samples.tobytes(), sqi={"ecg": 0.2 if not ecg else 0.9,
                                                                                   "ppg": 0.8},
                  quality_ok=quality_ok, received_ns=T_END + 5, emitted_ns=T_END + 7)


def _predictions(n: int) -> Predictions:
    f = np.float32
    return Predictions(sbp=np.arange(n, dtype=f) + 120, dbp=np.arange(n, dtype=f) + 80,
                       sbp_sd=np.full(n, 6, f), dbp_sd=np.full(n, 4, f), anomaly_prob=np.full(n, 0.25, f))


def test_scored_unscored_and_rejected_windows_are_told_apart() -> None:
    windows = [_window("a"), _window("b", quality_ok=False), _window("c", n=900), _window("d", ecg=False),
               _window("e", channels=("ppg", "ecg")), _window("f", value=float("nan"))]
    batch = prepare_batch(windows, SPEC)
    assert [w.device_id for w in batch.scored] == ["a", "d"]
    assert batch.inputs is not None and batch.inputs.shape == (2, 2, 1000) and batch.inputs.dtype == np.float32
    assert [w.device_id for w in batch.unscored] == ["b"]
    assert [(windows[r.index].device_id, r.reason) for r in batch.rejected] == [
        ("c", "length_mismatch"), ("e", "channel_mismatch"), ("f", "non_finite")]


def test_every_window_that_is_not_rejected_yields_exactly_one_estimate() -> None:
    windows = [_window("a"), _window("b", quality_ok=False), _window("d", ecg=False)]
    batch = prepare_batch(windows, SPEC)
    estimates = estimates_for(batch, _predictions(2), "20261125-v1", lambda: 42)
    by_device = {e.device_id: e for e in estimates}
    assert set(by_device) == {"a", "b", "d"}
    a, b, d = by_device["a"], by_device["b"], by_device["d"]
    assert (a.sbp, a.dbp, a.sbp_sd, a.anomaly_prob, a.inputs) == (120.0, 80.0, 6.0, 0.25, "ecg+ppg")
    assert (d.sbp, d.inputs, d.sqi) == (121.0, "ppg", 0.8)  # ECG zeroed by preprocessing: PPG-only input
    assert a.sqi == 0.8 and a.quality_ok and a.model_version == "20261125-v1"
    assert (a.window_end_ns, a.received_ns, a.estimated_ns) == (T_END, T_END + 5, 42)
    assert not b.quality_ok and b.inputs == "none" and b.model_version == "20261125-v1"


def test_predictions_that_do_not_match_the_batch_are_an_error() -> None:
    batch = prepare_batch([_window("a")], SPEC)
    with pytest.raises(ValueError, match="do not match"):
        estimates_for(batch, _predictions(3), "v", lambda: 0)


def test_auto_runtime_is_onnx_on_cpu_and_torchscript_on_cuda() -> None:
    from bpstream.services.inference.service import resolve_runtime

    assert resolve_runtime("auto", "cpu") == ("onnx", "cpu")
    assert resolve_runtime("auto", "cuda:1") == ("torchscript", "cuda:1")
    assert resolve_runtime("torchscript", "cpu") == ("torchscript", "cpu")
    with pytest.raises(ValueError, match="unknown runtime"):
        resolve_runtime("tensorrt", "cpu")
