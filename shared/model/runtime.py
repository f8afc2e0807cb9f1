"""Load an exported model version (TorchScript or ONNX Runtime) and run it on batches of prepared windows.

Model versions live in ``<models_root>/bp-resnet-lstm/<version>/`` with ``model.ts``, ``model.onnx`` and
``metadata.json``. ``metadata.json`` is written LAST by the exporter, so a version folder counts only once it
exists: a half-copied version is never picked by :func:`latest_model_dir`. The repository's committed
``models/`` folder (``DEFAULT_MODELS_ROOT``) is the fallback every service can use without training.

Every failure is a ``ModelError`` with a reason (missing artefact, bad metadata, wrong input shape, ...).

Integrity: an artefact is read once, its sha256 compared with the one ``metadata.json`` records for it
(``sha256`` field, written by the exporter), and only those verified bytes are loaded, so a file changed
after export is refused (``ModelError`` reason ``artefact_checksum``) and a hot reload keeps the version in
service. Metadata without a ``sha256`` field (versions exported before it existed) loads with a warning;
metadata that has the field but no entry for the artefact is refused.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from bpstream.shared.errors import ModelError
from bpstream.shared.model.metadata import (
    METADATA_FILE,
    MODEL_NAME,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    ModelMetadata,
)

#: The repository's committed models (``<repo>/models``); ``shared/`` sits directly under the repo root.
DEFAULT_MODELS_ROOT: Path = Path(__file__).resolve().parents[2] / "models"

Runtime = Literal["torchscript", "onnx"]

log = logging.getLogger(__name__)


def read_verified(directory: Path, metadata: ModelMetadata, filename: str) -> bytes:
    """The bytes of artefact ``filename``, checked against ``metadata.sha256``; ``ModelError`` if they differ."""
    path = directory / filename
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}", reason="missing_artefact") from exc
    if not metadata.sha256:
        log.warning("model metadata has no sha256: artefact not verified",
                    extra={"version": metadata.version, "artefact": filename})
        return data
    expected = metadata.sha256.get(filename)
    if expected is None:
        raise ModelError(f"{path}: metadata.json records no sha256 for {filename}; refusing to load it",
                         reason="artefact_checksum")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise ModelError(f"{path}: sha256 {actual} does not match metadata.json ({expected}); the artefact was "
                         "changed after export, refusing to load it", reason="artefact_checksum")
    return data


@dataclass(slots=True, frozen=True)
class Predictions:
    """Model outputs for a batch, each of shape ``(B,)``: mmHg, mmHg SDs, and a probability."""

    sbp: npt.NDArray[np.float32]
    dbp: npt.NDArray[np.float32]
    sbp_sd: npt.NDArray[np.float32]
    dbp_sd: npt.NDArray[np.float32]
    anomaly_prob: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return int(self.sbp.shape[0])


def _version_key(path: Path) -> tuple[str, float]:
    # Versions are named so that they sort by time (YYYYmmdd-HHMMSS-...); mtime breaks ties.
    return path.name, (path / METADATA_FILE).stat().st_mtime


def latest_model_dir(models_root: Path = DEFAULT_MODELS_ROOT) -> Path:
    """The newest complete version folder under ``models_root`` (or ``models_root/bp-resnet-lstm``).

    A folder is complete once its ``metadata.json`` exists. Raises ``ModelError`` when there is none.
    """
    root = Path(models_root)
    if (root / METADATA_FILE).is_file():
        return root
    parent = root / MODEL_NAME if (root / MODEL_NAME).is_dir() else root
    try:
        versions = [p for p in parent.iterdir() if p.is_dir() and (p / METADATA_FILE).is_file()]
    except OSError as exc:
        raise ModelError(f"cannot list model versions in {parent}: {exc}", reason="missing_model") from exc
    if not versions:
        raise ModelError(f"no complete model version (a folder with {METADATA_FILE}) in {parent}",
                         reason="missing_model")
    return max(versions, key=_version_key)


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"


class BpModel:
    """A loaded model version. ``predict`` takes float32 ``(B, 2, 1000)`` prepared windows."""

    def __init__(self, directory: Path, metadata: ModelMetadata, runtime: Runtime, device: str) -> None:
        self.directory = directory
        self.metadata = metadata
        self.runtime: Runtime = runtime
        self.device = device
        self._shape = (int(metadata.input_shape[1]), int(metadata.input_shape[2]))

    @property
    def version(self) -> str:
        return self.metadata.version

    def _check(self, batch: npt.ArrayLike) -> npt.NDArray[np.float32]:
        arr = np.ascontiguousarray(batch, dtype=np.float32)
        if arr.ndim != 3 or arr.shape[1:] != self._shape or arr.shape[0] == 0:
            raise ModelError(f"expected a batch of shape (B, {self._shape[0]}, {self._shape[1]}), got {arr.shape}",
                             reason="bad_input_shape")
        if not np.isfinite(arr).all():
            raise ModelError("input batch contains NaN or inf", reason="non_finite_input")
        return arr

    def _run(self, arr: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        raise NotImplementedError

    def predict(self, batch: npt.ArrayLike) -> Predictions:
        out = self._run(self._check(batch))
        return Predictions(sbp=out[:, 0].copy(), dbp=out[:, 1].copy(), sbp_sd=out[:, 2].copy(),
                           dbp_sd=out[:, 3].copy(), anomaly_prob=out[:, 4].copy())


class _TorchScriptModel(BpModel):
    def __init__(self, directory: Path, metadata: ModelMetadata, device: str) -> None:
        import torch

        super().__init__(directory, metadata, "torchscript", device)
        data = read_verified(directory, metadata, TORCHSCRIPT_FILE)
        try:
            self._module: Any = torch.jit.load(  # type: ignore[no-untyped-call]
                io.BytesIO(data), map_location=device)
        except (RuntimeError, OSError, ValueError) as exc:
            raise ModelError(f"cannot load {directory / TORCHSCRIPT_FILE}: {exc}", reason="bad_artefact") from exc
        self._module.eval()
        self._torch = torch

    def _run(self, arr: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        torch = self._torch
        with torch.inference_mode():
            out = self._module(torch.from_numpy(arr).to(self.device))
        result: npt.NDArray[np.float32] = out.float().cpu().numpy()
        return result


class _OnnxModel(BpModel):
    def __init__(self, directory: Path, metadata: ModelMetadata, device: str, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # ONNX Runtime's workers spin while waiting for work by default. On a machine shared with the other
        # services that spinning takes CPU from them for no gain (measured: see docs/BENCHMARKS.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelError("ONNX Runtime has no CUDA provider on this machine", reason="no_cuda")
            providers.insert(0, "CUDAExecutionProvider")
        super().__init__(directory, metadata, "onnx", device)
        data = read_verified(directory, metadata, ONNX_FILE)
        try:
            self._session = ort.InferenceSession(data, sess_options=options,
                                                 providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ModelError(f"cannot load {directory / ONNX_FILE}: {exc}", reason="bad_artefact") from exc
        self._input = self._session.get_inputs()[0].name

    def _run(self, arr: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out = self._session.run(None, {self._input: arr})[0]
        result: npt.NDArray[np.float32] = np.asarray(out, dtype=np.float32)
        return result


def load_model(path: Path | None = None, runtime: Runtime = "torchscript", device: str = "auto",
               threads: int = 0) -> BpModel:
    """Load a model version folder, or the newest version under a models root (default: the committed one).

    ``device="auto"`` uses CUDA when available; ``threads`` limits ONNX Runtime's intra-op threads (0: its
    default, one per core). Raises ``ModelError`` on any problem.
    """
    directory = latest_model_dir(DEFAULT_MODELS_ROOT if path is None else Path(path))
    metadata = ModelMetadata.read(directory)
    resolved = _resolve_device(device)
    if runtime == "torchscript":
        return _TorchScriptModel(directory, metadata, resolved)
    if runtime == "onnx":
        return _OnnxModel(directory, metadata, resolved, threads)
    raise ModelError(f"unknown runtime {runtime!r}; use 'torchscript' or 'onnx'", reason="bad_runtime")
