"""Model artefacts are verified against the sha256 in their metadata before loading or hot-swapping."""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import pytest
from test_inference_reload import Clock, _export_version

from bpstream.services.inference.reload import ModelManager
from bpstream.shared.errors import ModelError
from bpstream.shared.model.metadata import METADATA_FILE, ONNX_FILE, TORCHSCRIPT_FILE, ModelMetadata
from bpstream.shared.model.runtime import DEFAULT_MODELS_ROOT, latest_model_dir, load_model

pytestmark = pytest.mark.unit


def _sign(directory: Path, version: str) -> None:
    """Write metadata.json with the artefact's sha256, as the exporter does."""
    digest = hashlib.sha256((directory / TORCHSCRIPT_FILE).read_bytes()).hexdigest()
    (directory / METADATA_FILE).write_bytes(ModelMetadata(version=version, sha256={TORCHSCRIPT_FILE: digest}).to_json())


def test_the_committed_model_verifies_in_both_runtimes() -> None:
    directory = latest_model_dir(DEFAULT_MODELS_ROOT)
    assert set(ModelMetadata.read(directory).sha256) >= {TORCHSCRIPT_FILE, ONNX_FILE}
    assert load_model(directory, runtime="onnx", device="cpu").version == directory.name


def test_a_tampered_artefact_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    directory = _export_version(tmp_path, "20261125-100000-a", complete=False)
    _sign(directory, "20261125-100000-a")
    assert load_model(directory, runtime="torchscript", device="cpu").version == "20261125-100000-a"
    with (directory / TORCHSCRIPT_FILE).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match=r"sha256 .* does not match metadata\.json") as err:
        load_model(directory, runtime="torchscript", device="cpu")
    assert err.value.reason == "artefact_checksum"


def test_metadata_naming_other_artefacts_only_is_refused(tmp_path: Path) -> None:
    directory = _export_version(tmp_path, "20261125-100000-a", complete=False)
    (directory / METADATA_FILE).write_bytes(
        ModelMetadata(version="20261125-100000-a", sha256={ONNX_FILE: "0" * 64}).to_json())
    with pytest.raises(ModelError, match=r"no sha256 for model\.ts"):
        load_model(directory, runtime="torchscript", device="cpu")


def test_metadata_without_sha256_loads_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = _export_version(tmp_path, "20261125-100000-a")  # metadata without sha256 (older exports)
    with caplog.at_level(logging.WARNING):
        assert load_model(directory, runtime="torchscript", device="cpu").version == "20261125-100000-a"
    assert any("no sha256" in r.getMessage() for r in caplog.records)


async def test_a_tampered_new_version_is_not_swapped_in_and_the_old_one_keeps_serving(tmp_path: Path) -> None:
    old = _export_version(tmp_path, "20261125-100000-a", complete=False)
    _sign(old, "20261125-100000-a")
    manager = ModelManager(tmp_path, functools.partial(load_model, runtime="torchscript", device="cpu"),
                           poll_s=1, clock=Clock())
    new = _export_version(tmp_path, "20261125-120000-b", complete=False)
    _sign(new, "20261125-120000-b")
    with (new / TORCHSCRIPT_FILE).open("ab") as fh:  # changed after export
        fh.write(b"tampered")
    manager.poll(force=True)
    assert not await manager.wait_loaded()
    assert manager.version == "20261125-100000-a" and new in manager.failed
