"""The five services started by hand, as the README documents: `bpstream <service>` processes configured only
through BPSTREAM_* variables (each with its own Kafka user, the writer with its WRITE-only InfluxDB user), on a
fresh namespace of the running servers (a topic prefix nobody created topics under). No harness creates the
topics: each service must ensure what it reads and writes. The database is created by the InfluxDB admin, as
provisioning does in a deployment (the writer may not create one). A simulated clinic streams through them and
every window must be stored."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import run_sync

from bpstream.demo.pipeline import PipelineConfig, by_device, end_mqtt_session, free_port, stored_estimates
from bpstream.localservers import ServerEndpoints
from bpstream.shared.modelspec import HOP_SECONDS, WINDOW_SECONDS

pytestmark = pytest.mark.integration

SERVICES = ("bridge", "processor", "inference", "alerting", "writer")
NS = 1_000_000_000
DEVICES = 3
DURATION_S = 40.0
LOG_ROOT = Path("reports/logs/by-hand")


@pytest.fixture
def namespace(servers: ServerEndpoints) -> Iterator[tuple[PipelineConfig, dict[str, str]]]:
    tag = f"hand{uuid.uuid4().hex[:6]}"
    config = PipelineConfig(servers=servers, topic_prefix=f"{tag}.", database=f"{tag}_db")
    # Fresh topics: each service creates the ones it uses (its ACLs allow that under the prefix); the admin
    # only grants the ACLs and creates the database, as a deployment's provisioning does.
    run_sync(lambda: servers.grant_kafka_prefix(config.topic_prefix))
    run_sync(lambda: servers.grant_influx_database(config.database))
    env = {**os.environ, "BPSTREAM_KAFKA_TOPIC_PREFIX": config.topic_prefix,
           "BPSTREAM_INFLUX_DATABASE": config.database,
           "BPSTREAM_BRIDGE_SHARE_GROUP": f"{tag}-bridge", "BPSTREAM_BRIDGE_CLIENT_ID": f"{tag}-bridge-1",
           **{f"BPSTREAM_{name.upper()}_METRICS_PORT": str(free_port()) for name in SERVICES}}
    yield config, env
    end_mqtt_session(servers.mqtt_settings("bridge"), f"{tag}-bridge-1")


def test_five_services_started_by_hand_on_fresh_topics_store_every_window(
        servers: ServerEndpoints, namespace: tuple[PipelineConfig, dict[str, str]]) -> None:
    from bpstream.simulators.fleet import FleetConfig, mqtt_connection, run_fleet

    config, env = namespace
    log_dir = LOG_ROOT / config.topic_prefix.rstrip(".")
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = {}
    for name in SERVICES:
        with (log_dir / f"{name}.log").open("wb") as log:
            processes[name] = subprocess.Popen([sys.executable, "-m", "bpstream", name],
                                               env={**env, **servers.env(name)}, stdout=log,
                                               stderr=subprocess.STDOUT)
    clinic = f"{config.topic_prefix.rstrip('.')}-clinic"
    try:
        # The bridge subscribes once it has ensured its topics; give it the time to, then stream.
        time.sleep(15)
        fleet = run_sync(lambda: run_fleet(FleetConfig(
            **mqtt_connection(servers.mqtt_settings("simulator")), devices=DEVICES, duration_s=DURATION_S,
            speed=2.0, seed=5, scenarios=("normotensive",) * DEVICES, clinic_id=clinic,
            device_prefix=f"{clinic}-d")))
        expected = {d: int((DURATION_S - WINDOW_SECONDS) / HOP_SECONDS) for d in fleet.device_ids}

        async def stored() -> dict[str, list[dict[str, object]]]:
            return dict(by_device(await stored_estimates(config, clinic)))

        deadline = time.monotonic() + 240
        rows: dict[str, list[dict[str, object]]] = {}
        while time.monotonic() < deadline:
            rows = run_sync(stored)
            if all(len(rows.get(d, [])) >= n for d, n in expected.items()):
                break
            dead = [n for n, p in processes.items() if p.poll() is not None]
            assert not dead, f"services exited: {dead} (logs in {log_dir})"
            run_sync(lambda: asyncio.sleep(3))
        for device in fleet.device_ids:
            ends = sorted(int(r["time"]) for r in rows.get(device, []))  # type: ignore[call-overload]
            assert len(ends) >= expected[device], f"{device}: {len(ends)} of {expected[device]} windows stored"
            assert set(np.diff(ends)) == {int(HOP_SECONDS * NS)}, f"{device}: a window is missing or doubled"
        assert all(p.poll() is None for p in processes.values()), "a service exited"
    finally:
        for p in processes.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in processes.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
