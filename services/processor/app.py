"""The processor's Faust application: ``signals.raw`` in, ``windows`` and ``quality`` out, state in a Table.

One agent consumes ``signals.raw`` (raw bytes, keyed by device) in batches. Per device, the state of the pure
stage (:mod:`bpstream.services.processor.stage`) lives in a Faust Table whose compacted changelog is
co-partitioned with ``signals.raw``. The processor writes that changelog itself, through the idempotent
producer: the table is updated only after a batch's windows and quality records were acknowledged, and what
changed reaches the changelog at checkpoints (every ``checkpoint_interval_s``, on SIGTERM, and when a
rebalance revokes partitions). The first time it meets a partition after start or after a rebalance, it reads
that partition's states from the changelog itself (Faust's restore was seen to return an older record).

The processor does not rely on Faust for *which* records it saw. Next to the device states, the changelog holds
one offset mark per partition: the ``signals.raw`` offset after the last record the stored states include. A
record below the mark is a replay and is passed over; a record above it means records in between were not
processed into the stored state (a crash after the last checkpoint, or a consumer that skipped records: Faust
drops and acks records it fetched before a rebalance or while flow control was paused), so the processor reads
that range back from Kafka itself and processes it first. Delivery is at-least-once: a replay can re-emit an
identical window, never lose one, and sinks treat ``(device, end_ns)`` as identity.

Topics are created here explicitly (``ensure_topics``) with the partitions from ``bpstream.shared.topics``,
and Faust is not allowed to declare any; its web server is disabled (the service's own HealthServer serves
/metrics and /readyz on loopback).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import faust
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from bpstream.services.processor.settings import ProcessorSettings
from bpstream.services.processor.stage import (
    NS,
    WINDOW,
    DeviceState,
    Reassembler,
    StageConfig,
    WindowCut,
    decode_state,
    encode_state,
)
from bpstream.shared.errors import BpstreamError, DecodeError
from bpstream.shared.kafka import OutgoingRecord, RecoveringProducer, ensure_topics
from bpstream.shared.kafka_tools import read_range, read_topic
from bpstream.shared.logging import pseudonym
from bpstream.shared.messages import DeadLetter, QualityRecord, Window, decode_chunk, encode_json, encode_window
from bpstream.shared.retry import retry_async
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import QUALITY, SIGNALS_DLQ, SIGNALS_RAW, WINDOWS, KafkaTopic, device_key, topic_name

log = logging.getLogger(__name__)

STAGE = "processor"
STATE_TABLE = "device-state"
#: Key prefix of the per-partition offset marks in the state table ('#' is not allowed in a device id, so a
#: mark never collides with a device's state).
OFFSET_MARK_PREFIX = b"#next-offset/"


def offset_mark_key(partition: int) -> bytes:
    """Table key of the offset mark of one ``signals.raw`` partition."""
    return OFFSET_MARK_PREFIX + str(partition).encode()


def is_offset_mark(key: bytes) -> bool:
    return key.startswith(OFFSET_MARK_PREFIX)


class ProcessorMetrics:
    """Prometheus metrics of the processor."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.chunks = Counter("bpstream_processor_chunks_total", "Chunks consumed from signals.raw", registry=registry)
        self.windows = Counter(
            "bpstream_processor_windows_total",
            "Windows emitted, by quality",
            ["quality_ok"],
            registry=registry,
        )
        self.events = Counter(
            "bpstream_processor_stream_events_total",
            "Gaps, clock jumps, format changes, resets and refused windows",
            ["kind"],
            registry=registry,
        )
        self.dropped = Counter(
            "bpstream_processor_dropped_chunks_total",
            "Chunks ignored, by reason",
            ["reason"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "bpstream_processor_dead_letters_total",
            "Records dead-lettered, by reason",
            ["reason"],
            registry=registry,
        )
        self.replayed = Counter(
            "bpstream_processor_replayed_records_total",
            "Records below the partition's offset mark (already processed) that were passed over",
            registry=registry,
        )
        self.read_back = Counter(
            "bpstream_processor_read_back_records_total",
            "Records the consumer skipped that the processor read back from Kafka and processed",
            registry=registry,
        )
        self.repaired = Counter(
            "bpstream_processor_repaired_chunks_total",
            "Chunks that arrived after their gap was declared, within the late horizon, and completed windows",
            registry=registry,
        )
        self.checkpoints = Counter(
            "bpstream_processor_checkpoints_total",
            "Writes of the changed device states and offset marks to the changelog",
            registry=registry,
        )
        self.send_retries = Counter(
            "bpstream_processor_send_retries_total",
            "Batches whose outputs Kafka refused and that were sent again",
            registry=registry,
        )
        self.devices = Gauge("bpstream_processor_devices", "Devices with state in this worker (counted at checkpoints)",
                             registry=registry)
        self.batch_seconds = Histogram(
            "bpstream_processor_batch_seconds",
            "Time to process one batch of chunks, including Kafka acknowledging its outputs",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )


def changelog_topic(settings: ProcessorSettings) -> KafkaTopic:
    """The state table's changelog (Faust names it ``<app id>-<table>-changelog``; the app id has the prefix)."""
    return KafkaTopic(
        f"{settings.app_id}-{STATE_TABLE}-changelog",
        partitions=SIGNALS_RAW.partitions,
        retention_ms=-1,
        compacted=True,
    )


def stage_config(settings: ProcessorSettings) -> StageConfig:
    return StageConfig(
        window_ns=round(settings.window_s * NS),
        hop_ns=round(settings.hop_s * NS),
        max_reorder_chunks=settings.max_reorder_chunks,
        max_lateness_ns=round(settings.max_lateness_s * NS),
        clock_tolerance_ns=round(settings.clock_tolerance_s * NS),
        max_buffer_chunks=settings.max_buffer_chunks,
        max_ahead_ns=None if settings.max_device_ahead_s is None else round(settings.max_device_ahead_s * NS),
        max_behind_ns=None if settings.max_device_behind_s is None else round(settings.max_device_behind_s * NS),
        max_seq_jump=settings.max_seq_jump,
        late_horizon_ns=round(settings.late_horizon_s * NS),
        max_repair_chunks=settings.max_repair_chunks,
        defer_preparation=True,  # a batch's windows are prepared together (handle_batch)
    )


def broker_credentials(kafka: KafkaSettings) -> faust.SASLCredentials | None:
    """Faust's form of the SASL settings the aiokafka clients use (None for a plaintext local broker)."""
    if not kafka.sasl_mechanism:
        return None
    return faust.SASLCredentials(
        username=kafka.sasl_username,
        password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
        mechanism=kafka.sasl_mechanism,
        ssl_context=ssl.create_default_context() if "SSL" in kafka.security_protocol else None,
    )


async def create_topics(settings: ProcessorSettings) -> None:
    """Create every topic the processor reads, writes or keeps state in (idempotent)."""
    await ensure_topics(settings.kafka, [SIGNALS_RAW, SIGNALS_DLQ, WINDOWS, QUALITY, changelog_topic(settings)])


class DeviceStateTable(faust.Table):  # type: ignore[type-arg]
    """The per-device state table. Faust recovers it from its changelog at start and on rebalance.

    The processor writes the changelog itself (``Processor.checkpoint``), through the idempotent producer,
    with offset marks that say where a restart must resume. Faust's own changelog path sends through a buffer
    whose ``flush`` returns after a 0.1 s stall with records still queued, and its committed offsets say
    nothing about which records the stored states include.
    """

    def store_locally(self, key: bytes, value: bytes) -> None:
        """Update the in-memory store only (the changelog gets it at the next checkpoint)."""
        self.data[key] = value


#: A record to produce: topic, value, key (and, for offset marks, the partition).
Output = OutgoingRecord


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One ``signals.raw`` record as the agent hands it over (timestamp in seconds, as Faust gives it)."""

    key: bytes | None
    value: bytes | None
    partition: int
    offset: int
    timestamp_s: float


class Processor:
    """Builds the Faust app (agent, table, topics) around the pure stage."""

    def __init__(self, settings: ProcessorSettings, *, registry: CollectorRegistry = REGISTRY) -> None:
        self.settings = settings
        self.metrics = ProcessorMetrics(registry)
        self.reassembler = Reassembler(stage_config(settings))
        kafka = settings.kafka
        prefix = kafka.topic_prefix
        os.makedirs(settings.data_dir, exist_ok=True)
        self.app = faust.App(
            f"{prefix}{settings.app_id}",
            broker=[f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")],
            broker_credentials=broker_credentials(kafka),
            broker_request_timeout=kafka.request_timeout_ms / 1000,
            broker_session_timeout=kafka.session_timeout_ms / 1000,
            broker_heartbeat_interval=kafka.heartbeat_interval_ms / 1000,
            broker_commit_interval=settings.commit_interval_s,
            consumer_auto_offset_reset="earliest",
            topic_partitions=SIGNALS_RAW.partitions,
            topic_replication_factor=kafka.replication_factor,
            topic_allow_declare=False,
            topic_disable_leader=True,
            producer_acks=-1,
            store="memory://",
            web_enabled=False,
            key_serializer="raw",
            value_serializer="raw",
            datadir=os.path.join(settings.data_dir, f"{prefix}{settings.app_id}"),
            autodiscover=False,
        )
        self.raw_topic = self.app.topic(
            topic_name(SIGNALS_RAW, prefix),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )
        # Outputs go through the shared idempotent producer (acks=all): a batch's send returns only once Kafka
        # has every record, which is what allows the state to be written afterwards.
        self.producer = RecoveringProducer(kafka)
        self.table = DeviceStateTable(
            self.app,
            name=STATE_TABLE,
            default=None,
            beacon=self.app.tables.beacon,
            partitions=SIGNALS_RAW.partitions,
            key_type=bytes,  # bytes selects the raw serializer for the store and changelog recovery
            value_type=bytes,
            schema=faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"),
        )
        self.app.tables.add(self.table)
        self.changelog = changelog_topic(settings)
        self.started = False
        #: Incremented when partitions are revoked (a rebalance starts); a partition whose state was read from the
        #: changelog in an older generation is read again before its next record is processed.
        self._generation = 0
        self._partition_generation: dict[int, int] = {}
        #: Serialises batches and checkpoints (a rebalance checkpoints while a batch may still be finishing).
        self.lock = asyncio.Lock()
        #: Monotonic time of the last processed batch (or of the last moment the worker was not ready).
        self.last_progress = time.monotonic()
        #: Table keys (device states, offset marks) changed since the last checkpoint, with their partition.
        self._unsaved: dict[bytes, int] = {}
        self._last_checkpoint = time.monotonic()
        self._checkpoint_now = False
        self.app.agent(self.raw_topic, name="reassemble")(self._agent)
        self.app.on_partitions_revoked.connect(self._on_partitions_revoked)

    def ready(self) -> bool:
        """Readiness: the worker started and holds its partitions (not in the middle of a rebalance)."""
        return self.started and not self.app.rebalancing

    async def _agent(self, stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        # Batches: one wait for Kafka's acknowledgements per batch instead of one per window.
        take_events = stream.take_events  # type: ignore[attr-defined]
        async for events in take_events(self.settings.batch_max, self.settings.batch_wait_s):
            records = [RawRecord(e.key, e.value, e.message.partition, e.message.offset, e.message.timestamp)
                       for e in events]
            # Faust acks a taken batch when the stream closes, processed or not, and then commits its offsets.
            # So a stop in the middle of a batch first finishes the batch: no offset is ever committed for a
            # record whose windows and state were not written (that would be a silent gap after restart).
            batch = asyncio.ensure_future(self._locked_batch(records))
            try:
                await asyncio.shield(batch)
            except asyncio.CancelledError:
                await batch
                raise
            yield None

    async def _locked_batch(self, records: list[RawRecord]) -> None:
        async with self.lock:
            await self.handle_batch(records)

    async def handle_batch(self, records: list[RawRecord]) -> None:
        """Process a batch of ``signals.raw`` records; return once everything they produced is in Kafka.

        Device states and the partitions' offset marks are updated in the table only after the windows and
        quality records computed from them were acknowledged, and reach the changelog at the next checkpoint:
        after a crash the stored state is never ahead of what was published, and the records after it are
        read back, so a replay can duplicate a window (same identity) but never lose one.
        """
        started = time.perf_counter()
        states: dict[bytes, tuple[DeviceState, int]] = {}
        sends: list[Output] = []
        cuts: list[WindowCut] = []
        ordered, marks = await self._in_offset_order(records)
        for record in ordered:
            try:
                sends.extend(self._handle(record, states, cuts))
            except Exception as exc:  # a bug or bad state: dead-letter and move on, never block the partition
                reason = exc.reason if isinstance(exc, BpstreamError) else "internal_error"
                log.exception("processing failed", extra={"reason": reason})
                sends.append(self._dead_letter(record, reason, f"{type(exc).__name__}: {exc}"))
        if cuts:
            sends.extend(self._finish(cuts))
        if sends:
            await self._send_until_accepted(sends)
        # The live state is the table; the changelog gets it at checkpoints (marks after states), which is
        # what a restart resumes from: records after the checkpoint's marks are read back from Kafka.
        for key, (state, partition) in states.items():
            self.table.store_locally(key, encode_state(state))
            self._unsaved[key] = partition
        for partition, offset in marks.items():
            self.table.store_locally(offset_mark_key(partition), str(offset).encode())
            self._unsaved[offset_mark_key(partition)] = partition
        if self._checkpoint_now or time.monotonic() - self._last_checkpoint >= self.settings.checkpoint_interval_s:
            await self.checkpoint()
        self.last_progress = time.monotonic()
        self.metrics.chunks.inc(len(records))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    async def checkpoint(self) -> None:
        """Write every device state and offset mark changed since the last checkpoint to the changelog.

        Keyed by device, the default partitioner puts a state in the same partition number as the device's
        signals.raw records (equal partition counts), which is where Faust's recovery looks; marks go to their
        partition explicitly, after the states, so a stored mark implies the states it covers are stored.
        """
        unsaved, self._unsaved = self._unsaved, {}
        self._checkpoint_now = False
        self._last_checkpoint = time.monotonic()
        if not unsaved:
            return
        sends: list[Output] = []
        marks: list[Output] = []
        for key, partition in unsaved.items():
            value = self.table.get(key)
            if value is None:
                continue
            if is_offset_mark(key):
                marks.append((self.changelog, value, key, partition))
            else:
                sends.append((self.changelog, value, key))
        await self._send_until_accepted(sends + marks)
        self.metrics.checkpoints.inc()
        # Counted here rather than per batch: walking the table is O(devices).
        self.metrics.devices.set(sum(1 for key in self.table if not is_offset_mark(key)))

    def _offset_mark(self, partition: int) -> int | None:
        """The next ``signals.raw`` offset to process in a partition, from the table (None: never recorded)."""
        stored = self.table.get(offset_mark_key(partition))
        try:
            return int(stored) if stored is not None else None
        except ValueError:
            log.warning("unreadable offset mark; trusting the consumer", extra={"partition": partition})
            return None

    async def _in_offset_order(self, records: list[RawRecord]) -> tuple[list[RawRecord], dict[int, int]]:
        """The batch's records without replays, with records the consumer skipped read back in their place.

        Also returns the new offset mark of every partition the batch advances.
        """
        expected: dict[int, int] = {}
        advanced: dict[int, int] = {}
        out: list[RawRecord] = []
        stale = sorted({r.partition for r in records} - {p for p, g in self._partition_generation.items()
                                                          if g == self._generation})
        if stale:
            await self.restore_partitions(stale)
        for record in records:
            partition = record.partition
            if partition not in expected:
                mark = self._offset_mark(partition)
                if mark is None:
                    # A partition without a mark: record one at once, so a crash before the next regular
                    # checkpoint cannot leave the committed offsets ahead of any stored state.
                    self._checkpoint_now = True
                expected[partition] = record.offset if mark is None else mark
            if record.offset < expected[partition]:
                self.metrics.replayed.inc()
                continue
            if record.offset > expected[partition]:
                missing = await self._read_back(partition, expected[partition], record.offset)
                log.warning("records after the stored state were not delivered; read them back from Kafka",
                            extra={"partition": partition, "from_offset": expected[partition],
                                   "to_offset": record.offset, "records": len(missing)})
                self.metrics.read_back.inc(len(missing))
                out.extend(missing)
            out.append(record)
            expected[partition] = advanced[partition] = record.offset + 1
        return out, advanced

    async def _read_back(self, partition: int, start: int, end: int) -> list[RawRecord]:
        """Read ``signals.raw`` offsets ``start..end-1`` of a partition directly from Kafka (retrying)."""
        async def read() -> list[RawRecord]:
            found = await read_range(self.settings.kafka, SIGNALS_RAW, partition, start, end)
            return [RawRecord(r.key, r.value, r.partition, r.offset, r.timestamp / 1000) for r in found]

        return await retry_async(read, attempts=60, cap_s=5.0, what="read back skipped records")

    async def _send_until_accepted(self, sends: list[Output]) -> None:
        """Send the batch's outputs, retrying (capped, jittered backoff) for as long as Kafka refuses them.

        Giving up is not an option: the batch's offsets would be acked and its windows lost. If Kafka never
        comes back, the process is eventually killed without committing, and the batch is replayed.
        """
        attempt = 0
        while True:
            try:
                await self.producer.send_many(sends)
                return
            except BpstreamError as exc:
                attempt += 1
                delay = random.uniform(0, min(5.0, 0.2 * 2**attempt))
                self.metrics.send_retries.inc()
                log.warning("outputs not accepted by Kafka; retrying",
                            extra={"reason": exc.reason, "attempt": attempt, "delay_s": round(delay, 2)})
                await asyncio.sleep(delay)

    def _handle(self, record: RawRecord, states: dict[bytes, tuple[DeviceState, int]],
                cuts: list[WindowCut]) -> list[Output]:
        key, value = record.key, record.value
        if value is None or key is None:
            return [self._dead_letter(record, "missing_key_or_value", "record without key or value")]
        try:
            chunk = decode_chunk(value)
        except DecodeError as exc:
            return [self._dead_letter(record, exc.reason, str(exc))]
        if device_key(chunk.clinic_id, chunk.device_id).encode() != key:
            return [self._dead_letter(record, "key_mismatch", "key is not the chunk's clinic/device")]
        state = states[key][0] if key in states else self._load(key)
        state, out = self.reassembler.process(
            state, chunk, value, received_ns=round(record.timestamp_s * NS), now_ns=time.time_ns()
        )
        if out.rejected is not None:  # out of bounds: dead-lettered, the device's state untouched
            return [self._dead_letter(record, out.rejected.reason, out.rejected.detail)]
        if out.repaired:
            self.metrics.repaired.inc()
        if out.duplicate or out.late:
            self.metrics.dropped.labels(reason="duplicate" if out.duplicate else "late").inc()
            return []
        states[key] = (state, record.partition)
        cuts.extend(out.cuts)
        return self._outputs(out.windows, out.quality)

    def _outputs(self, windows: list[Window], quality: list[QualityRecord]) -> list[Output]:
        sends: list[Output] = []
        for window in windows:
            sends.append((WINDOWS, encode_window(window), device_key(window.clinic_id, window.device_id)))
            self.metrics.windows.labels(quality_ok=str(window.quality_ok).lower()).inc()
        for record in quality:
            sends.append((QUALITY, encode_json(record), device_key(record.clinic_id, record.device_id)))
            if record.kind != WINDOW:
                self.metrics.events.labels(kind=record.kind).inc()
        return sends

    def _finish(self, cuts: list[WindowCut]) -> list[Output]:
        """Prepare the batch's cut windows together; a failure (a bug, never bad data) costs only its window."""
        now = time.time_ns()
        try:
            return self._outputs(*self.reassembler.finish(cuts, now))
        except Exception:
            log.exception("preparing a batch of windows failed; preparing them one by one")
        sends: list[Output] = []
        for cut in cuts:
            try:
                sends.extend(self._outputs(*self.reassembler.finish([cut], now)))
            except Exception as exc:
                sends.extend(self._outputs([], [cut.error(f"internal_error: {type(exc).__name__}: {exc}", now)]))
        return sends

    async def _on_partitions_revoked(self, sender: Any, /, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        """A rebalance starts: store everything held in memory, so whichever worker gets a partition next
        (this one included) resumes from the changelog exactly where this one stopped."""
        async with self.lock:
            await self.checkpoint()
            self._generation += 1

    async def restore_partitions(self, partitions: Sequence[int]) -> None:
        """Load partitions' device states and offset marks from the changelog into the table (one read).

        Done by the processor itself for all partitions before it starts, and again for a partition the first
        time it meets it after a rebalance: Faust's own recovery was seen to restore an older record of a
        device, and a state older than the partition's mark would silently skip records.
        """
        async def read() -> dict[bytes, bytes]:
            latest: dict[bytes, bytes] = {}
            for record in await read_topic(self.settings.kafka, self.changelog, only=partitions):
                if record.key is None:
                    continue
                if record.value is None:
                    latest.pop(record.key, None)
                else:
                    latest[record.key] = record.value
            return latest

        latest = await retry_async(read, attempts=60, cap_s=5.0, what="read device states")
        for key, value in latest.items():
            self.table.store_locally(key, value)
            self._unsaved.pop(key, None)
        for partition in partitions:
            self._partition_generation[partition] = self._generation
        log.info("device states read from the changelog",
                 extra={"partitions": list(partitions), "devices": sum(1 for k in latest if not is_offset_mark(k))})

    def _load(self, key: bytes) -> DeviceState | None:
        stored = self.table.get(key)
        if stored is None:
            return None
        try:
            return decode_state(stored)
        except DecodeError:
            log.warning("unreadable device state; starting afresh",
                        extra={"device_ref": pseudonym(key.decode(errors="replace"))})
            return None

    def _dead_letter(self, record: RawRecord, reason: str, detail: str) -> Output:
        self.metrics.dead_letters.labels(reason=reason).inc()
        letter = DeadLetter(
            stage=STAGE,
            reason=reason,
            detail=detail[:1000],
            source=topic_name(SIGNALS_RAW, self.settings.kafka.topic_prefix),
            payload=(record.value or b"")[:65536],
            key=record.key.decode(errors="replace") if record.key is not None else None,
            partition=record.partition,
            offset=record.offset,
            received_ns=time.time_ns(),
        )
        return (SIGNALS_DLQ, encode_json(letter), STAGE)
