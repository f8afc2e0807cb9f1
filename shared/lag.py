"""Consumer-group lag, measured from outside the groups: end offset minus committed offset, per group.

The writer stores these as ``pipeline`` points; the demo and the pipeline benchmark read them live.
A partition a group has not committed on yet counts from its beginning (the groups start at earliest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Self

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bpstream.shared.errors import TransientError
from bpstream.shared.kafka_tools import topic_partitions
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import PIPELINE_GROUPS, KafkaTopic, group_name, topic_name


def lag_by_partition(end: Mapping[TopicPartition, int], begin: Mapping[TopicPartition, int],
                     committed: Mapping[TopicPartition, int]) -> int:
    """Sum of (end - committed) over partitions; uncommitted partitions count from their beginning."""
    total = 0
    for tp, end_offset in end.items():
        position = committed.get(tp, -1)
        if position < 0:
            position = begin.get(tp, 0)
        total += max(0, end_offset - position)
    return total


class LagProbe:
    """Measures the lag of several consumer groups on their topics (async context manager)."""

    def __init__(self, settings: KafkaSettings,
                 groups: Mapping[str, Sequence[KafkaTopic]] = PIPELINE_GROUPS) -> None:
        self.settings = settings
        self.groups = dict(groups)
        self._admin = AIOKafkaAdminClient(**settings.client_kwargs())
        self._offsets = AIOKafkaConsumer(**settings.client_kwargs(), enable_auto_commit=False)

    async def __aenter__(self) -> Self:
        await self._admin.start()
        await self._offsets.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._offsets.stop()
        await self._admin.close()

    async def _partitions(self, topics: Sequence[KafkaTopic]) -> list[TopicPartition]:
        return await topic_partitions(self._admin, [topic_name(t, self.settings.topic_prefix) for t in topics])

    async def lags(self) -> dict[str, int]:
        """``{group (without prefix): messages behind}`` for every configured group."""
        try:
            result: dict[str, int] = {}
            for group, topics in self.groups.items():
                partitions = await self._partitions(topics)
                if not partitions:
                    result[group] = 0
                    continue
                end = await self._offsets.end_offsets(partitions)
                begin = await self._offsets.beginning_offsets(partitions)
                committed_meta = await self._admin.list_consumer_group_offsets(
                    group_name(group, self.settings), partitions=partitions)
                committed = {tp: meta.offset for tp, meta in committed_meta.items()}
                result[group] = lag_by_partition(end, begin, committed)
            return result
        except KafkaError as exc:
            raise TransientError(f"lag probe: {exc!r}", reason="kafka_retriable") from exc
