"""The whole pipeline on the local servers: set-up, service start with readiness, drain detection, results.

Used by ``bpstream demo``, ``bpstream bench pipeline`` and the end-to-end tests, so all three run the system
the same way: topics created explicitly, every service a subprocess configured through ``BPSTREAM_*``
variables, readiness read from each service's ``/readyz``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bpstream.demo.supervisor import SERVICE_MODULES, ServiceSupervisor
from bpstream.localservers.core import ServerEndpoints
from bpstream.shared import influx_api
from bpstream.shared.errors import DecodeError
from bpstream.shared.gateway import is_batch, raw_record_chunks
from bpstream.shared.kafka import ensure_topics
from bpstream.shared.lag import LagProbe
from bpstream.shared.messages import peek_chunk_ids
from bpstream.shared.mqtt import configure_client
from bpstream.shared.settings import InfluxSettings, KafkaSettings, MqttSettings
from bpstream.shared.topics import ALL_TOPICS, PIPELINE_GROUPS, SIGNALS_RAW, topic_name

ENV_PREFIX = {"bridge": "BPSTREAM_BRIDGE_", "processor": "BPSTREAM_PROCESSOR_",
              "inference": "BPSTREAM_INFERENCE_", "alerting": "BPSTREAM_ALERTING_", "writer": "BPSTREAM_WRITER_"}


def end_mqtt_session(settings: MqttSettings, client_id: str, timeout_s: float = 10.0) -> bool:
    """Discard a stopped client's persistent MQTT session (connect with clean start and no expiry, leave).

    A bridge keeps its session for an hour so a restart loses nothing; after a run has ended for good, a
    session left behind would make the broker queue every later message of every clinic for a client that
    never returns (up to ``max_queued_messages`` each), slowing every later run on the same broker.
    """
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    connected = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.on_connect = lambda _c, _u, _f, reason, _p: None if reason.is_failure else connected.set()
    configure_client(client, settings)  # the session's owner: the bridge's account
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    try:
        client.connect(settings.host, settings.port, clean_start=True, properties=props)
    except OSError:
        return False
    client.loop_start()
    try:
        return connected.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _record_devices(key: bytes, value: bytes) -> list[str]:
    """The device id of every chunk a ``signals.raw`` record carries (from the key, or each batched chunk's
    header); a record that is neither is counted under its key."""
    if not is_batch(value):
        return [key.decode(errors="replace").rpartition("/")[2]]
    try:
        return [peek_chunk_ids(chunk)[1] for chunk in raw_record_chunks(value)]
    except DecodeError:
        return [key.decode(errors="replace").rpartition("/")[2]]


@dataclass(slots=True)
class PipelineConfig:
    """Where the pipeline runs and how its services are tuned.

    Connection settings come from ``servers`` (``ServerEndpoints``): the harness itself (topic creation,
    counting, queries) uses the admin users, every service process its own users (``servers.env(name)``).
    """

    servers: ServerEndpoints
    topic_prefix: str = ""
    database: str = "bpstream"
    log_dir: Path = Path("reports/logs")
    #: Extra ``BPSTREAM_*`` variables for every service, and per service.
    env: dict[str, str] = field(default_factory=dict)
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def mqtt_host(self) -> str:
        return self.servers.mqtt_host

    @property
    def mqtt_port(self) -> int:
        return self.servers.mqtt_port

    def kafka(self) -> KafkaSettings:
        """The admin's Kafka settings with this run's topic prefix."""
        return self.servers.kafka_settings(self.topic_prefix)

    def influx(self) -> InfluxSettings:
        """The admin's InfluxDB settings for this run's database."""
        return self.servers.influx_settings(self.database)

    def bridge_mqtt(self) -> MqttSettings:
        """The bridge's MQTT settings (its account, TLS with the local CA)."""
        return self.servers.mqtt_settings("bridge")

    def base_env(self) -> dict[str, str]:
        """What every service shares (no credentials: those are per service, ``service_connection_env``)."""
        return {
            "BPSTREAM_KAFKA_TOPIC_PREFIX": self.topic_prefix, "BPSTREAM_INFLUX_DATABASE": self.database,
            # Faster group rebalances after a service restart (local, single broker).
            "BPSTREAM_KAFKA_SESSION_TIMEOUT_MS": "6000", "BPSTREAM_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
            **self.env,
        }

    def service_connection_env(self, name: str) -> dict[str, str]:
        """Where the servers are and ``name``'s own users on them."""
        return self.servers.env(name)


class Pipeline:
    """The services of one run; a context manager that stops them all (bridge first) on exit."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.metrics_ports: dict[str, int] = {}
        per_service: dict[str, dict[str, str]] = {}
        for name in SERVICE_MODULES:
            port = free_port()
            self.metrics_ports[name] = port
            per_service[name] = {**config.service_connection_env(name), **config.env,
                                 f"{ENV_PREFIX[name]}METRICS_PORT": str(port), **config.service_env.get(name, {})}
        prefix = config.topic_prefix
        # A bridge shares its MQTT subscription group only with bridges of the same run. Only the bridge talks
        # MQTT, so only it gets an MQTT account (``ServerEndpoints.env``).
        per_service["bridge"].setdefault("BPSTREAM_BRIDGE_SHARE_GROUP", f"{prefix}bpstream-bridge".replace(".", "-"))
        per_service["bridge"].setdefault("BPSTREAM_BRIDGE_CLIENT_ID", f"{prefix}bridge-1".replace(".", "-")[:64])
        self.supervisor = ServiceSupervisor(env=config.base_env(), log_dir=config.log_dir,
                                            per_service_env=per_service)
        self._counter: Any = None
        self._partitions: list[Any] = []
        self._counts: dict[str, int] = {}
        self._count_lock = asyncio.Lock()

    async def prepare(self) -> None:
        """Grant every service its Kafka ACLs under the prefix, create every topic (``ALL_TOPICS``),
        create the InfluxDB database and grant the writer WRITE and Grafana READ on it (as the admins)."""
        await self.config.servers.grant_kafka_prefix(self.config.topic_prefix)
        await ensure_topics(self.config.kafka(), ALL_TOPICS)
        await self.config.servers.grant_influx_database(self.config.database)

    async def ready(self, name: str) -> bool:
        port = self.metrics_ports[name]
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def wait_ready(self, names: tuple[str, ...] = tuple(SERVICE_MODULES), timeout_s: float = 180) -> None:
        """Wait until each service answers ready; raise with its log tail if one died or never did."""
        deadline = time.monotonic() + timeout_s
        pending = list(names)
        while pending:
            dead = self.supervisor.dead()
            for name in pending:
                if name in dead:
                    raise RuntimeError(f"{name} exited with {dead[name]}:\n{self.supervisor.log_tail(name)}")
            pending = [n for n in pending if not await self.ready(n)]
            if not pending:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}\n{self.supervisor.log_tail(n)}" for n in pending)
                raise RuntimeError(f"services not ready after {timeout_s:.0f} s: {pending}\n{tails}")
            await asyncio.sleep(0.5)

    async def start(self, names: tuple[str, ...] = tuple(SERVICE_MODULES)) -> None:
        await self.prepare()
        for name in names:
            self.supervisor.start(name)
        await self.wait_ready(names)
        async with self._count_lock:
            if self._counter is None:
                await self._start_counting()

    async def restart(self, name: str, *, kill: bool = False, down_s: float = 0.0) -> None:
        """Stop one service mid-stream (SIGTERM, or SIGKILL for a crash) and start it again."""
        await asyncio.to_thread(self.supervisor.stop, name, kill=kill)
        if down_s:
            await asyncio.sleep(down_s)
        self.supervisor.start(name)
        await self.wait_ready((name,))

    async def _start_counting(self) -> None:
        """Follow ``signals.raw`` from its current end, so ``forwarded`` counts only what arrives from now on."""
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        from bpstream.shared.kafka_tools import topic_partitions

        settings = self.config.kafka()
        admin = AIOKafkaAdminClient(**settings.client_kwargs())
        await admin.start()
        try:
            partitions = await topic_partitions(admin, [topic_name(SIGNALS_RAW, settings.topic_prefix)])
        finally:
            await admin.close()
        counter = AIOKafkaConsumer(**settings.client_kwargs(), enable_auto_commit=False)
        await counter.start()
        counter.assign(partitions)
        await counter.seek_to_end(*partitions)
        for tp in partitions:
            await counter.position(tp)  # resolve the end offsets now, not at the first count
        self._counter, self._partitions = counter, partitions

    async def forwarded(self, key_prefixes: tuple[str, ...]) -> int:
        """Chunks in ``signals.raw`` since ``start()`` whose device id starts with one of ``key_prefixes`` (chunk
        records and the chunks of batch records): what the bridge forwarded for this run's devices (other
        traffic on the same broker is not counted)."""
        async with self._count_lock:
            if self._counter is None:
                await self._start_counting()
            counter = self._counter
            end = await counter.end_offsets(self._partitions)
            while True:
                behind = [tp for tp in self._partitions if await counter.position(tp) < end[tp]]
                if not behind:
                    break
                for records in (await counter.getmany(*behind, timeout_ms=500)).values():
                    for r in records:
                        for device in _record_devices(r.key or b"", r.value or b""):
                            self._counts[device] = self._counts.get(device, 0) + 1
            return sum(n for device, n in self._counts.items() if device.startswith(key_prefixes))

    def restart_dead(self) -> list[str]:
        """Start again every service that exited on its own (what a container restart policy does)."""
        dead = list(self.supervisor.dead())
        for key in dead:
            self.supervisor.stop(key)
            self.supervisor.start(key.split("-")[0], instance=key if "-" in key else None)
        return dead

    async def wait_drained(self, *, min_raw: int, key_prefixes: tuple[str, ...], timeout_s: float = 300,
                           settle_probes: int = 2, on_probe: Any = None, restart_dead: bool = False) -> dict[str, int]:
        """Wait until the bridge forwarded at least ``min_raw`` chunks of the devices named by ``key_prefixes``
        and every group's lag stayed 0.

        A service that exits meanwhile fails the wait, or with ``restart_dead`` is started again."""
        deadline = time.monotonic() + timeout_s
        zero_in_a_row = 0
        lags: dict[str, int] = {}
        # Only the groups of services this pipeline runs: a group nobody runs here (the notifier) never catches up.
        groups = {g: t for g, t in PIPELINE_GROUPS.items() if g.removeprefix("bpstream-") in SERVICE_MODULES}
        async with LagProbe(self.config.kafka(), groups) as probe:
            while time.monotonic() < deadline:
                raw = await self.forwarded(key_prefixes)
                lags = await probe.lags()
                if on_probe is not None:
                    on_probe(raw, lags)
                zero_in_a_row = zero_in_a_row + 1 if raw >= min_raw and not any(lags.values()) else 0
                if zero_in_a_row >= settle_probes:
                    return lags
                dead = self.supervisor.dead()
                if dead and restart_dead:
                    self.restart_dead()
                elif dead:
                    raise RuntimeError(f"services exited during the run: {dead}\n" + "\n".join(
                        f"--- {n}\n{self.supervisor.log_tail(n)}" for n in dead))
                await asyncio.sleep(1.0)
        raise TimeoutError(f"pipeline did not drain within {timeout_s:.0f} s: lags {lags}")

    def stop(self) -> dict[str, int | None]:
        codes = self.supervisor.stop_all()
        client_id = self.supervisor.per_service_env.get("bridge", {}).get("BPSTREAM_BRIDGE_CLIENT_ID")
        if client_id:
            end_mqtt_session(self.config.bridge_mqtt(), client_id)
        return codes

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._counter is not None:
            await self._counter.stop()
            self._counter = None
        await asyncio.to_thread(self.stop)


async def influx_rows(settings: InfluxSettings, query: str) -> list[dict[str, Any]]:
    """Rows of an InfluxQL query on ``settings``' database (tags merged into each row), timestamps in ns."""
    return await influx_api.query_rows(settings, query, timeout_s=60)


async def stored_estimates(config: PipelineConfig, clinic_id: str) -> list[dict[str, Any]]:
    """Every estimate point of a clinic in InfluxDB (one row per device and window end)."""
    return await influx_rows(config.influx(),
                             f"SELECT * FROM bp_estimate WHERE clinic = '{clinic_id}' GROUP BY device")


async def stored_alerts(config: PipelineConfig, clinic_id: str) -> list[dict[str, Any]]:
    return await influx_rows(config.influx(),
                             f"SELECT * FROM bp_alert WHERE clinic = '{clinic_id}' GROUP BY device, kind, severity")


def by_device(rows: list[dict[str, Any]]) -> Mapping[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(str(row["device"]), []).append(row)
    return out
