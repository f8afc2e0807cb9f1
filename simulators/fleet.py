"""The wearable fleet: many simulated devices publishing 1 s ECG+PPG chunks over MQTT v5 with QoS 1.

Each device has a sequence number and its own (optionally drifting) clock; the network misbehaves on request
(loss, duplicates, out-of-order delivery, reconnect storms with last-will messages, bursts after a stalled
link). Signals for all devices are generated together, one second at a time, by the vectorised engine.
Devices share a few MQTT connections ("gateways") when there are many of them; with one connection per device
each device has its own last will. Ground truth is kept in memory (``FleetReport.truth``) and optionally written
as JSON lines (``truth_path``); it never travels in the payload.

With ``enrol`` the clinic's cuff (one more MQTT connection, like a cuff station) enrols each patient: a reading
(true pressure over the last ``CUFF_SPAN_S`` before the cuff time plus Gaussian cuff error, SD ``cuff_sd_mmhg``,
seeded) on ``bpstream/<clinic>/<device>/cuff`` at ``enrol_at_s`` device seconds, then one every
``recalibrate_every_s``, as the patient's scenario plans it (``ScenarioSpec.calibration``: ``scheduled``,
``once`` for a calibration left to go stale, ``never`` for a patient never enrolled). Each reading, with the
true pressure it measured, is part of the ground truth.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from bpstream.shared.errors import TransientError
from bpstream.shared.gateway import MAX_BATCH_CHUNKS, ChunkBatch, encode_batch
from bpstream.shared.messages import SignalChunk, encode_chunk
from bpstream.shared.settings import MqttSettings
from bpstream.shared.tls import client_ssl_context
from bpstream.shared.topics import (
    ID_PATTERN,
    mqtt_cuff_topic,
    mqtt_gateway_topic,
    mqtt_signals_topic,
    mqtt_status_topic,
)
from bpstream.simulators.cohort import build_cohort
from bpstream.simulators.errors import InvalidParameterError
from bpstream.simulators.mqtt_async import AsyncMqttConnection
from bpstream.simulators.scenarios import LABEL_NAMES, MIXES, SCENARIOS, scenario_spec

log = logging.getLogger(__name__)
CHANNELS = ("ecg", "ppg")
#: Above this many devices, devices share connections by default.
MAX_DEDICATED_CONNECTIONS = 100
DEVICES_PER_GATEWAY = 50
#: A simulated cuff reading measures the mean true pressure of the beats in this span before its time.
CUFF_SPAN_S = 10.0
#: Plausible cuff output (mmHg), the bridge's default ranges: a simulated reading is clipped into them.
CUFF_SBP_RANGE = (50.0, 300.0)
CUFF_DBP_RANGE = (20.0, 200.0)


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """What to simulate and how unkind the network is. Rates are per chunk, per device."""

    mqtt_host: str
    mqtt_port: int
    devices: int
    duration_s: float
    #: 1 s chunks are published every ``1/speed`` s of wall time (device time advances 1 s per chunk).
    speed: float = 1.0
    clinic_id: str = "clinic-1"
    device_prefix: str = "dev"
    scenario: str = "mixed"
    scenarios: tuple[str, ...] | None = None
    seed: int = 0
    loss_rate: float = 0.0
    duplicate_rate: float = 0.0
    reorder_rate: float = 0.0
    #: Each device's clock runs fast or slow by a uniform draw within +-clock_drift_ppm.
    clock_drift_ppm: float = 0.0
    #: Every connection drops (with its last will) about this often, in device seconds, then reconnects.
    reconnect_every_s: float | None = None
    reconnect_pause_s: float = 0.5
    #: Every ``burst_every_s`` device seconds the link stalls for ``burst_len_s``; buffered chunks then go at once.
    burst_every_s: float | None = None
    burst_len_s: float = 5.0
    truth_path: Path | None = None
    start_time_ns: int | None = None
    #: Device second at which crisis/hypotension episodes start; None draws each within the first 60 %.
    crisis_onset_s: float | None = 30.0
    crisis_duration_s: float | None = None
    sample_rate: float = 125.0
    #: MQTT connections to use (default: one per device up to 100 devices, else one per 50 devices).
    connections: int | None = None
    username: str | None = None
    password: str | None = None
    #: TLS to the broker, trusting ``ca_file`` (None: the system store); see :func:`mqtt_connection`.
    tls: bool = False
    ca_file: str | None = None
    qos: int = 1
    #: Enrol patients with simulated cuff readings (see the module docstring); off keeps a signals-only fleet.
    enrol: bool = False
    #: Device second of the enrolment reading (windows around it form the calibration's reference).
    enrol_at_s: float = 10.0
    #: Re-calibrate ``scheduled`` patients every this many device seconds after enrolment (None: never).
    recalibrate_every_s: float | None = None
    #: SD of the simulated cuff's error (mmHg), the same for SBP and DBP, drawn independently.
    cuff_sd_mmhg: float = 5.0
    cuff_id: str = "sim-cuff"
    #: 0: each chunk is its own message on its device's topic. N >= 1: each MQTT connection acts as a clinic
    #: gateway and sends what it collected in a tick as ``ChunkBatch`` messages of at most N chunks on
    #: ``bpstream/<clinic>/gateway/<gateway>/batch`` (see ``bpstream.shared.gateway``).
    gateway_batch: int = 0
    #: Independent devices: connection j of m starts its 1 s chunks (device time) and publishes them j/m s
    #: into each second, as wearables and gateways switched on at different moments do. Off: every device's
    #: chunk boundaries and publications coincide, the worst-case burst for the pipeline.
    stagger: bool = False

    def ssl_context(self) -> ssl.SSLContext | None:
        return client_ssl_context(self.ca_file) if self.tls else None

    def __post_init__(self) -> None:
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise InvalidParameterError(f"devices must be a positive integer, got {self.devices!r}")
        if not (math.isfinite(self.duration_s) and self.duration_s >= 1):
            raise InvalidParameterError(f"duration_s must be at least 1 s (one chunk), got {self.duration_s}")
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise InvalidParameterError(f"speed must be a positive number, got {self.speed}")
        for name in ("loss_rate", "duplicate_rate", "reorder_rate"):
            value = getattr(self, name)
            if not (0.0 <= value < 1.0):
                raise InvalidParameterError(f"{name} must be within [0, 1), got {value}")
        if not (0 <= self.clock_drift_ppm <= 10_000):
            raise InvalidParameterError(f"clock_drift_ppm must be within [0, 10000], got {self.clock_drift_ppm}")
        for name in ("reconnect_every_s", "burst_every_s"):
            value = getattr(self, name)
            if value is not None and not value >= 1:
                raise InvalidParameterError(f"{name} must be >= 1 s or None, got {value}")
        if self.burst_len_s <= 0 or self.reconnect_pause_s < 0:
            raise InvalidParameterError("burst_len_s must be > 0 and reconnect_pause_s >= 0")
        if not (1 <= self.mqtt_port <= 65535):
            raise InvalidParameterError(f"mqtt_port must be within [1, 65535], got {self.mqtt_port}")
        if not (0 <= self.gateway_batch <= MAX_BATCH_CHUNKS):
            raise InvalidParameterError(f"gateway_batch must be within [0, {MAX_BATCH_CHUNKS}], "
                                        f"got {self.gateway_batch}")
        if self.qos not in (0, 1, 2):
            raise InvalidParameterError(f"qos must be 0, 1 or 2, got {self.qos}")
        if self.connections is not None and not (1 <= self.connections <= self.devices):
            raise InvalidParameterError(f"connections must be within [1, devices], got {self.connections}")
        if self.crisis_onset_s is not None and not self.crisis_onset_s >= 0:
            raise InvalidParameterError(f"crisis_onset_s must be >= 0, got {self.crisis_onset_s}")
        if not (math.isfinite(self.enrol_at_s) and self.enrol_at_s >= 1):
            raise InvalidParameterError(f"enrol_at_s must be >= 1 s, got {self.enrol_at_s}")
        if self.recalibrate_every_s is not None and not (math.isfinite(self.recalibrate_every_s)
                                                         and self.recalibrate_every_s >= 10):
            raise InvalidParameterError(f"recalibrate_every_s must be >= 10 s or None, got {self.recalibrate_every_s}")
        if not (math.isfinite(self.cuff_sd_mmhg) and 0 <= self.cuff_sd_mmhg <= 30):
            raise InvalidParameterError(f"cuff_sd_mmhg must be within [0, 30], got {self.cuff_sd_mmhg}")
        if not ID_PATTERN.match(self.cuff_id):
            raise InvalidParameterError(f"cuff_id {self.cuff_id!r} must match {ID_PATTERN.pattern}")
        for ident, what in ((self.clinic_id, "clinic_id"), (f"{self.device_prefix}-0", "device_prefix")):
            if not ID_PATTERN.match(ident):
                raise InvalidParameterError(f"{what} {ident!r} must match {ID_PATTERN.pattern}")
        if self.scenarios is not None:
            if len(self.scenarios) != self.devices:
                raise InvalidParameterError(f"{len(self.scenarios)} scenarios given for {self.devices} devices")
            for name in self.scenarios:
                scenario_spec(name)
        elif self.scenario not in SCENARIOS and self.scenario not in MIXES and self.scenario != "clinic":
            scenario_spec(self.scenario)

    def device_ids(self) -> list[str]:
        width = max(3, len(str(self.devices - 1)))
        return [f"{self.device_prefix}-{i:0{width}d}" for i in range(self.devices)]


@dataclass(slots=True)
class _DeviceTruth:
    chunk_seq: list[int] = field(default_factory=list)
    chunk_t0_ns: list[int] = field(default_factory=list)
    beat_ns: list[np.ndarray] = field(default_factory=list)
    beat_sbp: list[np.ndarray] = field(default_factory=list)
    beat_dbp: list[np.ndarray] = field(default_factory=list)
    chunk_label: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class CuffTruth:
    """One simulated cuff reading: what was published (``sbp``/``dbp``) and the true pressure it measured."""

    device_id: str
    time_ns: int
    sbp: float
    dbp: float
    true_sbp: float
    true_dbp: float
    cuff_id: str
    #: 0 for the enrolment reading, then 1, 2, ... for re-calibrations.
    number: int

    def as_json(self) -> dict[str, object]:
        return {"type": "cuff", "device_id": self.device_id, "time_ns": self.time_ns, "sbp": self.sbp,
                "dbp": self.dbp, "true_sbp": self.true_sbp, "true_dbp": self.true_dbp, "cuff_id": self.cuff_id,
                "number": self.number}


def cuff_times(plan: str, duration_s: float, enrol_at_s: float, recalibrate_every_s: float | None) -> list[float]:
    """Device seconds of a patient's cuff readings within ``[0, duration_s]`` under a scenario's cuff plan."""
    if plan == "never" or enrol_at_s > duration_s:
        return []
    if plan == "once" or recalibrate_every_s is None:
        return [enrol_at_s]
    if plan != "scheduled":
        raise InvalidParameterError(f"unknown cuff plan {plan!r}")
    count = math.floor((duration_s - enrol_at_s) / recalibrate_every_s) + 1
    return [enrol_at_s + i * recalibrate_every_s for i in range(count)]


def simulated_cuff(true_sbp: float, true_dbp: float, err_sbp: float, err_dbp: float) -> tuple[float, float]:
    """A cuff's reading of a true pressure with the given errors: whole mmHg, in plausible ranges, SBP > DBP."""
    sbp = float(np.clip(np.round(true_sbp + err_sbp), *CUFF_SBP_RANGE))
    dbp = float(np.clip(np.round(true_dbp + err_dbp), *CUFF_DBP_RANGE))
    return sbp, min(dbp, sbp - 1.0)


class FleetTruth:
    """Ground truth per device in device time: every beat's SBP/DBP, every chunk's seq and t0, cuff readings."""

    def __init__(self, scenarios: dict[str, str]) -> None:
        self.scenarios = scenarios
        self._dev: dict[str, _DeviceTruth] = {d: _DeviceTruth() for d in scenarios}
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        #: Simulated cuff readings in publishing order.
        self.cuffs: list[CuffTruth] = []

    def add_chunk(self, device_id: str, seq: int, t0_ns: int, beat_ns: np.ndarray, sbp: np.ndarray,
                  dbp: np.ndarray, label: str) -> None:
        d = self._dev.setdefault(device_id, _DeviceTruth())
        d.chunk_seq.append(seq)
        d.chunk_t0_ns.append(t0_ns)
        d.beat_ns.append(beat_ns)
        d.beat_sbp.append(sbp)
        d.beat_dbp.append(dbp)
        d.chunk_label.append(label)
        self._cache.pop(device_id, None)

    @property
    def device_ids(self) -> list[str]:
        return list(self._dev)

    def beats(self, device_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(beat_time_ns, sbp, dbp)`` of every beat of a device, in device time."""
        if device_id not in self._cache:
            d = self._dev[device_id]
            if not d.beat_ns:
                return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
            self._cache[device_id] = (np.concatenate(d.beat_ns), np.concatenate(d.beat_sbp),
                                      np.concatenate(d.beat_dbp))
        return self._cache[device_id]

    def chunks(self, device_id: str) -> list[tuple[int, int, str]]:
        """``(seq, t0_ns, label)`` of every chunk the device produced (published or lost)."""
        d = self._dev[device_id]
        return list(zip(d.chunk_seq, d.chunk_t0_ns, d.chunk_label, strict=True))

    def between(self, device_id: str, start_ns: int, end_ns: int) -> tuple[float, float]:
        t, sbp, dbp = self.beats(device_id)
        sel = (t >= start_ns) & (t < end_ns)
        if not sel.any():
            return float("nan"), float("nan")
        return float(sbp[sel].mean()), float(dbp[sel].mean())


def truth_between(truth: FleetTruth, device_id: str, start_ns: int, end_ns: int) -> tuple[float, float]:
    """Mean true SBP/DBP of a device's beats whose R peak lies in ``[start_ns, end_ns)`` of device time."""
    return truth.between(device_id, start_ns, end_ns)


def load_truth(path: Path) -> FleetTruth:
    """Read a truth file written by a fleet run (``truth_path``), e.g. from another process."""
    scenarios: dict[str, str] = {}
    rows = []
    with Path(path).open() as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    for row in rows:
        if row.get("type") == "device":
            scenarios[row["device_id"]] = row["scenario"]
    truth = FleetTruth(scenarios)
    for row in rows:
        if row.get("type") == "chunk":
            truth.add_chunk(row["device_id"], row["seq"], row["t0_ns"], np.asarray(row["beat_ns"], dtype=np.int64),
                            np.asarray(row["beat_sbp"]), np.asarray(row["beat_dbp"]), row["label"])
        elif row.get("type") == "cuff":
            truth.cuffs.append(CuffTruth(row["device_id"], int(row["time_ns"]), float(row["sbp"]),
                                         float(row["dbp"]), float(row["true_sbp"]), float(row["true_dbp"]),
                                         row["cuff_id"], int(row.get("number", 0))))
    return truth


@dataclass(slots=True)
class FleetReport:
    """What a fleet run did. ``published`` counts distinct chunks the broker acknowledged (QoS >= 1)."""

    device_ids: list[str]
    scenarios: dict[str, str]
    chunks_per_device: int
    published: int
    publishes: int
    lost_by_design: dict[str, list[int]]
    duplicates: dict[str, list[int]]
    reordered: dict[str, list[int]]
    reconnects: int
    unacked: int
    wall_s: float
    max_lag_s: float
    truth: FleetTruth
    #: Cuff readings published (and acknowledged by the broker unless ``unacked`` says otherwise).
    cuff_readings: int = 0

    @property
    def expected_delivered(self) -> int:
        return self.chunks_per_device * len(self.device_ids) - sum(len(v) for v in self.lost_by_design.values())


@dataclass(slots=True)
class _Gateway:
    conn: AsyncMqttConnection
    devices: list[int]
    online: bool = True
    queue: list[tuple[str, bytes]] = field(default_factory=list)
    #: Gateway batching: chunks collected this tick, and the gateway's batch topic.
    pending: list[bytes] = field(default_factory=list)
    batch_topic: str = ""
    #: Staggered fleets: the connection's phase within each second, and the single-chunk messages of this tick.
    phase_s: float = 0.0
    deferred: list[tuple[str, bytes]] = field(default_factory=list)
    next_drop_s: float = math.inf
    back_at_s: float = -1.0
    burst_until_s: float = -1.0
    next_burst_s: float = math.inf


async def run_fleet(cfg: FleetConfig) -> FleetReport:
    """Run the fleet to the end of ``duration_s`` device time and return what happened."""
    ids = cfg.device_ids()
    n = cfg.devices
    n_chunks = math.ceil(cfg.duration_s)
    cohort = build_cohort(list(cfg.scenarios) if cfg.scenarios else cfg.scenario, n, cfg.seed, float(n_chunks),
                          sample_rate=cfg.sample_rate, crisis_onset_s=cfg.crisis_onset_s,
                          crisis_duration_s=cfg.crisis_duration_s)
    net = np.random.default_rng(np.random.SeedSequence([cfg.seed, 7]))
    drift = net.uniform(-cfg.clock_drift_ppm, cfg.clock_drift_ppm, n) * 1e-6
    start_ns = cfg.start_time_ns if cfg.start_time_ns is not None else time.time_ns()
    scenarios = dict(zip(ids, cohort.names, strict=True))
    truth = FleetTruth(scenarios)
    n_conn = cfg.connections or (n if n <= MAX_DEDICATED_CONNECTIONS else math.ceil(n / DEVICES_PER_GATEWAY))
    dedicated = n_conn == n
    run_tag = uuid.uuid4().hex[:6]
    gateways: list[_Gateway] = []
    for j in range(n_conn):
        owner = ids[j] if dedicated else f"{cfg.device_prefix}-gw{j:03d}"
        conn = AsyncMqttConnection(f"bpsim-{run_tag}-{owner}"[:64], cfg.mqtt_host, cfg.mqtt_port,
                                   will_topic=mqtt_status_topic(cfg.clinic_id, owner), username=cfg.username,
                                   password=cfg.password, tls=cfg.ssl_context())
        gw = _Gateway(conn, list(range(j, n, n_conn)), batch_topic=mqtt_gateway_topic(cfg.clinic_id, owner),
                      phase_s=j / n_conn if cfg.stagger else 0.0)
        if cfg.reconnect_every_s:
            gw.next_drop_s = float(net.uniform(0.2, 1.0) * cfg.reconnect_every_s)
        if cfg.burst_every_s:
            gw.next_burst_s = float(net.uniform(0.2, 1.0) * cfg.burst_every_s)
        gateways.append(gw)

    # Each device's clock starts at its connection's phase (0 for all unless staggered).
    device_start_ns = np.full(n, start_ns, dtype=np.int64)
    for gw in gateways:
        device_start_ns[gw.devices] += round(gw.phase_s * 1e9)

    # The clinic's cuff: its own connection (a cuff station), its own random stream (cuff errors).
    cuff_conn: AsyncMqttConnection | None = None
    cuff_due: list[tuple[float, int, int]] = []  # (device second, device index, reading number)
    if cfg.enrol:
        for i, name in enumerate(cohort.names):
            times = cuff_times(scenario_spec(name).calibration, float(n_chunks), cfg.enrol_at_s,
                               cfg.recalibrate_every_s)
            cuff_due += [(at, i, number) for number, at in enumerate(times)]
        cuff_due.sort()
        cuff_conn = AsyncMqttConnection(f"bpsim-{run_tag}-{cfg.device_prefix}-cuff"[:64], cfg.mqtt_host,
                                        cfg.mqtt_port, username=cfg.username, password=cfg.password,
                                        tls=cfg.ssl_context())
    cuff_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 11]))
    cuff_published = 0

    truth_fh: IO[str] | None = None
    if cfg.truth_path is not None:
        Path(cfg.truth_path).parent.mkdir(parents=True, exist_ok=True)
        # written line by line while the fleet runs, so other processes can follow it
        truth_fh = Path(cfg.truth_path).open("w")  # noqa: ASYNC230, SIM115
        for i, dev in enumerate(ids):
            truth_fh.write(json.dumps({"type": "device", "device_id": dev, "clinic_id": cfg.clinic_id,
                                       "scenario": cohort.names[i], "start_ns": int(device_start_ns[i]),
                                       "drift_ppm": round(float(drift[i] * 1e6), 3),
                                       "profile": cohort.profiles.as_dict(i, cohort.names[i])}) + "\n")

    async def announce(gw: _Gateway) -> None:
        owners = [ids[i] for i in gw.devices] if not dedicated else []
        if dedicated:
            owners = [ids[gw.devices[0]]]
        else:
            owners.append(f"{cfg.device_prefix}-gw{gateways.index(gw):03d}")
        for dev in owners:
            gw.conn.publish(mqtt_status_topic(cfg.clinic_id, dev), b"online", qos=1, retain=True)

    await asyncio.gather(*(g.conn.connect() for g in gateways), *([cuff_conn.connect()] if cuff_conn else []))
    for g in gateways:
        await announce(g)

    lost: dict[str, list[int]] = {d: [] for d in ids}
    dups: dict[str, list[int]] = {d: [] for d in ids}
    reord: dict[str, list[int]] = {d: [] for d in ids}
    held: dict[int, tuple[str, bytes]] = {}
    delayed_dups: list[tuple[int, str, bytes]] = []
    publishes = 0
    reconnects = 0
    loop = asyncio.get_running_loop()
    wall0 = loop.time()
    max_lag = 0.0
    topics = [mqtt_signals_topic(cfg.clinic_id, d) for d in ids]
    seq_ns = np.round(1e9 * (1 + drift)).astype(np.int64)  # device-clock nanoseconds per chunk
    label_names = LABEL_NAMES

    def send(gw: _Gateway, topic: str, payload: bytes) -> None:
        nonlocal publishes
        if gw.online and device_s >= gw.burst_until_s:
            if cfg.gateway_batch:
                gw.pending.append(payload)  # sent by flush() at the end of the tick
                return
            if cfg.stagger:
                gw.deferred.append((topic, payload))  # sent at the connection's phase (release)
                return
            gw.conn.publish(topic, payload, qos=cfg.qos)
            publishes += 1
        else:
            gw.queue.append((topic, payload))

    def flush(only: _Gateway | None = None) -> None:
        """Publish what gateways collected this tick (all, or ``only``): a staggered connection's messages, and
        gateway batches of at most ``gateway_batch`` chunks."""
        nonlocal publishes
        for gw in gateways if only is None else [only]:
            deferred, gw.deferred = gw.deferred, []
            for topic, payload in deferred:
                gw.conn.publish(topic, payload, qos=cfg.qos)
                publishes += 1
            if not cfg.gateway_batch:
                continue
            pending, gw.pending = gw.pending, []
            for at in range(0, len(pending), cfg.gateway_batch):
                batch = ChunkBatch(clinic_id=cfg.clinic_id, gateway_id=gw.batch_topic.split("/")[3],
                                   chunks=pending[at:at + cfg.gateway_batch])
                gw.conn.publish(gw.batch_topic, encode_batch(batch), qos=cfg.qos)
                publishes += 1

    async def release(k: int) -> None:
        """The end of tick ``k``: publish every connection's messages, at its phase when staggered."""
        if not cfg.stagger:
            flush()
            return
        for gw in gateways:  # in order of phase
            target = wall0 + (k + gw.phase_s) / cfg.speed
            now = loop.time()
            if target > now:
                await asyncio.sleep(target - now)
            flush(gw)

    clean_end = False
    try:
        for k in range(n_chunks):
            target = wall0 + k / cfg.speed
            now = loop.time()
            if target > now:
                await asyncio.sleep(target - now)
            else:
                max_lag = max(max_lag, now - target)
            device_s = float(k)
            # link events: reconnect storms and bursts
            for gw in gateways:
                if gw.online and not gw.conn.is_connected:
                    # The broker went away (crash, restart): reconnect as a real gateway does, once per tick.
                    # paho keeps every unacknowledged QoS 1 publish and sends it again once connected.
                    try:
                        await gw.conn.connect(within_s=2.0)
                        reconnects += 1
                    except TransientError:
                        pass
                if gw.online and device_s >= gw.next_drop_s:
                    await gw.conn.drain(within_s=10.0)
                    await gw.conn.disconnect(send_will=True)
                    gw.online = False
                    gw.back_at_s = device_s + max(1.0, cfg.reconnect_pause_s * cfg.speed)
                    assert cfg.reconnect_every_s is not None
                    gw.next_drop_s = device_s + float(net.uniform(0.5, 1.5) * cfg.reconnect_every_s)
                elif not gw.online and device_s >= gw.back_at_s:
                    await gw.conn.connect()
                    reconnects += 1
                    gw.online = True
                    await announce(gw)
                if device_s >= gw.next_burst_s:
                    gw.burst_until_s = device_s + cfg.burst_len_s
                    assert cfg.burst_every_s is not None
                    gw.next_burst_s = device_s + float(net.uniform(0.5, 1.5) * cfg.burst_every_s)
                if gw.online and device_s >= gw.burst_until_s and gw.queue:
                    queued, gw.queue = gw.queue, []
                    for topic, payload in queued:
                        send(gw, topic, payload)
            block = cohort.engine.step(1.0)
            t0_ns = device_start_ns + k * seq_ns
            beat_bounds = np.searchsorted(block.beat_device, np.arange(n + 1))
            draws = net.random((3, n))
            label_counts = np.stack([(block.labels == code).sum(axis=1) for code in range(len(label_names))], 1)
            chunk_labels = [label_names[int(c)] for c in label_counts.argmax(axis=1)]
            for p in delayed_dups:
                gw = gateways[p[0] % n_conn]
                send(gw, p[1], p[2])
            delayed_dups = []
            for i in range(n):
                sl = slice(beat_bounds[i], beat_bounds[i + 1])
                beat_ns = device_start_ns[i] + np.round(block.beat_time[sl] * seq_ns[i]).astype(np.int64)
                label = chunk_labels[i]
                truth.add_chunk(ids[i], k, int(t0_ns[i]), beat_ns, block.beat_sbp[sl], block.beat_dbp[sl], label)
                if truth_fh is not None:
                    truth_fh.write(json.dumps({
                        "type": "chunk", "device_id": ids[i], "seq": k, "t0_ns": int(t0_ns[i]),
                        "duration_ns": round(1e9 * block.ecg.shape[1] / cfg.sample_rate),
                        "sbp": round(float(block.beat_sbp[sl].mean()), 2) if sl.stop > sl.start else None,
                        "dbp": round(float(block.beat_dbp[sl].mean()), 2) if sl.stop > sl.start else None,
                        "label": label, "lost": bool(draws[0, i] < cfg.loss_rate),
                        "beat_ns": beat_ns.tolist(), "beat_sbp": np.round(block.beat_sbp[sl], 2).tolist(),
                        "beat_dbp": np.round(block.beat_dbp[sl], 2).tolist()}) + "\n")
                if draws[0, i] < cfg.loss_rate:
                    lost[ids[i]].append(k)
                    continue
                payload = encode_chunk(SignalChunk(cfg.clinic_id, ids[i], k, int(t0_ns[i]), cfg.sample_rate,
                                                   CHANNELS, np.stack([block.ecg[i], block.ppg[i]])))
                gw = gateways[i % n_conn]
                if i in held:  # the held-back previous chunk goes after this one
                    send(gw, topics[i], payload)
                    send(gw, *held.pop(i))
                elif draws[1, i] < cfg.reorder_rate and k < n_chunks - 1:
                    held[i] = (topics[i], payload)
                    reord[ids[i]].append(k)
                else:
                    send(gw, topics[i], payload)
                if draws[2, i] < cfg.duplicate_rate:
                    dups[ids[i]].append(k)
                    delayed_dups.append((i, topics[i], payload))
            # cuff readings whose measurement span has been generated (beats up to device second k + 1)
            while cuff_due and cuff_due[0][0] <= k + 1:
                at_s, i, number = cuff_due.pop(0)
                # a cuff reports whole seconds (its time travels as epoch seconds, exact for whole seconds)
                at_ns = (int(device_start_ns[i]) + round(at_s * int(seq_ns[i]))) // 1_000_000_000 * 1_000_000_000
                cuff = _cuff_reading(cfg, truth, ids[i], at_ns, number, cuff_rng)
                if cuff is None:
                    continue
                assert cuff_conn is not None
                cuff_conn.publish(mqtt_cuff_topic(cfg.clinic_id, ids[i]), json.dumps({
                    "sbp": cuff.sbp, "dbp": cuff.dbp, "time": cuff.time_ns // 1_000_000_000, "cuff_id": cuff.cuff_id,
                    "confirmation": False}).encode(), qos=1)
                cuff_published += 1
                truth.cuffs.append(cuff)
                if truth_fh is not None:
                    truth_fh.write(json.dumps(cuff.as_json()) + "\n")
            await release(k)
            if truth_fh is not None:
                truth_fh.flush()
        device_s = float(n_chunks)
        for i, item in held.items():
            send(gateways[i % n_conn], *item)
        for p in delayed_dups:
            send(gateways[p[0] % n_conn], p[1], p[2])
        for gw in gateways:
            if gw.online and not gw.conn.is_connected:  # the broker is (still) away: wait for it
                for _ in range(60):
                    try:
                        await gw.conn.connect(within_s=2.0)
                        reconnects += 1
                        break
                    except TransientError:
                        await asyncio.sleep(1.0)
            if not gw.online:
                await gw.conn.connect()
                reconnects += 1
                gw.online = True
                await announce(gw)
            gw.burst_until_s = -1.0
            queued, gw.queue = gw.queue, []
            for topic, payload in queued:
                send(gw, topic, payload)
        flush()
        await asyncio.gather(*(g.conn.drain(within_s=60.0) for g in gateways),
                             *([cuff_conn.drain(within_s=30.0)] if cuff_conn else []))
        unacked = sum(g.conn.unacked for g in gateways) + (cuff_conn.unacked if cuff_conn else 0)
        for g in gateways:
            owners = [ids[i] for i in g.devices]
            if not dedicated:
                owners.append(f"{cfg.device_prefix}-gw{gateways.index(g):03d}")
            for dev in owners:
                g.conn.publish(mqtt_status_topic(cfg.clinic_id, dev), b"offline", qos=1, retain=True)
        await asyncio.gather(*(g.conn.drain(within_s=10.0) for g in gateways))
        clean_end = True
    finally:
        # cancelled or failed: leave with the last will so status topics do not stay "online"
        for g in gateways:
            await g.conn.disconnect(send_will=not clean_end)
        if cuff_conn is not None:
            await cuff_conn.disconnect()
        if truth_fh is not None:
            truth_fh.close()
    # Every chunk handed to paho is acknowledged unless ``unacked`` says otherwise (then a lower bound).
    distinct = n * n_chunks - sum(len(v) for v in lost.values())
    return FleetReport(device_ids=ids, scenarios=scenarios, chunks_per_device=n_chunks,
                       published=max(0, distinct - unacked), publishes=publishes,
                       lost_by_design=lost, duplicates=dups, reordered=reord, reconnects=reconnects,
                       unacked=unacked, wall_s=loop.time() - wall0, max_lag_s=max_lag, truth=truth,
                       cuff_readings=cuff_published)


def _cuff_reading(cfg: FleetConfig, truth: FleetTruth, device_id: str, time_ns: int, number: int,
                  rng: np.random.Generator) -> CuffTruth | None:
    """The cuff's reading at ``time_ns``: true mean over the preceding ``CUFF_SPAN_S`` plus cuff error."""
    true_sbp, true_dbp = truth.between(device_id, time_ns - round(CUFF_SPAN_S * 1e9), time_ns)
    err = rng.normal(0.0, cfg.cuff_sd_mmhg, 2)  # drawn even when unused: one missing reading shifts no other
    if not (math.isfinite(true_sbp) and math.isfinite(true_dbp)):
        return None  # no beats in the span (cannot happen with the engine's pulse; kept for safety)
    sbp, dbp = simulated_cuff(true_sbp, true_dbp, float(err[0]), float(err[1]))
    return CuffTruth(device_id, time_ns, sbp, dbp, round(true_sbp, 2), round(true_dbp, 2), cfg.cuff_id, number)



def mqtt_connection(settings: MqttSettings) -> dict[str, Any]:
    """``FleetConfig`` keyword arguments that connect as ``settings`` say (host, port, account, TLS):
    ``FleetConfig(**mqtt_connection(servers.mqtt_settings("simulator")), devices=...)``."""
    return {"mqtt_host": settings.host, "mqtt_port": settings.port, "username": settings.username,
            "password": settings.password.get_secret_value() if settings.password else None,
            "tls": settings.tls, "ca_file": settings.ca_file}
