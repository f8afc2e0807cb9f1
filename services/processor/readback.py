"""Which ``signals.raw`` records a batch really needs, judged by the offset marks (no Faust).

The processor does not rely on Faust for *which* records it saw: a record below the partition's mark is a
replay (already in the stored states) and is passed over; a record above it means records in between were not
processed into the stored state (a crash after the last checkpoint, or a consumer that skipped records: Faust
drops and acks records it fetched before a rebalance or while flow control was paused), so that range is read
back from Kafka and processed first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bpstream.shared.kafka_tools import read_range
from bpstream.shared.retry import retry_async
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import SIGNALS_RAW


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One ``signals.raw`` record as the processor handles it (timestamp in seconds, as Faust gives it)."""

    key: bytes | None
    value: bytes | None
    partition: int
    offset: int
    timestamp_s: float


#: Reads offsets ``start..end-1`` of one ``signals.raw`` partition.
ReadBack = Callable[[int, int, int], Awaitable[list[RawRecord]]]


def kafka_read_back(settings: KafkaSettings) -> ReadBack:
    """Read a range of a ``signals.raw`` partition directly from Kafka, retrying while it is unavailable."""
    async def read_back(partition: int, start: int, end: int) -> list[RawRecord]:
        async def read() -> list[RawRecord]:
            found = await read_range(settings, SIGNALS_RAW, partition, start, end)
            return [RawRecord(r.key, r.value, r.partition, r.offset, r.timestamp / 1000) for r in found]

        return await retry_async(read, attempts=60, cap_s=5.0, what="read back skipped records")

    return read_back


@dataclass(slots=True)
class Ordered:
    """A batch without replays, with skipped records read back in their place."""

    records: list[RawRecord] = field(default_factory=list)
    #: The new offset mark of every partition the batch advances.
    marks: dict[int, int] = field(default_factory=dict)
    #: Partitions met without a mark (the caller records one at once).
    unmarked: set[int] = field(default_factory=set)
    replayed: int = 0
    #: (partition, from offset, to offset, records read) of every range read back.
    read_back: list[tuple[int, int, int, int]] = field(default_factory=list)


async def in_offset_order(records: list[RawRecord], mark: Callable[[int], int | None],
                          read_back: ReadBack) -> Ordered:
    """Judge a batch against the partitions' marks (``mark(partition)``; None: never recorded, trust the
    consumer) and read back what the consumer skipped."""
    expected: dict[int, int] = {}
    out = Ordered()
    for record in records:
        partition = record.partition
        if partition not in expected:
            stored = mark(partition)
            if stored is None:
                out.unmarked.add(partition)
            expected[partition] = record.offset if stored is None else stored
        if record.offset < expected[partition]:
            out.replayed += 1
            continue
        if record.offset > expected[partition]:
            missing = await read_back(partition, expected[partition], record.offset)
            out.read_back.append((partition, expected[partition], record.offset, len(missing)))
            out.records.extend(missing)
        out.records.append(record)
        expected[partition] = out.marks[partition] = record.offset + 1
    return out
