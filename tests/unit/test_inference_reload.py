"""Model hot reload: a newer complete version is loaded in the background and swapped in between batches;
incomplete or broken versions are never put into service."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from bpstream.services.inference.reload import ModelManager
from bpstream.shared.model.metadata import METADATA_FILE, MODEL_NAME, TORCHSCRIPT_FILE, ModelMetadata
from bpstream.shared.model.runtime import load_model

pytestmark = pytest.mark.unit


def _export_version(root: Path, version: str, *, broken: bool = False, complete: bool = True) -> Path:
    """A real (untrained, small) TorchScript artefact in the runtime's folder layout."""
    import torch

    from bpstream.shared.model.network import BpNet, Deployable, NetworkConfig, TargetStats

    directory = root / MODEL_NAME / version
    directory.mkdir(parents=True)
    if broken:
        (directory / TORCHSCRIPT_FILE).write_bytes(b"not a torchscript archive")
    else:
        torch.manual_seed(0)
        net = BpNet(NetworkConfig(stem_channels=4, stage_channels=(4, 8), lstm_hidden=8)).eval()
        torch.jit.script(Deployable(net, TargetStats())).save(str(directory / TORCHSCRIPT_FILE))
    if complete:  # the exporter writes metadata.json last
        (directory / METADATA_FILE).write_bytes(ModelMetadata(version=version).to_json())
    return directory


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_newer_complete_version_is_swapped_in_only_between_batches(tmp_path: Path) -> None:
    _export_version(tmp_path, "20261125-100000-a")
    clock = Clock()
    manager = ModelManager(tmp_path, functools.partial(load_model, runtime="torchscript", device="cpu"),
                           poll_s=10, clock=clock)
    assert manager.version == "20261125-100000-a"

    _export_version(tmp_path, "20261125-110000-b", complete=False)  # still being copied
    clock.now = 11
    manager.poll()
    assert not await manager.wait_loaded() and manager.version == "20261125-100000-a"

    directory = tmp_path / MODEL_NAME / "20261125-110000-b"
    (directory / METADATA_FILE).write_bytes(ModelMetadata(version="20261125-110000-b").to_json())
    manager.poll()  # polled too soon: nothing happens until poll_s passed
    assert not await manager.wait_loaded()
    clock.now = 22
    manager.poll()
    in_service = manager.model
    # A batch that started before the swap keeps its model object to the end.
    before = in_service.predict(np.zeros((3, 2, 1000), dtype=np.float32))
    assert len(before) == 3
    assert await manager.wait_loaded()
    assert manager.version == "20261125-110000-b" and manager.reloads == 1
    assert in_service.version == "20261125-100000-a"


async def test_broken_version_is_skipped_and_the_old_model_stays(tmp_path: Path) -> None:
    _export_version(tmp_path, "20261125-100000-a")
    manager = ModelManager(tmp_path, functools.partial(load_model, runtime="torchscript", device="cpu"),
                           poll_s=1, clock=Clock())
    broken = _export_version(tmp_path, "20261125-120000-x", broken=True)
    manager.poll(force=True)
    assert not await manager.wait_loaded()
    assert manager.version == "20261125-100000-a" and broken in manager.failed
    manager.poll(force=True)  # not retried
    assert not await manager.wait_loaded()
