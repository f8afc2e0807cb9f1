"""The processor's batch handling around the pure stage, without Faust: ``signals.raw`` records in, windows,
quality records and dead letters out, device states and offset marks checkpointed to the changelog.

:class:`ProcessorService` is driven by the Faust agent (``faust_app``) but knows nothing of Faust: it gets a
:class:`~bpstream.services.processor.checkpoint.StateStore` (the table), a producer with ``send_many``, and
readers for ``signals.raw`` ranges and the changelog, so unit tests can run it on a dict and fakes.

Delivery: a batch's windows and quality records are sent and acknowledged before the batch's device states
and offset marks count as processed; they reach the store and the changelog at checkpoints (every
``checkpoint_interval_s``, on SIGTERM, and when a rebalance revokes partitions). After a crash the stored
state is never ahead of what was published and the records after its marks are read back
(:mod:`~bpstream.services.processor.readback`), so a replay can re-emit an identical window, never lose one;
sinks treat ``(device, end_ns)`` as identity.

Between checkpoints the device states stay live objects (decoded from the store once, encoded once per
checkpoint instead of once per batch); the store holds what the changelog holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry

from bpstream.services.processor.changelog import ReadChangelog, latest_values
from bpstream.services.processor.checkpoint import Checkpointer, StateStore, is_offset_mark
from bpstream.services.processor.metrics import ProcessorMetrics
from bpstream.services.processor.readback import RawRecord, ReadBack, in_offset_order
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
from bpstream.shared.errors import BpstreamError, DecodeError, TransientError
from bpstream.shared.gateway import decode_batch, is_batch
from bpstream.shared.kafka import OutgoingRecord, key_partition
from bpstream.shared.logging import pseudonym
from bpstream.shared.messages import DeadLetter, QualityRecord, Window, decode_chunk, encode_json, encode_window
from bpstream.shared.retry import retry_async
from bpstream.shared.topics import QUALITY, SIGNALS_DLQ, SIGNALS_RAW, WINDOWS, KafkaTopic, device_key, topic_name

log = logging.getLogger(__name__)

STAGE = "processor"
#: Attempts of one round of sending a batch's outputs (full-jitter backoff capped at 5 s); rounds repeat
#: until Kafka accepts: giving up would ack the batch's offsets and lose its windows.
SEND_ATTEMPTS = 20


class Sender(Protocol):
    async def send_many(self, records: Sequence[OutgoingRecord]) -> None: ...


def stage_config(settings: ProcessorSettings) -> StageConfig:
    def ns(seconds: float | None) -> int | None:
        return None if seconds is None else round(seconds * NS)

    return StageConfig(
        window_ns=round(settings.window_s * NS), hop_ns=round(settings.hop_s * NS),
        max_reorder_chunks=settings.max_reorder_chunks, max_lateness_ns=round(settings.max_lateness_s * NS),
        clock_tolerance_ns=round(settings.clock_tolerance_s * NS), max_buffer_chunks=settings.max_buffer_chunks,
        max_ahead_ns=ns(settings.max_device_ahead_s), max_behind_ns=ns(settings.max_device_behind_s),
        max_seq_jump=settings.max_seq_jump, late_horizon_ns=round(settings.late_horizon_s * NS),
        max_repair_chunks=settings.max_repair_chunks,
        defer_preparation=True,  # a batch's windows are prepared together (handle_batch)
    )


class ProcessorService:
    """Processes batches of ``signals.raw`` records and checkpoints device states (Faust-free)."""

    def __init__(self, settings: ProcessorSettings, *, store: StateStore, changelog: KafkaTopic, producer: Sender,
                 read_back: ReadBack, read_changelog: ReadChangelog,
                 registry: CollectorRegistry = REGISTRY) -> None:
        self.settings = settings
        self.metrics = ProcessorMetrics(registry)
        self.reassembler = Reassembler(stage_config(settings))
        self.store, self.producer = store, producer
        self.read_back, self.read_changelog = read_back, read_changelog
        self.checkpoints = Checkpointer(store, changelog)
        #: Device states as objects (read from the store once); ``_changed``: keys whose live state is newer
        #: than the stored one (encoded into the store at the next checkpoint).
        self._live: dict[bytes, DeviceState] = {}
        self._changed: set[bytes] = set()
        self.started = False
        #: Incremented when partitions are revoked (a rebalance starts); a partition whose state was read from the
        #: changelog in an older generation is read again before its next record is processed.
        self._generation = 0
        self._partition_generation: dict[int, int] = {}
        #: Serialises batches and checkpoints (a rebalance checkpoints while a batch may still be finishing).
        self.lock = asyncio.Lock()
        #: Monotonic time of the last processed batch (or of the last moment the worker was not ready).
        self.last_progress = time.monotonic()
        self._last_checkpoint = time.monotonic()
        self._checkpoint_now = False
        #: Newest receipt time of any chunk this worker handled (the clock of silent-device eviction).
        self._newest_received_ns = 0
        self._last_eviction = time.monotonic()

    async def handle_locked(self, records: list[RawRecord]) -> None:
        async with self.lock:
            await self.handle_batch(records)

    async def handle_batch(self, records: list[RawRecord]) -> None:
        """Process a batch of ``signals.raw`` records; return once everything they produced is in Kafka."""
        started = time.perf_counter()
        states: dict[bytes, tuple[DeviceState, int]] = {}
        sends: list[OutgoingRecord] = []
        cuts: list[WindowCut] = []
        stale = sorted({r.partition for r in records} - {p for p, g in self._partition_generation.items()
                                                          if g == self._generation})
        if stale:
            await self.restore_partitions(stale)
        ordered = await in_offset_order(records, self.checkpoints.mark, self.read_back)
        if ordered.unmarked:
            # A partition without a mark: record one at once, so a crash before the next regular checkpoint
            # cannot leave the committed offsets ahead of any stored state.
            self._checkpoint_now = True
        self.metrics.replayed.inc(ordered.replayed)
        for partition, start, end, count in ordered.read_back:
            log.warning("records after the stored state were not delivered; read them back from Kafka",
                        extra={"partition": partition, "from_offset": start, "to_offset": end, "records": count})
            self.metrics.read_back.inc(count)
        chunks = 0
        try:
            for record in ordered.records:
                chunks += self._handle(record, states, cuts, sends)
            if cuts:
                sends.extend(self._finish(cuts))
            if sends:
                await self.send_until_accepted(sends)
        except BaseException:
            if states:
                self._forget_unsaved()
            raise
        # The states are live objects; the store and the changelog get them at checkpoints (marks after states).
        for key, (state, _) in states.items():
            self._live[key] = state
            self._changed.add(key)
        for partition, offset in ordered.marks.items():
            self.checkpoints.put_mark(partition, offset)
        if (self.settings.evict_after_s > 0
                and time.monotonic() - self._last_eviction >= self.settings.evict_check_interval_s):
            self.evict_silent()
        if self._checkpoint_now or time.monotonic() - self._last_checkpoint >= self.settings.checkpoint_interval_s:
            await self.checkpoint()
        self.last_progress = time.monotonic()
        self.metrics.chunks.inc(chunks)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    def evict_silent(self) -> int:
        """Drop the states of devices silent for ``evict_after_s`` of record time, in partitions this worker
        owns now (another worker's partitions are its to evict); their tombstones go out at the checkpoint."""
        self._last_eviction = time.monotonic()
        horizon = self._newest_received_ns - round(self.settings.evict_after_s * NS)
        owned = {p for p, g in self._partition_generation.items() if g == self._generation}
        evicted = 0
        for key in self.store.stored_keys():
            if is_offset_mark(key):
                continue
            state = self._load(key)
            if state is None or state.partition not in owned or not 0 < state.last_received_ns < horizon:
                continue
            self.checkpoints.delete(key)
            self._live.pop(key, None)
            self._changed.discard(key)
            evicted += 1
        if evicted:
            self.metrics.evicted.inc(evicted)
            log.info("silent devices' states evicted", extra={"devices": evicted})
        return evicted

    async def checkpoint(self) -> None:
        """Write every device state and offset mark changed since the last checkpoint to the changelog."""
        self._checkpoint_now = False
        self._last_checkpoint = time.monotonic()
        for key in self._changed:
            state = self._live[key]
            self.checkpoints.put(key, encode_state(state), state.partition)
        self._changed.clear()
        records = self.checkpoints.take()
        if not records:
            return
        await self.send_until_accepted(records)
        self.metrics.checkpoints.inc()
        self.metrics.devices.set(self.checkpoints.devices())

    async def on_partitions_revoked(self) -> None:
        """A rebalance starts: store everything held in memory, so whichever worker gets a partition next
        (this one included) resumes from the changelog exactly where this one stopped."""
        async with self.lock:
            await self.checkpoint()
            self._generation += 1
            self._live.clear()  # every partition is read from the changelog again before its next record

    def _forget_unsaved(self) -> None:
        """A batch failed after changing live states (its outputs may not all be in Kafka): forget everything
        not checkpointed and read every partition from the changelog again before its next record, so no
        state runs ahead of what was published; the records after the stored marks are read back."""
        log.warning("a batch failed half-way; device states are read from the changelog again")
        self._live.clear()
        self._changed.clear()
        self.checkpoints.discard_unsaved()
        self._generation += 1

    async def restore_partitions(self, partitions: Sequence[int]) -> None:
        """Load partitions' device states and offset marks from the changelog into the store (one read)."""
        latest = latest_values(await self.read_changelog(list(partitions)))
        self.checkpoints.load(latest)
        for key in latest:
            self._live.pop(key, None)
        for partition in partitions:
            self._partition_generation[partition] = self._generation
        log.info("device states read from the changelog",
                 extra={"partitions": list(partitions), "devices": sum(1 for k in latest if not is_offset_mark(k))})

    async def send_until_accepted(self, sends: list[OutgoingRecord]) -> None:
        """Send records, retrying (shared full-jitter backoff, capped) for as long as Kafka refuses them.

        Giving up is not an option: the batch's offsets would be acked and its windows lost. If Kafka never
        comes back, the process is eventually killed without committing, and the batch is replayed.
        """
        async def once() -> None:
            try:
                await self.producer.send_many(sends)
            except BpstreamError as exc:
                self.metrics.send_retries.inc()
                # Every refusal is worth another try here, whatever the producer called it.
                raise TransientError(f"outputs not accepted by Kafka: {exc}", reason=exc.reason) from exc

        while True:
            try:
                await retry_async(once, attempts=SEND_ATTEMPTS, base_s=0.2, cap_s=5.0, what="send outputs")
                return
            except TransientError as exc:
                log.warning("outputs still not accepted by Kafka; retrying", extra={"reason": exc.reason})

    def _handle(self, record: RawRecord, states: dict[bytes, tuple[DeviceState, int]], cuts: list[WindowCut],
                sends: list[OutgoingRecord]) -> int:
        """Apply one ``signals.raw`` record (a chunk, or the bridge's ``ChunkBatch`` of one partition's chunks);
        append its outputs to ``sends``; return how many chunks it carried."""
        key, value = record.key, record.value
        if value is None or key is None:
            sends.append(self._dead_letter(record, "missing_key_or_value", "record without key or value"))
            return 0
        if not is_batch(value):
            self._handle_chunk(record, value, key, None, states, cuts, sends)
            return 1
        try:
            batch = decode_batch(value)
        except DecodeError as exc:
            sends.append(self._dead_letter(record, exc.reason, str(exc)))
            return 0
        for payload in batch.chunks:  # one chunk's failure costs only that chunk
            self._handle_chunk(record, payload, None, batch.clinic_id, states, cuts, sends)
        return len(batch.chunks)

    def _handle_chunk(self, record: RawRecord, payload: bytes, key: bytes | None, batch_clinic: str | None,
                      states: dict[bytes, tuple[DeviceState, int]], cuts: list[WindowCut],
                      sends: list[OutgoingRecord]) -> None:
        """Apply one chunk: ``key`` is the record's key (a chunk record), or None for a chunk of a batch of
        ``batch_clinic`` (its device key must hash to the record's partition, or another worker owns it)."""
        try:
            sends.extend(self._apply(record, payload, key, batch_clinic, states, cuts))
        except Exception as exc:  # a bug or bad state: dead-letter and move on, never block the partition
            reason = exc.reason if isinstance(exc, BpstreamError) else "internal_error"
            log.exception("processing failed", extra={"reason": reason})
            sends.append(self._dead_letter(record, reason, f"{type(exc).__name__}: {exc}", payload))

    def _apply(self, record: RawRecord, payload: bytes, key: bytes | None, batch_clinic: str | None,
               states: dict[bytes, tuple[DeviceState, int]], cuts: list[WindowCut]) -> list[OutgoingRecord]:
        try:
            chunk = decode_chunk(payload)
        except DecodeError as exc:
            return [self._dead_letter(record, exc.reason, str(exc), payload)]
        own_key = device_key(chunk.clinic_id, chunk.device_id).encode()
        if key is None:
            if chunk.clinic_id != batch_clinic:
                return [self._dead_letter(record, "key_mismatch", "chunk of another clinic than its batch", payload)]
            if key_partition(own_key, SIGNALS_RAW.partitions) != record.partition:
                return [self._dead_letter(record, "wrong_partition",
                                          "the chunk's device belongs to another partition", payload)]
            key = own_key
        elif own_key != key:
            return [self._dead_letter(record, "key_mismatch", "key is not the chunk's clinic/device", payload)]
        state = states[key][0] if key in states else self._load(key)
        state, out = self.reassembler.process(
            state, chunk, payload, received_ns=round(record.timestamp_s * NS), now_ns=time.time_ns()
        )
        if out.rejected is not None:  # out of bounds: dead-lettered, the device's state untouched
            return [self._dead_letter(record, out.rejected.reason, out.rejected.detail, payload)]
        if out.repaired:
            self.metrics.repaired.inc()
        if out.duplicate or out.late:
            self.metrics.dropped.labels(reason="duplicate" if out.duplicate else "late").inc()
            return []
        state.last_received_ns, state.partition = round(record.timestamp_s * NS), record.partition
        self._newest_received_ns = max(self._newest_received_ns, state.last_received_ns)
        states[key] = (state, record.partition)
        cuts.extend(out.cuts)
        return self._outputs(out.windows, out.quality)

    def _outputs(self, windows: list[Window], quality: list[QualityRecord]) -> list[OutgoingRecord]:
        sends: list[OutgoingRecord] = []
        for window in windows:
            sends.append((WINDOWS, encode_window(window), device_key(window.clinic_id, window.device_id)))
            self.metrics.windows.labels(quality_ok=str(window.quality_ok).lower()).inc()
        for record in quality:
            sends.append((QUALITY, encode_json(record), device_key(record.clinic_id, record.device_id)))
            if record.kind != WINDOW:
                self.metrics.events.labels(kind=record.kind).inc()
        return sends

    def _finish(self, cuts: list[WindowCut]) -> list[OutgoingRecord]:
        """Prepare the batch's cut windows together; a failure (a bug, never bad data) costs only its window."""
        now = time.time_ns()
        try:
            return self._outputs(*self.reassembler.finish(cuts, now))
        except Exception:
            log.exception("preparing a batch of windows failed; preparing them one by one")
        sends: list[OutgoingRecord] = []
        for cut in cuts:
            try:
                sends.extend(self._outputs(*self.reassembler.finish([cut], now)))
            except Exception as exc:
                sends.extend(self._outputs([], [cut.error(f"internal_error: {type(exc).__name__}: {exc}", now)]))
        return sends

    def _load(self, key: bytes) -> DeviceState | None:
        live = self._live.get(key)
        if live is not None:
            return live
        stored = self.store.get(key)
        if stored is None:
            return None
        try:
            state = self._live[key] = decode_state(stored)
            return state
        except DecodeError:
            log.warning("unreadable device state; starting afresh",
                        extra={"device_ref": pseudonym(key.decode(errors="replace"))})
            return None

    def _dead_letter(self, record: RawRecord, reason: str, detail: str, payload: bytes | None = None) -> OutgoingRecord:
        self.metrics.dead_letters.labels(reason=reason).inc()
        letter = DeadLetter(
            stage=STAGE, reason=reason, detail=detail[:1000],
            source=topic_name(SIGNALS_RAW, self.settings.kafka.topic_prefix),
            payload=((record.value or b"") if payload is None else payload)[:65536],
            key=record.key.decode(errors="replace") if record.key is not None else None,
            partition=record.partition, offset=record.offset, received_ns=time.time_ns(),
        )
        return (SIGNALS_DLQ, encode_json(letter), STAGE)
