"""Checkpoints: device states and per-partition offset marks, and what reaches the changelog when (no Faust).

The live device states are kept in a :class:`StateStore` (the Faust table in production, a dict in unit
tests) keyed by device; next to them, one *offset mark* per ``signals.raw`` partition records the offset
after the last record the stored states include. :class:`Checkpointer` remembers which keys changed since the
last checkpoint and turns them into changelog records: states keyed by device (the default partitioner puts a
state in the partition number of the device's ``signals.raw`` records, equal partition counts), marks sent
to their partition explicitly and *after* the states, so a stored mark implies the states it covers are
stored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Protocol

from bpstream.shared.kafka import OutgoingRecord
from bpstream.shared.topics import KafkaTopic

log = logging.getLogger(__name__)

#: Key prefix of the per-partition offset marks in the state table ('#' is not allowed in a device id, so a
#: mark never collides with a device's state).
OFFSET_MARK_PREFIX = b"#next-offset/"


def offset_mark_key(partition: int) -> bytes:
    """Table key of the offset mark of one ``signals.raw`` partition."""
    return OFFSET_MARK_PREFIX + str(partition).encode()


def is_offset_mark(key: bytes) -> bool:
    return key.startswith(OFFSET_MARK_PREFIX)


class StateStore(Protocol):
    """Where the live states and marks are held (the Faust table, or a dict)."""

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes) -> None:
        """Update the in-memory store only (the changelog gets it at the next checkpoint)."""

    def stored_keys(self) -> Iterable[bytes]: ...

    def delete(self, key: bytes) -> None:
        """Drop a state from the in-memory store only (its tombstone reaches the changelog at the checkpoint)."""


class DictStore:
    """A :class:`StateStore` over a plain mapping."""

    def __init__(self, data: MutableMapping[bytes, bytes] | None = None) -> None:
        self.data: MutableMapping[bytes, bytes] = {} if data is None else data

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self.data[key] = value

    def stored_keys(self) -> Iterator[bytes]:
        return iter(list(self.data))

    def delete(self, key: bytes) -> None:
        self.data.pop(key, None)


class Checkpointer:
    """Tracks the keys changed since the last checkpoint and builds the checkpoint's changelog records."""

    def __init__(self, store: StateStore, changelog: KafkaTopic) -> None:
        self.store, self.changelog = store, changelog
        #: Keys (device states, offset marks) changed since the last checkpoint, with their partition.
        self._unsaved: dict[bytes, int] = {}

    def put(self, key: bytes, value: bytes, partition: int) -> None:
        """Update a state or mark in the store; it reaches the changelog at the next checkpoint."""
        self.store.put(key, value)
        self._unsaved[key] = partition

    def delete(self, key: bytes) -> None:
        """Drop a device's state; the checkpoint writes its tombstone (before the marks)."""
        self.store.delete(key)
        self._unsaved[key] = -1

    def put_mark(self, partition: int, offset: int) -> None:
        self.put(offset_mark_key(partition), str(offset).encode(), partition)

    def load(self, latest: dict[bytes, bytes]) -> None:
        """Take states and marks read from the changelog (already stored there: not unsaved)."""
        for key, value in latest.items():
            self.store.put(key, value)
            self._unsaved.pop(key, None)

    def discard_unsaved(self) -> None:
        """Forget the changes since the last checkpoint; the marks among them leave the store too (they may be
        ahead of the states: the changelog's marks are read again)."""
        unsaved, self._unsaved = self._unsaved, {}
        for key in unsaved:
            if is_offset_mark(key):
                self.store.delete(key)

    @property
    def pending(self) -> int:
        return len(self._unsaved)

    def take(self) -> list[OutgoingRecord]:
        """The records of a checkpoint (states first, then marks); forgets them as unsaved.

        If sending them fails the caller retries the same list until Kafka accepts it (the processor never
        gives up a checkpoint), so nothing is lost by forgetting them here.
        """
        unsaved, self._unsaved = self._unsaved, {}
        states: list[OutgoingRecord] = []
        marks: list[OutgoingRecord] = []
        for key, partition in unsaved.items():
            value = self.store.get(key)
            if value is None:
                if partition == -1:  # deleted: a tombstone, partitioned by its key like the state was
                    states.append((self.changelog, None, key))
                continue
            if is_offset_mark(key):
                marks.append((self.changelog, value, key, partition))
            else:
                states.append((self.changelog, value, key))
        return states + marks

    def mark(self, partition: int) -> int | None:
        """The next ``signals.raw`` offset to process in a partition (None: never recorded, or unreadable)."""
        stored = self.store.get(offset_mark_key(partition))
        try:
            return int(stored) if stored is not None else None
        except ValueError:
            log.warning("unreadable offset mark; trusting the consumer", extra={"partition": partition})
            return None

    def devices(self) -> int:
        """Devices with a state in the store (O(devices): counted at checkpoints only)."""
        return sum(1 for key in self.store.stored_keys() if not is_offset_mark(key))
