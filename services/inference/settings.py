"""Settings of the inference service (``BPSTREAM_INFERENCE_*``; Kafka from ``BPSTREAM_KAFKA_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from bpstream.shared.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    """Model, runtime, device and batching of the inference service."""

    model_config = SettingsConfigDict(env_prefix="BPSTREAM_INFERENCE_", frozen=True, extra="ignore")

    group_id: str = "bpstream-inference"
    #: A models root (the newest complete version is used and newer ones are picked up while running) or one
    #: version folder (pinned). Default: the repository's committed models.
    model_path: Path | None = None
    #: ``auto``: ONNX Runtime on CPU (about 20x faster than TorchScript there, see docs/BENCHMARKS.md) and
    #: TorchScript on CUDA (the onnxruntime wheel in use has no CUDA provider); or force one.
    runtime: Literal["auto", "torchscript", "onnx"] = "auto"
    #: ``auto`` uses CUDA when torch sees a GPU; ``cpu``, ``cuda`` or ``cuda:N`` force one.
    device: str = "auto"
    #: Largest batch scored in one model call.
    batch_max_size: int = Field(default=256, ge=1)
    #: Longest a window waits for its batch to fill before it is scored anyway.
    batch_max_wait_ms: int = Field(default=20, ge=0)
    #: How often the models root is checked for a newer version (0 disables hot reload).
    reload_poll_s: float = Field(default=10.0, ge=0)
    #: Threads torch / ONNX Runtime may use for one batch (0 = the library's default).
    threads: int = Field(default=0, ge=0)
    #: Cuff calibration: the reference is the model's mean output on windows ending within this many seconds
    #: of the cuff time.
    calibration_window_s: float = Field(default=60.0, gt=0)
    #: A calibration older than this (window time - cuff time) withholds estimates ("calibration due").
    calibration_max_age_s: float = Field(default=24 * 3600.0, gt=0)
    #: Calibrated estimates whose 90% SBP half-width exceeds this are withheld (mmHg).
    max_half_width_sbp: float = Field(default=25.0, gt=0)
    #: Window time of raw model outputs kept per device to form a reference (cuff readings that arrive late).
    calibration_buffer_s: float = Field(default=600.0, gt=0)
