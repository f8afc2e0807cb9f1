"""What an exported model artefact says about itself (``metadata.json``, also embedded in the TorchScript
and ONNX files), so a service can check that it prepares windows the way the model was trained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from bpstream.shared.errors import ModelError
from bpstream.shared.modelspec import HOP_SECONDS, MODEL_CHANNELS, MODEL_SAMPLE_RATE, WINDOW_SECONDS

METADATA_FILE = "metadata.json"
TORCHSCRIPT_FILE = "model.ts"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.pt"
MODEL_NAME = "bp-resnet-lstm"


class ModelMetadata(msgspec.Struct, kw_only=True):
    """Self-description of one model version."""

    name: str = MODEL_NAME
    version: str
    created_utc: str = ""
    sample_rate: float = MODEL_SAMPLE_RATE
    window_seconds: float = WINDOW_SECONDS
    hop_seconds: float = HOP_SECONDS
    channels: list[str] = msgspec.field(default_factory=lambda: list(MODEL_CHANNELS))
    input_shape: list[int] = msgspec.field(default_factory=lambda: [-1, len(MODEL_CHANNELS),
                                                                    int(MODEL_SAMPLE_RATE * WINDOW_SECONDS)])
    outputs: list[str] = msgspec.field(default_factory=lambda: ["sbp", "dbp", "sbp_sd", "dbp_sd",
                                                                "anomaly_prob"])
    preprocessing: dict[str, Any] = msgspec.field(default_factory=dict)
    architecture: dict[str, Any] = msgspec.field(default_factory=dict)
    target_stats: dict[str, float] = msgspec.field(default_factory=dict)
    parameters: int = 0
    flops_per_window: dict[str, int] = msgspec.field(default_factory=dict)
    training_data: dict[str, Any] = msgspec.field(default_factory=dict)
    training: dict[str, Any] = msgspec.field(default_factory=dict)
    validation_metrics: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Interval half-widths per mode and calibration gains (``calibration.IntervalSpec.to_dict``).
    intervals: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Ranges of input features seen in training (e.g. ``{"heart_rate_bpm": [lo, hi]}``), for OOD checks.
    input_ranges: dict[str, list[float]] = msgspec.field(default_factory=dict)
    #: sha256 of each artefact file, checked before a service loads the version.
    sha256: dict[str, str] = msgspec.field(default_factory=dict)
    torch_version: str = ""
    files: dict[str, str] = msgspec.field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(msgspec.to_builtins(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> ModelMetadata:
        try:
            return msgspec.json.decode(data, type=cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ModelError(f"invalid model metadata: {exc}", reason="bad_metadata") from exc

    @classmethod
    def read(cls, directory: Path) -> ModelMetadata:
        path = Path(directory) / METADATA_FILE
        try:
            return cls.from_json(path.read_bytes())
        except OSError as exc:
            raise ModelError(f"cannot read {path}: {exc}", reason="missing_metadata") from exc
