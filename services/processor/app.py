"""The processor's Faust application: ``signals.raw`` in, ``windows`` and ``quality`` out, state in a Table.

One agent consumes ``signals.raw`` (raw bytes, keyed by device). Per device, the state of the pure stage
(:mod:`bpstream.services.processor.stage`) lives in a Faust Table whose changelog topic is compacted and
co-partitioned with ``signals.raw``, so a restarted (or rebalanced) worker rebuilds it and carries on where
the previous one stopped. Faust commits a record's offset only after the agent processed it and after the
producer flushed what the agent sent, so delivery is at-least-once; the stage's forward-only window ends make
a replay re-emit nothing already recorded in the state, and sinks treat ``(device, end_ns)`` as identity.

Topics are created here explicitly (``ensure_topics``) with the partitions from ``bpstream.shared.topics``,
and Faust is not allowed to declare any; its web server is disabled (the service's own HealthServer serves
/metrics and /readyz on loopback).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import faust
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from bpstream.services.processor.settings import ProcessorSettings
from bpstream.services.processor.stage import (
    NS,
    DeviceState,
    Reassembler,
    StageConfig,
    decode_state,
    encode_state,
)
from bpstream.shared.errors import BpstreamError, DecodeError
from bpstream.shared.kafka import ensure_topics
from bpstream.shared.messages import DeadLetter, decode_chunk, encode_json, encode_window
from bpstream.shared.topics import QUALITY, SIGNALS_DLQ, SIGNALS_RAW, WINDOWS, KafkaTopic, topic_name

log = logging.getLogger(__name__)

STAGE = "processor"
STATE_TABLE = "device-state"


class ProcessorMetrics:
    """Prometheus metrics of the processor."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.chunks = Counter(
            "bpstream_processor_chunks_total", "Chunks consumed from signals.raw", registry=registry
        )
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
        self.devices = Gauge(
            "bpstream_processor_devices", "Devices with state in this worker", registry=registry
        )
        self.process_seconds = Histogram(
            "bpstream_processor_chunk_seconds",
            "Time to process one chunk (stage + preprocessing)",
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
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
    )


async def create_topics(settings: ProcessorSettings) -> None:
    """Create every topic the processor reads, writes or keeps state in (idempotent)."""
    await ensure_topics(
        settings.kafka, [SIGNALS_RAW, SIGNALS_DLQ, WINDOWS, QUALITY, changelog_topic(settings)]
    )


@dataclass(slots=True)
class _CachedState:
    stored: bytes
    state: DeviceState


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
            broker_credentials=None,
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
        self.windows_topic = self.app.topic(
            topic_name(WINDOWS, prefix),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )
        self.quality_topic = self.app.topic(
            topic_name(QUALITY, prefix),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )
        self.dlq_topic = self.app.topic(
            topic_name(SIGNALS_DLQ, prefix),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )
        self.table = self.app.Table(
            STATE_TABLE,
            default=None,
            partitions=SIGNALS_RAW.partitions,
            schema=faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"),
        )
        # Decoded states of the devices this worker has seen, valid while the table still holds the exact
        # bytes they were stored as (after a rebalance or recovery the value differs and is decoded afresh).
        self._cache: dict[bytes, _CachedState] = {}
        self.started = False
        self.app.agent(self.raw_topic, name="reassemble")(self._agent)

    def ready(self) -> bool:
        """Readiness: the worker started and holds (or is recovering) its partitions."""
        return self.started and not self.app.rebalancing

    async def _agent(self, stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for event in stream.events():
            try:
                await self.handle(
                    event.key,
                    event.value,
                    event.message.partition,
                    event.message.offset,
                    event.message.timestamp,
                )
            except (
                BpstreamError
            ) as exc:  # a bug or bad state: dead-letter and move on, never block the partition
                log.exception("processing failed", extra={"reason": exc.reason})
                await self._dead_letter(
                    event.key,
                    event.value,
                    exc.reason,
                    str(exc),
                    event.message.partition,
                    event.message.offset,
                )
            yield None

    async def handle(
        self, key: bytes | None, value: bytes | None, partition: int, offset: int, timestamp_s: float
    ) -> None:
        """Process one ``signals.raw`` record."""
        self.metrics.chunks.inc()
        started = time.perf_counter()
        if value is None or key is None:
            await self._dead_letter(
                key, value or b"", "missing_key_or_value", "record without key or value", partition, offset
            )
            return
        try:
            chunk = decode_chunk(value)
        except DecodeError as exc:
            await self._dead_letter(key, value, exc.reason, str(exc), partition, offset)
            return
        if chunk.device_id.encode() != key:
            await self._dead_letter(
                key,
                value,
                "key_mismatch",
                f"key {key!r} is not device {chunk.device_id!r}",
                partition,
                offset,
            )
            return
        state = self._load(key)
        received_ns = round(timestamp_s * NS)
        state, out = self.reassembler.process(
            state, chunk, value, received_ns=received_ns, now_ns=time.time_ns()
        )
        if out.duplicate:
            self.metrics.dropped.labels(reason="duplicate").inc()
        elif out.late:
            self.metrics.dropped.labels(reason="late").inc()
        for window in out.windows:
            await self.windows_topic.send(key=key, value=encode_window(window))
            self.metrics.windows.labels(quality_ok=str(window.quality_ok).lower()).inc()
        for record in out.quality:
            await self.quality_topic.send(key=key, value=encode_json(record))
            if record.kind != "window":
                self.metrics.events.labels(kind=record.kind).inc()
        if not (out.duplicate or out.late):
            self._store(key, state)
        self.metrics.process_seconds.observe(time.perf_counter() - started)

    def _load(self, key: bytes) -> DeviceState | None:
        stored = self.table.get(key)
        if stored is None:
            return None
        cached = self._cache.get(key)
        if cached is not None and cached.stored is stored:
            return cached.state
        try:
            return decode_state(stored)
        except DecodeError:
            log.warning(
                "unreadable device state; starting afresh", extra={"device": key.decode(errors="replace")}
            )
            return None

    def _store(self, key: bytes, state: DeviceState) -> None:
        encoded = encode_state(state)
        self.table[key] = encoded
        self._cache[key] = _CachedState(encoded, state)
        self.metrics.devices.set(len(self._cache))

    async def _dead_letter(
        self, key: bytes | None, value: bytes, reason: str, detail: str, partition: int, offset: int
    ) -> None:
        self.metrics.dead_letters.labels(reason=reason).inc()
        record = DeadLetter(
            stage=STAGE,
            reason=reason,
            detail=detail[:1000],
            source=topic_name(SIGNALS_RAW, self.settings.kafka.topic_prefix),
            payload=value[:65536],
            key=key.decode(errors="replace") if key is not None else None,
            partition=partition,
            offset=offset,
            received_ns=time.time_ns(),
        )
        await self.dlq_topic.send(key=STAGE.encode(), value=encode_json(record))
