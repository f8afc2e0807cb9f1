"""The processor's Faust application; the only module that touches Faust: the app, the state table, the
agent over ``signals.raw`` and the rebalance hook. Everything they call is Faust-free
(:class:`~bpstream.services.processor.service.ProcessorService`).

One agent consumes ``signals.raw`` (raw bytes, keyed by device) in batches and hands each batch to the service.
The device states live in a Faust Table whose compacted changelog is co-partitioned with ``signals.raw``; the
service writes that changelog itself through the idempotent producer (``checkpoint``), so the table is used
as an in-memory store that Faust assigns by partition. Topics are created explicitly (``create_topics``) and
Faust may declare none; its web server is off (the service's own HealthServer serves /metrics and /readyz).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import faust
from prometheus_client import REGISTRY, CollectorRegistry

from bpstream.services.processor.changelog import STATE_TABLE, changelog_topic, kafka_changelog_reader
from bpstream.services.processor.readback import RawRecord, kafka_read_back
from bpstream.services.processor.service import ProcessorService
from bpstream.services.processor.settings import ProcessorSettings
from bpstream.shared import faust_broker
from bpstream.shared.kafka import RecoveringProducer, ensure_topics
from bpstream.shared.topics import QUALITY, SIGNALS_DLQ, SIGNALS_RAW, WINDOWS, topic_name


async def create_topics(settings: ProcessorSettings) -> None:
    """Create every topic the processor reads, writes or keeps state in (idempotent)."""
    await ensure_topics(settings.kafka, [SIGNALS_RAW, SIGNALS_DLQ, WINDOWS, QUALITY, changelog_topic(settings)])


class DeviceStateTable(faust.Table):  # type: ignore[type-arg]
    """The per-device state table: Faust assigns it by partition; the service writes its changelog itself
    (Faust's changelog path sends through a buffer whose ``flush`` returns after a 0.1 s stall with records
    still queued, and its committed offsets say nothing about which records the stored states include)."""


class TableStore:
    """The table as the service's :class:`~bpstream.services.processor.checkpoint.StateStore`."""

    def __init__(self, table: DeviceStateTable) -> None:
        self.table = table

    def get(self, key: bytes) -> bytes | None:
        value = self.table.get(key)
        return value if isinstance(value, bytes) else None

    def put(self, key: bytes, value: bytes) -> None:
        """Update the in-memory store only (the changelog gets it at the next checkpoint)."""
        self.table.data[key] = value

    def stored_keys(self) -> Iterator[bytes]:
        return iter(list(self.table.data.keys()))

    def delete(self, key: bytes) -> None:
        self.table.data.pop(key, None)


class ProcessorApp:
    """The Faust app, table and agent around a :class:`ProcessorService`."""

    def __init__(self, settings: ProcessorSettings, *, registry: CollectorRegistry = REGISTRY) -> None:
        kafka = settings.kafka
        prefix = kafka.topic_prefix
        os.makedirs(settings.data_dir, exist_ok=True)
        self.app = faust.App(
            f"{prefix}{settings.app_id}",
            broker=[f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")],
            broker_credentials=faust_broker.broker_credentials(kafka),  # SASL + TLS context from settings
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
        self.raw_topic = self.app.topic(topic_name(SIGNALS_RAW, prefix), key_type=bytes, value_type=bytes,
                                        key_serializer="raw", value_serializer="raw")
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
        # Outputs go through the shared idempotent producer (acks=all): a batch's send returns only once Kafka
        # has every record, which is what allows the state to be written afterwards.
        self.producer = RecoveringProducer(kafka)
        self.service = ProcessorService(settings, store=TableStore(self.table), changelog=changelog_topic(settings),
                                        producer=self.producer, read_back=kafka_read_back(kafka),
                                        read_changelog=kafka_changelog_reader(settings), registry=registry)
        self.batch_max, self.batch_wait_s = settings.batch_max, settings.batch_wait_s
        self.app.agent(self.raw_topic, name="reassemble")(self._agent)
        self.app.on_partitions_revoked.connect(self._on_partitions_revoked)

    @property
    def group_id(self) -> str:
        return str(self.app.conf.id)

    def ready(self) -> bool:
        """The worker started and holds its partitions (not in the middle of a rebalance)."""
        return self.service.started and not self.app.rebalancing

    async def start(self) -> None:
        # Started as a service inside this loop rather than through faust.Worker, which would take over the
        # process's signal handlers and block until it is stopped.
        await self.app.start()
        self.service.started = True

    async def stop(self) -> None:
        self.service.started = False
        await self.app.stop()

    async def _agent(self, stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        # Batches: one wait for Kafka's acknowledgements per batch instead of one per window.
        take_events = stream.take_events  # type: ignore[attr-defined]
        async for events in take_events(self.batch_max, self.batch_wait_s):
            records = [RawRecord(e.key, e.value, e.message.partition, e.message.offset, e.message.timestamp)
                       for e in events]
            # Faust acks a taken batch when the stream closes, processed or not, and then commits its offsets.
            # So a stop in the middle of a batch first finishes the batch: no offset is ever committed for a
            # record whose windows and state were not written (that would be a silent gap after restart).
            batch = asyncio.ensure_future(self.service.handle_locked(records))
            try:
                await asyncio.shield(batch)
            except asyncio.CancelledError:
                await batch
                raise
            yield None

    async def _on_partitions_revoked(self, sender: Any, /, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        await self.service.on_partitions_revoked()
