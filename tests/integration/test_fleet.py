"""The fleet and replay against the real local Mosquitto: every chunk arrives except the injected losses."""

from __future__ import annotations

import collections
import itertools
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from bpstream.shared.messages import decode_chunk
from bpstream.shared.mqtt import configure_client
from bpstream.shared.settings import MqttSettings
from bpstream.simulators.fleet import FleetConfig, load_truth, mqtt_connection, run_fleet, truth_between
from bpstream.simulators.realdata import mimic_dir

pytestmark = pytest.mark.integration


class Recorder:
    """A plain paho subscriber that keeps every signal chunk and status message of one clinic."""

    def __init__(self, settings: MqttSettings, clinic: str) -> None:
        self.chunks: dict[str, list[Any]] = collections.defaultdict(list)
        self.arrived: dict[str, list[float]] = collections.defaultdict(list)  # monotonic time of each chunk
        self.status: dict[str, list[bytes]] = collections.defaultdict(list)
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        configure_client(self.client, settings)  # TLS, the observer account (reads every clinic)
        self.client.connect(settings.host, settings.port)
        self.client.subscribe(f"bpstream/{clinic}/#", qos=1)
        self.client.loop_start()
        assert subscribed.wait(10), "subscription was not acknowledged"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device = msg.topic.split("/")[2]
        with self.lock:
            if msg.topic.endswith("/signals"):
                self.chunks[device].append(decode_chunk(msg.payload))
                self.arrived[device].append(time.monotonic())
            else:
                self.status[device].append(msg.payload)

    def total(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.chunks.values())

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.total() < count and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # let any stray extra message (a bug) arrive too

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def test_fleet_of_50_delivers_every_chunk_except_injected_losses(servers: Any, tmp_path: Path) -> None:
    clinic = f"t{uuid.uuid4().hex[:8]}"
    rec = Recorder(servers.mqtt_settings("observer"), clinic)
    try:
        cfg = FleetConfig(**mqtt_connection(servers.mqtt_settings("simulator")), devices=50, duration_s=20, speed=10.0,
                          clinic_id=clinic, scenario="mixed", seed=3, loss_rate=0.05, duplicate_rate=0.05,
                          reorder_rate=0.05, clock_drift_ppm=200, reconnect_every_s=8,
                          truth_path=tmp_path / "truth.jsonl")
        report = await run_fleet(cfg)
        n_dups = sum(len(v) for v in report.duplicates.values())
        rec.wait_for(report.expected_delivered + n_dups)
    finally:
        rec.close()
    lost = {d: set(v) for d, v in report.lost_by_design.items()}
    assert sum(map(len, lost.values())) > 0, "the run should have injected some losses"
    assert report.unacked == 0 and report.reconnects > 0
    for dev in report.device_ids:
        seqs = [c.seq for c in rec.chunks[dev]]
        assert set(seqs) == set(range(20)) - lost[dev], dev
        assert len(seqs) == 20 - len(lost[dev]) + len(report.duplicates[dev])
    # duplicates are byte-identical resends; reordering is visible as a seq going backwards
    assert any(any(b.seq < a.seq for a, b in itertools.pairwise(v)) for v in rec.chunks.values())
    # payload: 1 s of ecg+ppg at 125 Hz with device timestamps that follow seq (drifting clocks)
    chunk = rec.chunks[report.device_ids[0]][0]
    assert chunk.channels == ("ecg", "ppg") and chunk.samples.shape == (2, 125) and chunk.sample_rate == 125.0
    for dev in report.device_ids[:5]:
        by_seq = {c.seq: c.t0_ns for c in rec.chunks[dev]}
        seqs = sorted(by_seq)
        step = np.diff([by_seq[s] for s in seqs]) / np.diff(seqs)
        assert np.all(np.abs(step - 1e9) <= 200e-6 * 1e9 + 1)
    # last will: the reconnect storm made the broker announce devices offline, and they came back online
    assert any(b"offline" in v for v in rec.status.values())
    assert all(rec.status[d] and rec.status[d][-1] == b"offline" for d in report.device_ids)  # clean end
    # ground truth: available per device-time span, from memory and from the truth file, never in payloads
    dev = report.device_ids[0]
    t0 = rec.chunks[dev][0].t0_ns
    sbp, dbp = truth_between(report.truth, dev, t0, t0 + 8 * 10**9)
    assert 50 < dbp < sbp < 250
    assert truth_between(load_truth(tmp_path / "truth.jsonl"), dev, t0, t0 + 8 * 10**9) == pytest.approx(
        (sbp, dbp), abs=0.01)


async def test_shared_gateway_connections_deliver_everything(servers: Any) -> None:
    clinic = f"t{uuid.uuid4().hex[:8]}"
    rec = Recorder(servers.mqtt_settings("observer"), clinic)
    try:
        cfg = FleetConfig(**mqtt_connection(servers.mqtt_settings("simulator")), devices=120, duration_s=5, speed=5.0,
                          clinic_id=clinic, scenario="clinic", connections=3, burst_every_s=2, burst_len_s=2)
        report = await run_fleet(cfg)
        rec.wait_for(report.expected_delivered)
    finally:
        rec.close()
    assert rec.total() == 120 * 5 and report.published == 600
    assert sorted(report.scenarios.values()).count("crisis") == 1


async def test_a_staggered_fleet_publishes_each_connection_at_its_own_phase(servers: Any) -> None:
    """Independent devices: connection j of 4 starts its chunks (device time) and publishes them j/4 s into
    each second, so the pipeline sees a steady flow rather than one burst a second."""
    clinic = f"t{uuid.uuid4().hex[:8]}"
    rec = Recorder(servers.mqtt_settings("observer"), clinic)
    try:
        cfg = FleetConfig(**mqtt_connection(servers.mqtt_settings("simulator")), devices=8, duration_s=4,
                          clinic_id=clinic, scenario="clinic", connections=4, stagger=True)
        report = await run_fleet(cfg)
        rec.wait_for(report.expected_delivered)
    finally:
        rec.close()
    assert rec.total() == 8 * 4
    ids = report.device_ids  # device i rides on connection i % 4
    lags = []
    for i, dev in enumerate(ids):
        own = sorted(rec.chunks[dev], key=lambda c: c.seq)
        assert [c.seq for c in own] == [0, 1, 2, 3]
        # device clocks start at the connection's phase
        assert own[0].t0_ns - rec.chunks[ids[0]][0].t0_ns == (i % 4) * 250_000_000
        lags.append(float(np.median(np.array(sorted(rec.arrived[dev])) - np.array(sorted(rec.arrived[ids[0]])))))
    # ...and each connection's chunks arrive after the previous connection's, 250 ms apart on a quiet machine
    assert lags[0] == 0 and lags[1] > lags[0] and lags[2] > lags[1] and lags[3] > lags[2], lags


async def test_replay_of_mimic_windows_publishes_every_gap_free_second(servers: Any, tmp_path: Path) -> None:
    from bpstream.simulators.replay import load_sources, replay, replay_connection

    if not mimic_dir().exists():
        pytest.skip(f"real recordings not found at {mimic_dir()} (../shared/data is outside the repository)")
    clinic = f"t{uuid.uuid4().hex[:8]}"
    sources = load_sources(mimic_dir(), limit=3)
    rec = Recorder(servers.mqtt_settings("observer"), clinic)
    try:
        report = await replay(sources, **replay_connection(servers.mqtt_settings("simulator")), clinic_id=clinic,
                              speed=60.0, truth_path=tmp_path / "ref.jsonl")
        rec.wait_for(report.published)
    finally:
        rec.close()
    assert rec.total() == report.published == 3 * 60 - sum(len(v) for v in report.skipped_gaps.values())
    first = sources[0]
    got = sorted(rec.chunks[first.device_id], key=lambda c: c.seq)
    assert np.allclose(got[5].samples[0], first.ecg[625:750], atol=np.ptp(first.ecg[625:750]) / 30000 + 1e-6)
    ref = load_truth(tmp_path / "ref.jsonl")
    sbp, _ = truth_between(ref, first.device_id, got[0].t0_ns, got[0].t0_ns + 60 * 10**9)
    assert sbp == pytest.approx(float(np.mean(first.beat_sbp)), abs=0.05)


async def test_cancelled_fleet_leaves_devices_offline(servers: Any) -> None:
    import asyncio

    clinic = f"t{uuid.uuid4().hex[:8]}"
    rec = Recorder(servers.mqtt_settings("observer"), clinic)
    try:
        cfg = FleetConfig(**mqtt_connection(servers.mqtt_settings("simulator")), devices=3, duration_s=600, speed=2.0,
                          clinic_id=clinic, scenario="normotensive")
        task = asyncio.create_task(run_fleet(cfg))
        deadline = time.monotonic() + 30
        while rec.total() < 6 and time.monotonic() < deadline:  # noqa: ASYNC110 (filled by paho thread)
            await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.0)
    finally:
        rec.close()
    assert rec.total() >= 6
    for dev in cfg.device_ids():
        assert rec.status[dev][0] == b"online" and rec.status[dev][-1] == b"offline"  # the last will


async def test_replay_of_a_simulated_dataset_publishes_its_samples(servers: Any, tmp_path: Path) -> None:
    from bpstream.simulators.dataset import simulate_cohort, write_dataset
    from bpstream.simulators.replay import load_sources, replay, replay_connection

    write_dataset(simulate_cohort(2, 0.25, seed=9), tmp_path / "ds")
    sources = load_sources(tmp_path / "ds")
    clinic = f"t{uuid.uuid4().hex[:8]}"
    rec = Recorder(servers.mqtt_settings("observer"), clinic)
    try:
        report = await replay(sources, **replay_connection(servers.mqtt_settings("simulator")), clinic_id=clinic,
                              speed=50.0)
        rec.wait_for(report.published)
    finally:
        rec.close()
    assert report.published == rec.total() == 2 * 15
    src = sources[1]
    chunk = next(c for c in rec.chunks[src.device_id] if c.seq == 7)
    assert np.allclose(chunk.samples[1], src.ppg[875:1000], atol=np.ptp(src.ppg[875:1000]) / 30000 + 1e-6)
