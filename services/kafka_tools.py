"""Kafka helpers the pipeline services share beyond ``bpstream.shared.kafka``: partition discovery, reading a
whole topic (alerting restores its state this way; the demo, the benchmark and the tests read results), and a
producer that survives broker restarts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bpstream.shared.errors import TransientError
from bpstream.shared.kafka import KafkaClientError, KafkaProducer
from bpstream.shared.retry import retry_async
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import KafkaTopic, topic_name

T = TypeVar("T")
log = logging.getLogger(__name__)


async def topic_partitions(admin: AIOKafkaAdminClient, names: Sequence[str]) -> list[TopicPartition]:
    """Every partition of the named topics that exist (unknown topics are left out)."""
    partitions: list[TopicPartition] = []
    for described in await admin.describe_topics(list(names)):
        if described.get("error_code", 0) != 0:
            continue
        for p in sorted(part["partition"] for part in described.get("partitions", [])):
            partitions.append(TopicPartition(described["topic"], p))
    return partitions


async def read_topic(settings: KafkaSettings, topic: KafkaTopic) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of a topic from its beginning to its end at the time of the call (no consumer group)."""
    name = topic_name(topic, settings.topic_prefix)
    admin = AIOKafkaAdminClient(**settings.client_kwargs())
    reader = AIOKafkaConsumer(**settings.client_kwargs(), enable_auto_commit=False)
    try:
        await admin.start()
        partitions = await topic_partitions(admin, [name])
        await reader.start()
        if not partitions:
            return []
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        end = await reader.end_offsets(partitions)
        out: list[ConsumerRecord[bytes, bytes]] = []
        remaining = {tp for tp in partitions if end[tp] > 0}
        while remaining:
            batches = await reader.getmany(*remaining, timeout_ms=1000)
            for records in batches.values():
                out.extend(records)
            for tp in list(remaining):
                if await reader.position(tp) >= end[tp]:
                    remaining.discard(tp)
        return out
    except KafkaError as exc:
        raise TransientError(f"reading {name}: {exc!r}", reason="kafka_retriable") from exc
    finally:
        await reader.stop()
        await admin.close()


async def read_latest_by_key(settings: KafkaSettings, topic: KafkaTopic) -> dict[str, bytes]:
    """Latest value per key of a (compacted) topic; a tombstone (null value) deletes its key."""
    latest: dict[str, bytes] = {}
    for record in await read_topic(settings, topic):
        if record.key is None:
            continue
        key = record.key.decode(errors="replace")
        if record.value is None:
            latest.pop(key, None)
        else:
            latest[key] = record.value
    return latest


class RecoveringProducer:
    """``KafkaProducer`` that survives a broker restart: retriable errors are retried with backoff, and an
    error the idempotent producer cannot recover from by itself (OutOfOrderSequenceNumber, UnknownProducerId
    after the broker lost producer state) replaces the producer with a fresh one and sends again.
    Sending twice is safe: every consumer of these topics treats records as at-least-once and idempotent."""

    def __init__(self, settings: KafkaSettings, *, recreate_attempts: int = 5, **kwargs: Any) -> None:
        self.settings, self.recreate_attempts, self.kwargs = settings, recreate_attempts, kwargs
        self._producer = KafkaProducer(settings, **kwargs)
        self.recreated = 0

    async def start(self) -> None:
        async def start_once() -> None:
            try:
                await self._producer.start()
            except KafkaError as exc:
                raise TransientError(f"kafka producer start: {exc!r}", reason="kafka_retriable") from exc

        await retry_async(start_once, attempts=20, cap_s=5.0, what="start kafka producer")

    async def stop(self) -> None:
        await self._producer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _call(self, operation: Callable[[KafkaProducer], Awaitable[T]], what: str) -> T:
        for attempt in range(self.recreate_attempts + 1):
            try:
                return await retry_async(lambda: operation(self._producer), attempts=10, cap_s=5.0, what=what)
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

    async def send_many(self, records: Sequence[tuple[KafkaTopic, bytes, str | bytes | None]]) -> None:
        """Send records and return once Kafka acknowledged all of them."""
        await self._call(lambda p: p.send_many(records), "send")

    async def dead_letter(self, **fields: Any) -> None:
        """``KafkaProducer.dead_letter`` with the same recovery."""
        await self._call(lambda p: p.dead_letter(**fields), "dead letter")
