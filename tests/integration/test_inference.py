"""The inference service against real Kafka with the committed model: every window scored exactly once
(or flagged, or dead-lettered with its reason), offsets committed only after the estimates were accepted,
and a new model version picked up mid-stream without dropping or double-scoring a window."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pipeline_support import wait_until

from bpstream.localservers import ServerEndpoints
from bpstream.services.inference.service import run_inference
from bpstream.services.inference.settings import InferenceSettings
from bpstream.shared.kafka import KafkaProducer
from bpstream.shared.kafka_tools import read_topic
from bpstream.shared.messages import Estimate, Window, decode_dead_letter, decode_estimate, encode_window
from bpstream.shared.model.metadata import METADATA_FILE, MODEL_NAME, ModelMetadata
from bpstream.shared.model.runtime import latest_model_dir
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import ESTIMATES, SIGNALS_DLQ, WINDOWS

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]
T0 = 1_760_000_000_000_000_000
HOP = 2 * 10**9


def _window(device: str, i: int, *, quality_ok: bool = True, n: int = 1000) -> Window:
    rng = np.random.default_rng(i)
    samples = rng.standard_normal((2, n)).astype("<f4")
    return Window(clinic_id="c1", device_id=device, start_ns=T0 + i * HOP - 8 * 10**9, end_ns=T0 + i * HOP,
                  sample_rate=125.0, channels=("ecg", "ppg"), n_samples=n, samples=samples.tobytes(),
                  sqi={"ecg": 0.9, "ppg": 0.9 if quality_ok else 0.1}, quality_ok=quality_ok,
                  received_ns=T0 + i * HOP)


def _settings(servers: ServerEndpoints, prefix: str, **overrides: object) -> InferenceSettings:
    return InferenceSettings(kafka=servers.kafka_settings(prefix, "inference"),  # the service's own user
                             device="cpu", batch_max_size=16, batch_max_wait_ms=50, **overrides)  # type: ignore[arg-type]


async def _estimates(kafka: KafkaSettings) -> list[Estimate]:
    return [decode_estimate(r.value or b"") for r in await read_topic(kafka, ESTIMATES)]


def _count_at_least(kafka: KafkaSettings, n: int) -> Callable[[], object]:
    async def check() -> list[Estimate]:
        found = await _estimates(kafka)
        return found if len(found) >= n else []

    return check


async def test_windows_are_scored_flagged_or_dead_lettered_and_never_rescored_after_restart(
        servers: ServerEndpoints, kafka_topics: str) -> None:
    settings = _settings(servers, kafka_topics)
    admin = servers.kafka_settings(kafka_topics)  # the test's own reads and writes
    good = [_window(f"dev-{d}", i) for d in range(3) for i in range(10)]
    poor = [_window("dev-9", i, quality_ok=False) for i in range(3)]
    short = _window("dev-8", 0, n=900)
    async with KafkaProducer(admin) as producer:
        await producer.send_many([(WINDOWS, encode_window(w), w.device_id) for w in good + poor + [short]])
        await producer.send(WINDOWS, b"\x93not a window", key="dev-7")

    stop = asyncio.Event()
    task = asyncio.create_task(run_inference(settings, stop))
    estimates = await wait_until(_count_at_least(admin, 33), timeout_s=180, what="33 estimates")
    stop.set()
    await asyncio.wait_for(task, timeout=60)

    scored = [e for e in estimates if e.quality_ok]
    assert sorted((e.device_id, e.window_end_ns) for e in scored) == sorted((w.device_id, w.end_ns) for w in good)
    version = ModelMetadata.read(latest_model_dir()).version
    assert all(e.model_version == version and e.inputs == "ecg+ppg" for e in scored)
    assert all(np.isfinite([e.sbp, e.dbp, e.sbp_sd, e.dbp_sd]).all() and 0 <= e.anomaly_prob <= 1 for e in scored)
    flagged = [e for e in estimates if not e.quality_ok]
    assert sorted(e.window_end_ns for e in flagged) == [w.end_ns for w in poor]
    assert all(e.device_id == "dev-9" and e.inputs == "none" for e in flagged)
    letters = {decode_dead_letter(r.value or b"").reason for r in await read_topic(admin, SIGNALS_DLQ)}
    assert letters == {"length_mismatch", "invalid_message"}

    # Restarted, the service resumes after the committed offsets: nothing is scored twice.
    async with KafkaProducer(admin) as producer:
        await producer.send(WINDOWS, encode_window(_window("dev-0", 99)), key="dev-0")
    stop = asyncio.Event()
    task = asyncio.create_task(run_inference(settings, stop))
    await wait_until(_count_at_least(admin, 34), timeout_s=180, what="the 34th estimate")
    await asyncio.sleep(3)
    stop.set()
    await asyncio.wait_for(task, timeout=60)
    final = await _estimates(admin)
    assert len(final) == 34
    assert [e.device_id for e in final if e.window_end_ns == T0 + 99 * HOP] == ["dev-0"]


async def test_new_model_version_is_picked_up_without_dropping_or_double_scoring(
        servers: ServerEndpoints, kafka_topics: str, tmp_path: Path) -> None:
    committed = latest_model_dir()
    root = tmp_path / "models"
    old = root / MODEL_NAME / "20200101-000000-old"
    shutil.copytree(committed, old)
    metadata = ModelMetadata.read(committed)
    metadata.version = old.name
    (old / METADATA_FILE).write_bytes(metadata.to_json())
    settings = _settings(servers, kafka_topics, model_path=root, reload_poll_s=0.5)
    admin = servers.kafka_settings(kafka_topics)  # the test's own reads and writes
    stop = asyncio.Event()
    task = asyncio.create_task(run_inference(settings, stop))
    async with KafkaProducer(admin) as producer:
        for i in range(40):
            await producer.send(WINDOWS, encode_window(_window("dev-r", i)), key="dev-r")
            if i == 15:  # roll out a new version mid-stream; metadata.json is written last, as the exporter does
                new = root / MODEL_NAME / "20300101-000000-new"
                shutil.copytree(committed, new, ignore=shutil.ignore_patterns(METADATA_FILE))
                metadata = ModelMetadata.read(committed)
                metadata.version = "20300101-000000-new"
                (new / METADATA_FILE).write_bytes(metadata.to_json())
            await asyncio.sleep(0.1)
    estimates = await wait_until(_count_at_least(admin, 40), timeout_s=180, what="40 estimates")

    probe = iter(range(100, 1000))

    async def swapped() -> bool:
        i = next(probe)
        async with KafkaProducer(admin) as producer:
            await producer.send(WINDOWS, encode_window(_window("dev-r", i)), key="dev-r")
        await asyncio.sleep(1)
        found = await _estimates(admin)
        return any(e.window_end_ns >= T0 + 100 * HOP and e.model_version == "20300101-000000-new" for e in found)

    await wait_until(swapped, timeout_s=120, what="estimates from the new version", interval_s=2)
    stop.set()
    await asyncio.wait_for(task, timeout=60)
    estimates = [e for e in await _estimates(admin) if e.window_end_ns < T0 + 100 * HOP]
    ends = [e.window_end_ns for e in estimates]
    assert sorted(ends) == [T0 + i * HOP for i in range(40)]  # each window exactly once
    versions = [e.model_version for e in sorted(estimates, key=lambda e: e.window_end_ns)]
    # Per device order is kept: old version first, then only the new one.
    switch = versions.index("20300101-000000-new") if "20300101-000000-new" in versions else len(versions)
    assert set(versions[:switch]) <= {"20200101-000000-old"} and set(versions[switch:]) <= {"20300101-000000-new"}
