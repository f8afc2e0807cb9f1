"""``bpstream export``: a training run's checkpoint -> a model version folder that services can load.

``<models_root>/bp-resnet-lstm/<version>/`` gets ``model.ts`` (TorchScript, traced), ``model.onnx`` (ONNX,
dynamic batch), ``weights.pt`` (the checkpoint, for the eager benchmark and the CNN baseline) and, LAST,
``metadata.json``. Everything is written into a temporary sibling folder first and renamed into place, so a
service watching the folder never sees a half-written version. Both artefacts embed the metadata too
(TorchScript ``_extra_files``, ONNX ``metadata_props``) and are checked against the eager model before the
version is published.

torch.jit is deprecated in recent torch releases (it warns when tracing); the system was asked for
TorchScript, so it is still produced, and its warnings are left visible.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bpstream.shared.model.metadata import (
    METADATA_FILE,
    MODEL_NAME,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
    ModelMetadata,
)
from bpstream.shared.modelspec import MODEL_CHANNELS, WINDOW_SAMPLES
from bpstream.shared.preprocessing import preprocessing_parameters


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint (``checkpoint.pt`` of a run, or ``weights.pt`` of a version folder)."""
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / ("checkpoint.pt" if (path / "checkpoint.pt").is_file() else WEIGHTS_FILE)
    ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt


def build_net(ckpt: dict[str, Any], which: str = "main") -> tuple[Any, Any]:
    """The BpNet (eval mode) and TargetStats stored in a checkpoint (``which``: "main" or "cnn")."""
    from bpstream.shared.model.network import BpNet, NetworkConfig, TargetStats

    part = ckpt if which == "main" else ckpt.get("cnn")
    if part is None:
        raise KeyError(f"checkpoint has no {which!r} network")
    net = BpNet(NetworkConfig.from_dict(part["net_config"]))
    net.load_state_dict(part["state_dict"])
    return net.eval(), TargetStats(**ckpt["stats"])


def export_run(run: Path, models_root: Path, report: Path | None = None, log: Any = print) -> Path:
    """Export the run folder ``run`` into ``models_root``; returns the new version folder."""
    import onnx
    import torch

    from bpstream.shared.model.network import Deployable, count_flops, count_parameters

    run = Path(run)
    ckpt = load_checkpoint(run)
    info: dict[str, Any] = json.loads((run / "train_report.json").read_text()) \
        if (run / "train_report.json").is_file() else {}
    version = str(ckpt["version"])
    net, stats = build_net(ckpt)
    model = Deployable(net, stats).eval()
    final = Path(models_root) / MODEL_NAME / version
    tmp = final.with_name(f".{version}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    validation = dict(info.get("validation_metrics", {}))
    if report is not None and Path(report).is_file():
        validation = {"validation": validation, "test": json.loads(Path(report).read_text())}
    meta = ModelMetadata(
        version=version, created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        preprocessing=preprocessing_parameters(), architecture=net.config.to_dict(),
        target_stats={**{k: float(v) for k, v in asdict(stats).items() if isinstance(v, (int, float))},
                      **{k: float(v) for k, v in stats.extra.items()}},
        parameters=count_parameters(net), flops_per_window=count_flops(net),
        training_data=info.get("training_data", {}),
        training={k: v for k, v in info.get("training", {}).items() if k != "history"},
        validation_metrics=validation, torch_version=str(torch.__version__),
        intervals=info.get("intervals", {}), input_ranges=info.get("input_ranges", {}),
        files={"torchscript": TORCHSCRIPT_FILE, "onnx": ONNX_FILE, "weights": WEIGHTS_FILE})
    meta_json = meta.to_json()

    example = torch.randn(4, len(MODEL_CHANNELS), WINDOW_SAMPLES)
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    torch.jit.save(traced, str(tmp / TORCHSCRIPT_FILE), _extra_files={METADATA_FILE: meta_json})
    _export_onnx(model, example, tmp / ONNX_FILE)
    proto = onnx.load(str(tmp / ONNX_FILE))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "bpstream_metadata", meta_json.decode()
    onnx.save(proto, str(tmp / ONNX_FILE))
    shutil.copyfile(run / "checkpoint.pt", tmp / WEIGHTS_FILE) if (run / "checkpoint.pt").is_file() else \
        torch.save(ckpt, tmp / WEIGHTS_FILE)

    diffs = check_artefacts(tmp, model)
    log(f"artefacts match eager: max |diff| TorchScript {diffs['torchscript']:.2e}, ONNX {diffs['onnx']:.2e}")
    meta.training["export_max_abs_diff"] = diffs
    # Checked by services before they load or hot-swap this version (metadata.json itself is the manifest).
    meta.sha256 = {name: hashlib.sha256((tmp / name).read_bytes()).hexdigest()
                   for name in (TORCHSCRIPT_FILE, ONNX_FILE, WEIGHTS_FILE)}
    (tmp / METADATA_FILE).write_bytes(meta.to_json())  # written last: marks the version complete
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    log(f"exported {final} ({sum(p.stat().st_size for p in final.iterdir()) / 1e6:.2f} MB)")
    return final


def _export_onnx(model: Any, example: Any, path: Path) -> None:
    import torch

    torch.onnx.export(model, (example,), str(path), input_names=["windows"], output_names=["outputs"],
                      dynamic_axes={"windows": {0: "batch"}, "outputs": {0: "batch"}}, opset_version=17,
                      dynamo=False)


def check_artefacts(directory: Path, model: Any, n: int = 16, seed: int = 0) -> dict[str, float]:
    """Max absolute difference of the TorchScript and ONNX outputs from the eager model on random windows."""
    import onnxruntime as ort
    import torch

    x = np.random.default_rng(seed).normal(size=(n, len(MODEL_CHANNELS), WINDOW_SAMPLES)).astype(np.float32)
    with torch.no_grad():
        eager = model(torch.from_numpy(x)).numpy()
        ts = torch.jit.load(str(directory / TORCHSCRIPT_FILE))(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(directory / ONNX_FILE), providers=["CPUExecutionProvider"])
    onx = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return {"torchscript": float(np.abs(ts - eager).max()), "onnx": float(np.abs(onx - eager).max())}
