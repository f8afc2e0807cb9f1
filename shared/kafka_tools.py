"""Kafka helpers the pipeline services share beyond ``bpstream.shared.kafka``: partition discovery, reading a
whole topic (alerting restores its state this way; the demo, the benchmark and the tests read results) and
reading a range of offsets of one partition (the processor reads back records its consumer skipped), and
following the compacted ``cuff`` topic (inference and alerting).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bpstream.shared.errors import DecodeError, TransientError
from bpstream.shared.messages import CuffReading, decode_cuff
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import CUFF, KafkaTopic, topic_name

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


async def read_topic(settings: KafkaSettings, topic: KafkaTopic,
                     only: Sequence[int] | None = None) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of a topic (or of its partitions ``only``) from its beginning to its end at the time of the
    call (no consumer group)."""
    name = topic_name(topic, settings.topic_prefix)
    admin = AIOKafkaAdminClient(**settings.client_kwargs())
    reader = AIOKafkaConsumer(**settings.client_kwargs(), enable_auto_commit=False)
    try:
        await admin.start()
        partitions = await topic_partitions(admin, [name])
        if only is not None:
            partitions = [tp for tp in partitions if tp.partition in only]
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


async def read_range(settings: KafkaSettings, topic: KafkaTopic, partition: int, start: int | None = None,
                     end: int | None = None) -> list[ConsumerRecord[bytes, bytes]]:
    """The records of one partition with ``start <= offset < end`` (no consumer group, nothing committed).

    ``start=None`` reads from the partition's first record, ``end=None`` to its end at the time of the call.
    Offsets that hold no record (compacted away, transaction markers) are simply absent from the result.
    """
    name = topic_name(topic, settings.topic_prefix)
    tp = TopicPartition(name, partition)
    reader = AIOKafkaConsumer(**settings.client_kwargs(), enable_auto_commit=False)
    try:
        await reader.start()
        reader.assign([tp])
        last = (await reader.end_offsets([tp]))[tp]
        stop = last if end is None else min(end, last)
        first = (await reader.beginning_offsets([tp]))[tp]
        low = first if start is None else max(start, first)
        out: list[ConsumerRecord[bytes, bytes]] = []
        if low >= stop:
            return out
        reader.seek(tp, low)
        while await reader.position(tp) < stop:
            batches = await reader.getmany(tp, timeout_ms=1000)
            out.extend(r for r in batches.get(tp, []) if low <= r.offset < stop)
        return out
    except KafkaError as exc:
        raise TransientError(f"reading {name}[{partition}] {start}..{end}: {exc!r}",
                             reason="kafka_retriable") from exc
    finally:
        await reader.stop()


class CuffFollower:
    """Reads the compacted ``cuff`` topic from its beginning, then follows it (no consumer group)."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []

    async def start(self) -> list[CuffReading]:
        """Assign every partition and read everything up to the current end."""
        admin = AIOKafkaAdminClient(**self.settings.client_kwargs())
        await admin.start()
        try:
            self._partitions = await topic_partitions(admin, [topic_name(CUFF, self.settings.topic_prefix)])
        finally:
            await admin.close()
        await self.stop()  # a retried start begins afresh
        consumer = self._consumer = AIOKafkaConsumer(**self.settings.client_kwargs(), enable_auto_commit=False)
        await consumer.start()
        if not self._partitions:
            return []
        consumer.assign(self._partitions)
        await consumer.seek_to_beginning(*self._partitions)
        end = await consumer.end_offsets(self._partitions)
        readings: list[CuffReading] = []
        remaining = {tp for tp in self._partitions if end[tp] > 0}
        while remaining:
            readings.extend(await self.poll(1000))
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
        return readings

    async def poll(self, timeout_ms: int = 0) -> list[CuffReading]:
        if not self._partitions or self._consumer is None:
            return []
        batches = await self._consumer.getmany(*self._partitions, timeout_ms=timeout_ms)
        readings: list[CuffReading] = []
        for records in batches.values():
            for record in records:
                try:
                    readings.append(decode_cuff(record.value or b""))
                except DecodeError as exc:  # the bridge wrote it, so this is a bug: log and go on
                    log.warning("undecodable cuff record", extra={"reason": exc.reason, "offset": record.offset})
        return readings

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()
