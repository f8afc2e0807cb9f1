"""Kafka building blocks every service uses: topic creation, an idempotent producer, a manual-commit consumer,
and dead-lettering.

Both clients are async context managers around aiokafka. Kafka errors that aiokafka marks retriable become
``TransientError`` so ``retry_async`` can retry them; everything else propagates as ``KafkaClientError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2
from aiokafka.structs import RecordMetadata

from bpstream.shared.errors import BpstreamError, TransientError
from bpstream.shared.messages import DeadLetter, encode_json
from bpstream.shared.retry import retry_async
from bpstream.shared.service import Component
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import SIGNALS_DLQ, KafkaTopic, topic_name

T = TypeVar("T")
log = logging.getLogger(__name__)

#: A record to send: topic, value (None: a tombstone for a compacted topic), key (the partition follows from
#: the key), or the same with an explicit partition for records whose place is not their key's (the
#: processor's per-partition offset marks).
OutgoingRecord = (tuple[KafkaTopic, bytes | None, str | bytes | None]
                  | tuple[KafkaTopic, bytes | None, str | bytes | None, int])



@lru_cache(maxsize=65536)
def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as aiokafka and the Java client) gives ``key`` in a
    topic of ``partitions`` partitions (cached: device keys are few and hashing one in Python costs ~10 us)."""
    return (int(murmur2(key)) & 0x7FFFFFFF) % partitions

class KafkaClientError(BpstreamError):
    """A Kafka error that retrying will not fix."""

    reason = "kafka"


def translate_kafka_error(exc: KafkaError) -> BpstreamError:
    """Map an aiokafka error to the project's errors, keeping aiokafka's retriable flag."""
    if getattr(exc, "retriable", False):
        return TransientError(f"kafka: {exc!r}", reason="kafka_retriable")
    return KafkaClientError(f"kafka: {exc!r}")


async def ensure_topics(settings: KafkaSettings, topics: Iterable[KafkaTopic]) -> list[str]:
    """Create the topics that do not exist yet (with the prefix from settings); return the names created."""
    admin = AIOKafkaAdminClient(**settings.client_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [t for t in topics if topic_name(t, settings.topic_prefix) not in existing]
        if not wanted:
            return []
        new = []
        for t in wanted:
            retention_ms = settings.dlq_retention_s * 1000 if t.name == "signals.dlq" else t.retention_ms
            configs = {"retention.ms": str(retention_ms)}
            if t.compacted:
                configs["cleanup.policy"] = "compact"
            new.append(NewTopic(topic_name(t, settings.topic_prefix), t.partitions, settings.replication_factor,
                                topic_configs=configs))
        # Another process may create them between list and create.
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(new)
        created = [n.name for n in new]
        await _wait_for_leaders(admin, created)
        log.info("created topics", extra={"topics": created})
        return created
    finally:
        await admin.close()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float = 30.0) -> None:
    """Wait until every partition of freshly created topics has a leader: reading offsets of a partition
    without one stalls a client for its whole request timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        described = await admin.describe_topics(names)
        if all(t.get("error_code", 0) == 0 and t.get("partitions")
               and all(p.get("leader", -1) >= 0 for p in t["partitions"]) for t in described):
            return
        await asyncio.sleep(0.1)
    log.warning("created topics have no leader yet", extra={"topics": names})


class KafkaProducer(Component):
    """Idempotent producer (acks=all): a send returns only once Kafka has the record."""

    def __init__(self, settings: KafkaSettings, *, linger_ms: int = 5, max_request_size: int = 4 * 1024 * 1024,
                 max_batch_size: int = 1024 * 1024, **extra: Any) -> None:
        self.settings = settings
        # aiokafka's default batch (16 KB) holds two windows (~8 KB each), so a batch of windows went out as many
        # small requests, each waiting for acks=all; 1 MB lets one request carry a whole batch.
        self._producer = AIOKafkaProducer(
            **settings.client_kwargs(),
            enable_idempotence=True,
            acks="all",
            linger_ms=linger_ms,
            max_request_size=max_request_size,
            max_batch_size=max_batch_size,
            **extra,
        )

    def topic(self, topic: KafkaTopic) -> str:
        return topic_name(topic, self.settings.topic_prefix)

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()


    async def send(self, topic: KafkaTopic, value: bytes, key: str | bytes | None = None,
                   timestamp_ms: int | None = None) -> RecordMetadata:
        """Send one record and wait until Kafka acknowledged it."""
        key_bytes = key.encode() if isinstance(key, str) else key
        try:
            fut = await self._producer.send(self.topic(topic), value, key=key_bytes, timestamp_ms=timestamp_ms)
            return await fut
        except KafkaError as exc:
            raise translate_kafka_error(exc) from exc

    async def send_many(self, records: Sequence[OutgoingRecord]) -> list[RecordMetadata]:
        """Send records without waiting on each; return once all of them are acknowledged.

        Order is kept per partition (the producer is idempotent), so a record sent after others to the same
        partition is never stored before them.
        """
        futures = []
        try:
            for record in records:
                topic, value, key = record[0], record[1], record[2]
                partition = record[3] if len(record) == 4 else None
                key_bytes = key.encode() if isinstance(key, str) else key
                futures.append(await self._producer.send(self.topic(topic), value, key=key_bytes,
                                                         partition=partition))
            return [await f for f in futures]
        except KafkaError as exc:
            raise translate_kafka_error(exc) from exc

    async def dead_letter(self, *, stage: str, reason: str, detail: str, source: str, payload: bytes,
                          key: str | None = None, partition: int | None = None, offset: int | None = None) -> None:
        """Send a dead-letter record (reason and original bytes) to ``signals.dlq``, keyed by ``stage``."""
        record = DeadLetter(stage=stage, reason=reason, detail=detail[:1000], source=source, payload=payload,
                            key=key, partition=partition, offset=offset, received_ns=time.time_ns())
        await self.send(SIGNALS_DLQ, encode_json(record), key=stage)


class KafkaConsumer(Component):
    """Consumer-group member with manual commits: commit only after the outputs were accepted downstream."""

    def __init__(self, settings: KafkaSettings, topics: Sequence[KafkaTopic], group_id: str, *,
                 max_poll_records: int = 500, auto_offset_reset: str = "earliest", **extra: Any) -> None:
        self.settings = settings
        self.topic_names = [topic_name(t, settings.topic_prefix) for t in topics]
        self._consumer = AIOKafkaConsumer(
            *self.topic_names,
            **settings.client_kwargs(),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            max_poll_records=max_poll_records,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            **extra,
        )

    @property
    def client(self) -> AIOKafkaConsumer:
        return self._consumer

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()


    async def getmany(self, timeout_ms: int, max_records: int | None = None) -> list[ConsumerRecord[bytes, bytes]]:
        """Fetch up to ``max_records`` records across partitions, waiting at most ``timeout_ms``."""
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        return [record for records in batches.values() for record in records]

    async def commit_records(self, records: Iterable[ConsumerRecord[bytes, bytes]]) -> None:
        """Commit, per partition, the offset after the highest record given."""
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        if offsets:
            try:
                await self._consumer.commit(offsets)
            except KafkaError as exc:
                raise translate_kafka_error(exc) from exc

    async def lag(self) -> int:
        """Total messages between the committed/consumed position and the end of the assigned partitions."""
        assigned = list(self._consumer.assignment())
        if not assigned:
            return 0
        ends = await self._consumer.end_offsets(assigned)
        total = 0
        for tp in assigned:
            try:
                position = await self._consumer.position(tp)
            except KafkaError:
                continue
            total += max(0, ends[tp] - position)
        return total


class RecoveringProducer(Component):
    """``KafkaProducer`` that survives a broker restart: retriable errors are retried with backoff, and an
    error the idempotent producer cannot recover from by itself (OutOfOrderSequenceNumber, UnknownProducerId
    after the broker lost producer state) replaces the producer with a fresh one and sends again.
    Sending twice is safe: every consumer of these topics treats records as at-least-once and idempotent.

    Retries are capped and fully jittered (``retry_async``); once they are spent the error propagates and the
    caller decides (the bridge keeps its batch unacknowledged and tries again). ``available`` is false from
    the first failed attempt until a send succeeds again: services fold it into ``/readyz``."""

    def __init__(self, settings: KafkaSettings, *, recreate_attempts: int = 5, retry_attempts: int = 10,
                 retry_cap_s: float = 5.0, **kwargs: Any) -> None:
        self.settings, self.recreate_attempts, self.kwargs = settings, recreate_attempts, kwargs
        self.retry_attempts, self.retry_cap_s = retry_attempts, retry_cap_s
        self._producer = KafkaProducer(settings, **kwargs)
        self.recreated = 0
        self._failing = False
        #: Monotonic start of the send in progress: aiokafka waits for a lost broker without failing the send.
        self._sending_since: float | None = None
        self.stall_s = settings.request_timeout_ms / 1000

    @property
    def available(self) -> bool:
        """False while Kafka refuses sends (from the first failed attempt until one succeeds) or a send has
        waited longer than the request timeout (the broker is gone: aiokafka retries it without failing)."""
        since = self._sending_since
        stalled = since is not None and time.monotonic() - since > self.stall_s
        return not self._failing and not stalled

    async def start(self) -> None:
        async def start_once() -> None:
            try:
                await self._producer.start()
            except KafkaError as exc:
                raise TransientError(f"kafka producer start: {exc!r}", reason="kafka_retriable") from exc

        await retry_async(start_once, attempts=20, cap_s=5.0, what="start kafka producer")

    async def stop(self) -> None:
        await self._producer.stop()


    async def _call(self, operation: Callable[[KafkaProducer], Awaitable[T]], what: str) -> T:
        async def once() -> T:
            self._sending_since = time.monotonic()
            try:
                result = await operation(self._producer)
            except BpstreamError:
                self._failing = True
                raise
            finally:
                self._sending_since = None
            self._failing = False
            return result

        for attempt in range(self.recreate_attempts + 1):
            try:
                return await retry_async(once, attempts=self.retry_attempts, cap_s=self.retry_cap_s, what=what)
            except KafkaClientError as exc:
                if attempt == self.recreate_attempts:
                    raise
                log.warning("kafka producer failed; replacing it", extra={"what": what, "error": repr(exc)[:200]})
                with contextlib.suppress(Exception):
                    await self._producer.stop()
                self._producer = KafkaProducer(self.settings, **self.kwargs)
                self.recreated += 1
                await self.start()
        raise AssertionError("unreachable")

    async def send_many(self, records: Sequence[OutgoingRecord]) -> None:
        """Send records and return once Kafka acknowledged all of them."""
        await self._call(lambda p: p.send_many(records), "send")

    async def dead_letter(self, **fields: Any) -> None:
        """``KafkaProducer.dead_letter`` with the same recovery."""
        await self._call(lambda p: p.dead_letter(**fields), "dead letter")
