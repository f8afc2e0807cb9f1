"""The ResNet-LSTM, its FLOP count, export to TorchScript/ONNX and the runtime loader."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from bpstream.shared.errors import ModelError
from bpstream.shared.model.metadata import METADATA_FILE, MODEL_NAME, ModelMetadata
from bpstream.shared.model.network import BpNet, Deployable, NetworkConfig, TargetStats, count_flops
from bpstream.shared.model.runtime import DEFAULT_MODELS_ROOT, latest_model_dir, load_model
from bpstream.training.export import export_run

pytestmark = pytest.mark.unit
TINY = NetworkConfig(stem_channels=4, stage_channels=(4, 8), lstm_hidden=8)


def tiny_run(tmp_path: Path, version: str = "20990101-000000-test") -> Path:
    torch.manual_seed(0)
    net = BpNet(TINY).eval()
    cnn = BpNet(NetworkConfig(stem_channels=4, stage_channels=(4, 8), use_lstm=False)).eval()
    run = tmp_path / "runs" / version
    run.mkdir(parents=True)
    torch.save({"version": version, "net_config": TINY.to_dict(), "state_dict": net.state_dict(),
                "stats": asdict(TargetStats()), "cnn": {"net_config": cnn.config.to_dict(),
                                                        "state_dict": cnn.state_dict()}}, run / "checkpoint.pt")
    (run / "train_report.json").write_text(json.dumps({"training_data": {"fingerprint": "abc"},
                                                       "validation_metrics": {"n_windows": 1}}))
    return run


def test_network_shapes_and_ppg_only_input() -> None:
    net = BpNet(TINY).eval()
    x = torch.randn(3, 2, 1000)
    assert net(x).shape == (3, 5)
    x[:, 0] = 0.0  # ECG absent
    out = Deployable(net, TargetStats())(x)
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    assert (out[:, 2:4] > 0).all() and ((out[:, 4] >= 0) & (out[:, 4] <= 1)).all()


def test_flop_count_adds_the_lstm_that_flopcounter_misses() -> None:
    with_lstm = count_flops(BpNet(TINY))
    without = count_flops(BpNet(NetworkConfig(stem_channels=4, stage_channels=(4, 8), use_lstm=False)))
    assert with_lstm["lstm_analytic"] > 0 and without["lstm_analytic"] == 0
    t, i, h = BpNet(TINY).sequence_length(), 8, 8
    assert with_lstm["lstm_analytic"] >= t * 2 * 4 * h * (i + h)
    assert with_lstm["total"] == with_lstm["counted_by_torch"] + with_lstm["lstm_analytic"]
    # the sequence length the count assumes is the one the network produces
    net = BpNet(TINY).eval()
    assert net.resnet(net.stem(torch.zeros(1, 2, 1000))).shape[2] == net.sequence_length()


def test_exported_artefacts_match_the_eager_model(tmp_path: Path) -> None:
    run = tiny_run(tmp_path)
    version_dir = export_run(run, tmp_path / "models", log=lambda _: None)
    assert (version_dir / METADATA_FILE).is_file()
    meta = ModelMetadata.read(version_dir)
    assert meta.version == "20990101-000000-test"
    assert meta.channels == ["ecg", "ppg"] and meta.sample_rate == 125.0 and meta.window_seconds == 8.0
    assert meta.preprocessing["bands_hz"]["ppg"] == [0.5, 8.0]
    assert meta.training_data["fingerprint"] == "abc" and meta.flops_per_window["lstm_analytic"] > 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    net = BpNet(TINY)
    net.load_state_dict(ckpt["state_dict"])
    eager = Deployable(net.eval(), TargetStats()).eval()
    x = np.random.default_rng(1).normal(size=(7, 2, 1000)).astype(np.float32)
    x[3, 0] = 0.0
    with torch.no_grad():
        ref = eager(torch.from_numpy(x)).numpy()
    for runtime in ("torchscript", "onnx"):
        model = load_model(tmp_path / "models", runtime, device="cpu")
        assert model.version == meta.version and model.device == "cpu"
        p = model.predict(x)
        got = np.stack([p.sbp, p.dbp, p.sbp_sd, p.dbp_sd, p.anomaly_prob], axis=1)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
        assert len(p) == 7
    # metadata is embedded in the ONNX file too
    import onnx

    props = {e.key: e.value for e in onnx.load(str(version_dir / "model.onnx")).metadata_props}
    assert json.loads(props["bpstream_metadata"])["version"] == meta.version


def test_ppg_derivative_channels_and_shrinkage_survive_export(tmp_path: Path) -> None:
    config = NetworkConfig(stem_channels=4, stage_channels=(4, 8), lstm_hidden=8, ppg_derivatives=True)
    torch.manual_seed(1)
    net = BpNet(config).eval()
    stats = TargetStats(extra={"shrink_sbp": 0.5, "shrink_dbp": 0.0})
    run = tmp_path / "runs" / "20990101-000000-deriv"
    run.mkdir(parents=True)
    torch.save({"version": run.name, "net_config": config.to_dict(), "state_dict": net.state_dict(),
                "stats": asdict(stats), "cnn": None}, run / "checkpoint.pt")
    (run / "train_report.json").write_text(json.dumps({"intervals": {"nominal": 0.9, "calibrated": {"sbp": 9.0}},
                                                       "input_ranges": {"heart_rate_bpm": [40.0, 150.0]}}))
    version_dir = export_run(run, tmp_path / "models", log=lambda _: None)
    meta = ModelMetadata.read(version_dir)
    assert meta.intervals["calibrated"]["sbp"] == 9.0 and meta.input_ranges["heart_rate_bpm"] == [40.0, 150.0]
    import hashlib

    assert meta.sha256["model.ts"] == hashlib.sha256((version_dir / "model.ts").read_bytes()).hexdigest()
    x = np.random.default_rng(2).normal(size=(5, 2, 1000)).astype(np.float32)
    with torch.no_grad():
        ref = Deployable(net, stats)(torch.from_numpy(x)).numpy()
        unshrunk = Deployable(net, TargetStats())(torch.from_numpy(x)).numpy()
    # Shrinkage halves the SBP deviation from the mean and pins DBP to it.
    np.testing.assert_allclose(ref[:, 0] - 125.0, 0.5 * (unshrunk[:, 0] - 125.0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ref[:, 1], 75.0, atol=1e-4)
    for runtime in ("torchscript", "onnx"):
        p = load_model(version_dir, runtime, device="cpu").predict(x)
        np.testing.assert_allclose(np.stack([p.sbp, p.dbp], axis=1), ref[:, :2], rtol=1e-4, atol=1e-3)


def test_bad_inputs_raise_model_error(tmp_path: Path) -> None:
    export_run(tiny_run(tmp_path), tmp_path / "models", log=lambda _: None)
    model = load_model(tmp_path / "models", "onnx", device="cpu")
    with pytest.raises(ModelError) as info:
        model.predict(np.zeros((2, 1, 1000), np.float32))
    assert info.value.reason == "bad_input_shape"
    bad = np.zeros((1, 2, 1000), np.float32)
    bad[0, 1, 5] = np.nan
    with pytest.raises(ModelError):
        model.predict(bad)
    with pytest.raises(ModelError):
        load_model(tmp_path / "nothing-here")


def test_latest_model_dir_skips_incomplete_versions(tmp_path: Path) -> None:
    root = tmp_path / "models"
    older = root / MODEL_NAME / "20240101-000000-a"
    newer = root / MODEL_NAME / "20250101-000000-b"
    half = root / MODEL_NAME / "20260101-000000-c"  # being copied: no metadata.json yet
    for d in (older, newer, half):
        d.mkdir(parents=True)
    for d in (older, newer):
        (d / METADATA_FILE).write_bytes(ModelMetadata(version=d.name).to_json())
    (half / "model.ts").write_bytes(b"partial")
    assert latest_model_dir(root) == newer
    assert latest_model_dir(newer) == newer
    os.utime(older / METADATA_FILE, (time.time() + 100, time.time() + 100))
    assert latest_model_dir(root) == newer  # names order versions, not mtimes


def test_committed_model_loads_and_predicts() -> None:
    model = load_model()  # the default: the repository's committed models/
    assert latest_model_dir(DEFAULT_MODELS_ROOT) == model.directory
    assert model.metadata.training_data.get("fingerprint")
    x = np.random.default_rng(0).normal(size=(4, 2, 1000)).astype(np.float32)
    x[:, 0] = 0.0
    p = model.predict(x)
    assert p.sbp.shape == (4,) and np.all(np.isfinite(p.sbp)) and np.all(p.sbp_sd > 0)
    assert (model.directory / "model.ts").stat().st_size + (model.directory / "model.onnx").stat().st_size < 10e6
