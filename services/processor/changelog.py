"""The state changelog: its topic, and restoring states and offset marks from it (no Faust).

The processor reads a partition's states from the changelog itself, before it starts and again the first time
it meets a partition after a rebalance: Faust's own recovery was seen to restore an older record of a device,
and a state older than the partition's mark would silently skip records.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

from bpstream.services.processor.settings import ProcessorSettings
from bpstream.shared.kafka_tools import read_topic
from bpstream.shared.retry import retry_async
from bpstream.shared.topics import SIGNALS_RAW, KafkaTopic

#: The Faust table that holds the device states (its changelog topic is named after it).
STATE_TABLE = "device-state"


def changelog_topic(settings: ProcessorSettings) -> KafkaTopic:
    """The state table's changelog (Faust names it ``<app id>-<table>-changelog``; the app id has the prefix)."""
    return KafkaTopic(f"{settings.app_id}-{STATE_TABLE}-changelog", partitions=SIGNALS_RAW.partitions,
                      retention_ms=-1, compacted=True)


class KeyValue(Protocol):
    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...


def latest_values(records: Iterable[KeyValue]) -> dict[bytes, bytes]:
    """The last value of every key in a compacted topic's records, in offset order; a tombstone deletes."""
    latest: dict[bytes, bytes] = {}
    for record in records:
        if record.key is None:
            continue
        if record.value is None:
            latest.pop(record.key, None)
        else:
            latest[record.key] = record.value
    return latest


#: Reads the changelog records of some partitions (in offset order per partition).
ReadChangelog = Callable[[Sequence[int]], Awaitable[Iterable[KeyValue]]]


def kafka_changelog_reader(settings: ProcessorSettings) -> ReadChangelog:
    """Read the changelog's partitions from Kafka, retrying while the broker is unavailable."""
    topic = changelog_topic(settings)

    async def read(partitions: Sequence[int]) -> Iterable[KeyValue]:
        return await retry_async(lambda: read_topic(settings.kafka, topic, only=partitions), attempts=60,
                                 cap_s=5.0, what="read device states")

    return read
