"""The processor's batch handling without Kafka or Faust (``ProcessorService`` on a dict store and fakes):
outputs before states, marks after states, replays passed over, skipped records read back, a restart from
the checkpointed changelog losing no window, refused sends retried until accepted, bad records dead-lettered."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry
from test_processor_stage import simulated_payloads

from bpstream.services.bridge.batches import raw_records as bridge_records
from bpstream.services.processor.changelog import changelog_topic, latest_values
from bpstream.services.processor.checkpoint import Checkpointer, DictStore, is_offset_mark, offset_mark_key
from bpstream.services.processor.readback import RawRecord, in_offset_order
from bpstream.services.processor.service import ProcessorService
from bpstream.services.processor.settings import ProcessorSettings
from bpstream.shared.errors import BpstreamError, TransientError
from bpstream.shared.gateway import ChunkBatch, encode_batch
from bpstream.shared.kafka import OutgoingRecord, key_partition
from bpstream.shared.messages import SignalChunk, decode_chunk, decode_dead_letter, decode_window, encode_chunk
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import SIGNALS_DLQ, WINDOWS, device_key

pytestmark = pytest.mark.unit

SETTINGS = ProcessorSettings(kafka=KafkaSettings(topic_prefix="t."), checkpoint_interval_s=3600)
CHANGELOG = changelog_topic(SETTINGS)
KEY = device_key("clinic-1", "dev-1").encode()


@dataclass
class Stored:
    key: bytes | None
    value: bytes | None


class FakeKafka:
    """The producer and the two readers the service needs, over in-memory lists."""

    def __init__(self, raw: list[RawRecord], fail: Sequence[BpstreamError] = ()) -> None:
        self.raw, self.fail = raw, list(fail)
        self.sent: list[OutgoingRecord] = []
        self.read_back_calls: list[tuple[int, int, int]] = []

    async def send_many(self, records: Sequence[OutgoingRecord]) -> None:
        if self.fail:
            raise self.fail.pop(0)
        self.sent.extend(records)

    async def read_back(self, partition: int, start: int, end: int) -> list[RawRecord]:
        self.read_back_calls.append((partition, start, end))
        return [r for r in self.raw if r.partition == partition and start <= r.offset < end]

    async def read_changelog(self, partitions: Sequence[int]) -> Iterable[Stored]:
        return [Stored(r[2] if isinstance(r[2], bytes) else None, r[1]) for r in self.sent if r[0] == CHANGELOG]

    def topic(self, topic: object) -> list[OutgoingRecord]:
        return [r for r in self.sent if r[0] == topic]

    def window_ends(self) -> list[int]:
        return [decode_window(r[1]).end_ns for r in self.topic(WINDOWS)]


def service(kafka: FakeKafka, store: DictStore | None = None,
            settings: ProcessorSettings = SETTINGS) -> ProcessorService:
    return ProcessorService(settings, store=store or DictStore(), changelog=CHANGELOG, producer=kafka,
                            read_back=kafka.read_back, read_changelog=kafka.read_changelog,
                            registry=CollectorRegistry())


def raw_records(seconds: int = 40) -> list[RawRecord]:
    return [RawRecord(KEY, p, 0, k, 1_700_000_001.0 + k) for k, p in enumerate(simulated_payloads(seconds))]


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_outputs_are_sent_before_the_state_and_marks_follow_states() -> None:
    raw = raw_records()
    kafka = FakeKafka(raw)
    svc = service(kafka)
    run(svc.handle_batch(raw[:20]))
    # A partition met without a mark is checkpointed at once, after the batch's windows were accepted.
    first = kafka.topic(CHANGELOG)
    assert kafka.window_ends() and first
    assert max(i for i, r in enumerate(kafka.sent) if r[0] == WINDOWS) < kafka.sent.index(first[0])
    run(svc.handle_batch(raw[20:]))
    assert len(kafka.topic(CHANGELOG)) == len(first)  # within the interval: held in the store
    run(svc.checkpoint())
    changelog = kafka.topic(CHANGELOG)[len(first):]
    keys = [r[2] for r in changelog]
    assert KEY in keys and offset_mark_key(0) in keys
    assert keys.index(offset_mark_key(0)) > max(i for i, k in enumerate(keys) if k == KEY)
    assert max(i for i, r in enumerate(kafka.sent) if r[0] == WINDOWS) < kafka.sent.index(changelog[-1])
    assert svc.checkpoints.mark(0) == 40


def test_replays_are_passed_over_and_skipped_records_read_back() -> None:
    raw = raw_records()
    reference = FakeKafka(raw)
    run(service(reference).handle_batch(raw))
    kafka = FakeKafka(raw)
    svc = service(kafka)
    run(svc.handle_batch(raw[:10]))
    # The consumer replays 5..14, then skips 15..24 and delivers 25..
    run(svc.handle_batch(raw[5:15]))
    run(svc.handle_batch(raw[25:]))
    assert kafka.read_back_calls == [(0, 15, 25)]
    assert kafka.window_ends() == reference.window_ends()
    assert svc.metrics.replayed._value.get() == 5  # type: ignore[attr-defined]
    assert svc.metrics.read_back._value.get() == 10  # type: ignore[attr-defined]


def test_a_restart_from_the_checkpoint_loses_no_window_and_replays_identical_ones() -> None:
    raw = raw_records()
    reference = FakeKafka(raw)
    run(service(reference).handle_batch(raw))
    kafka = FakeKafka(raw)
    first = service(kafka)
    run(first.handle_batch(raw[:18]))
    run(first.checkpoint())
    run(first.handle_batch(raw[18:26]))  # processed, never checkpointed: the crash loses it
    # A new worker restores from the changelog; the consumer resumes from an older committed offset.
    second = service(kafka)
    run(second.restore_partitions([0]))
    assert second.checkpoints.mark(0) == 18
    run(second.handle_batch(raw[10:]))
    ends = kafka.window_ends()
    assert set(ends) == set(reference.window_ends())
    windows = {decode_window(r[1]).end_ns: decode_window(r[1]).samples for r in reference.topic(WINDOWS)}
    assert all(decode_window(r[1]).samples == windows[decode_window(r[1]).end_ns] for r in kafka.topic(WINDOWS))


def test_refused_sends_are_retried_until_kafka_accepts_them() -> None:
    raw = raw_records(20)
    refusals = [TransientError("broker away", reason="kafka_retriable"),
                BpstreamError("producer fenced", reason="kafka_error")]  # not retriable for the producer
    kafka = FakeKafka(raw, fail=refusals)
    svc = service(kafka)
    run(svc.handle_batch(raw))
    assert kafka.window_ends() and not kafka.fail
    assert svc.metrics.send_retries._value.get() == 2  # type: ignore[attr-defined]


def test_bad_records_are_dead_lettered_without_blocking_the_device() -> None:
    raw = raw_records(20)
    bad = [RawRecord(None, raw[3].value, 0, 100, 0.0), RawRecord(KEY, b"garbage", 0, 101, 0.0),
           RawRecord(b"clinic-1/other", raw[4].value, 0, 102, 0.0)]
    kafka = FakeKafka(raw)
    run(service(kafka).handle_batch([*raw[:10], *bad, *[RawRecord(r.key, r.value, 0, r.offset + 103,
                                                                  r.timestamp_s) for r in raw[10:]]]))
    reasons = sorted(decode_dead_letter(r[1]).reason for r in kafka.topic(SIGNALS_DLQ))
    assert reasons == ["key_mismatch", "missing_key_or_value", "truncated"]  # garbage is read as a chunk
    reference = FakeKafka(raw)
    run(service(reference).handle_batch(raw))
    assert kafka.window_ends() == reference.window_ends()


def test_changelog_restore_takes_the_latest_value_and_tombstones() -> None:
    records = [Stored(b"a", b"1"), Stored(b"b", b"1"), Stored(b"a", b"2"), Stored(b"b", None), Stored(None, b"x")]
    assert latest_values(records) == {b"a": b"2"}


def test_checkpointer_and_offset_order_without_kafka() -> None:
    store = DictStore()
    checkpoints = Checkpointer(store, CHANGELOG)
    checkpoints.put_mark(2, 7)
    checkpoints.put(b"c/d", b"state", 2)
    records = checkpoints.take()
    assert [r[2] for r in records] == [b"c/d", offset_mark_key(2)] and records[1][3] == 2  # type: ignore[misc]
    assert checkpoints.take() == [] and is_offset_mark(offset_mark_key(2))
    store.put(offset_mark_key(3), b"not a number")
    assert checkpoints.mark(2) == 7 and checkpoints.mark(3) is None and checkpoints.devices() == 1

    async def no_read_back(partition: int, start: int, end: int) -> list[RawRecord]:
        raise AssertionError("nothing to read back")

    batch = [RawRecord(KEY, b"", 2, k, 0.0) for k in (5, 6, 7, 8)] + [RawRecord(KEY, b"", 4, 0, 0.0)]
    ordered = asyncio.run(in_offset_order(batch, checkpoints.mark, no_read_back))
    assert [(r.partition, r.offset) for r in ordered.records] == [(2, 7), (2, 8), (4, 0)]
    assert ordered.replayed == 2 and ordered.marks == {2: 9, 4: 1} and ordered.unmarked == {4}


def test_a_silent_devices_state_is_evicted_with_a_tombstone_and_a_returning_device_starts_afresh() -> None:
    settings = SETTINGS.model_copy(update={"evict_after_s": 30.0, "evict_check_interval_s": 1e-9})
    quiet = device_key("clinic-1", "quiet").encode()
    # One device streams 40 s (one chunk per second of record time); a second, "quiet", has the state the first
    # had after 5 s and then sends nothing.
    raw = raw_records(40)
    kafka = FakeKafka(raw)
    store = DictStore()
    svc = service(kafka, store, settings)
    run(svc.handle_batch(raw[:5]))
    run(svc.checkpoint())  # the store holds checkpointed states (live objects in between)
    store.put(quiet, store.data[KEY])  # a second device with the same (early) state: silent from now on
    run(svc.handle_batch(raw[5:25]))
    assert quiet in store.data and KEY in store.data  # silent for 20 s of record time only: kept
    run(svc.handle_batch(raw[25:]))
    run(svc.checkpoint())
    # 'quiet' last changed at record time +4 s, the newest chunk is +39 s: beyond 30 s, evicted; KEY is live.
    assert quiet not in store.data and KEY in store.data
    tombstones = [r for r in kafka.topic(CHANGELOG) if r[2] == quiet]
    assert tombstones and tombstones[-1][1] is None
    assert latest_values(run_read(kafka)).get(quiet) is None


def run_read(kafka: FakeKafka) -> Iterable[Stored]:
    return asyncio.run(kafka.read_changelog([0]))  # type: ignore[return-value]


def test_states_of_partitions_another_worker_owns_are_not_evicted() -> None:
    settings = SETTINGS.model_copy(update={"evict_after_s": 1.0, "evict_check_interval_s": 1e-9})
    raw = raw_records(30)
    kafka = FakeKafka(raw)
    store = DictStore()
    svc = service(kafka, store, settings)
    run(svc.handle_batch(raw[:10]))
    run(svc.checkpoint())
    other = device_key("clinic-1", "elsewhere").encode()
    from bpstream.services.processor.state import decode_state, encode_state

    foreign = decode_state(store.data[KEY])
    foreign.partition = 7  # a partition this worker was never assigned
    store.put(other, encode_state(foreign))
    run(svc.handle_batch(raw[10:]))
    assert other in store.data


def test_states_stay_live_between_checkpoints_and_a_batch_cut_short_reloads_them_from_the_changelog() -> None:
    raw = raw_records()
    reference = FakeKafka(raw)
    run(service(reference).handle_batch(raw))
    kafka = FakeKafka(raw)
    store = DictStore()
    svc = service(kafka, store)
    run(svc.handle_batch(raw[:12]))  # a partition without a mark: checkpointed at once
    stored = store.data[KEY]
    run(svc.handle_batch(raw[12:20]))
    assert store.data[KEY] == stored  # live object in between: the store keeps the checkpointed state

    class CutShort(FakeKafka):
        async def send_many(self, records: Sequence[OutgoingRecord]) -> None:
            raise asyncio.CancelledError  # e.g. the worker stopped while the outputs were being sent

    svc.producer = CutShort(raw)
    with pytest.raises(asyncio.CancelledError):
        run(svc.handle_batch(raw[20:30]))
    # Nothing of the cut batch was published, so its chunks must not count as seen: the live states are
    # dropped, every partition is read from the changelog again and the records after its mark read back.
    svc.producer = kafka
    run(svc.handle_batch(raw[20:]))
    assert kafka.read_back_calls == [(0, 12, 20)]
    assert sorted(set(kafka.window_ends())) == reference.window_ends()  # 12..19's windows again: identical
    run(svc.checkpoint())
    assert svc.checkpoints.mark(0) == 40 and store.data[KEY] != stored


def test_batch_records_give_the_windows_of_chunk_records_and_bad_chunks_cost_only_themselves() -> None:
    """The bridge's per-partition ChunkBatch records on signals.raw: same windows as one record per chunk."""
    devices = [f"dev-{i}" for i in range(8)]
    streams = {d: simulated_payloads(30, device=d, seed=i) for i, d in enumerate(devices)}
    singles: list[RawRecord] = []
    batches: list[RawRecord] = []
    offsets = {"single": [0] * 6, "batch": [0] * 6}
    for second in range(30):
        good = [(streams[d][second], decode_chunk(streams[d][second])) for d in devices]
        for payload, chunk in good:
            key = device_key(chunk.clinic_id, chunk.device_id).encode()
            p = key_partition(key, 6)
            singles.append(RawRecord(key, payload, p, offsets["single"][p], 1_700_000_001.0 + second))
            offsets["single"][p] += 1
        for record in bridge_records("clinic-1", "gw-1", good):
            p = record[3] if len(record) == 4 else key_partition(str(record[2]).encode(), 6)
            key = record[2].encode() if isinstance(record[2], str) else record[2]
            batches.append(RawRecord(key, record[1], p, offsets["batch"][p], 1_700_000_001.0 + second))
            offsets["batch"][p] += 1
    assert len(batches) <= 6 * 30 < len(singles)  # 8 devices over 6 partitions: at most 6 records a second
    reference, batched = FakeKafka(singles), FakeKafka(batches)
    run(service(reference).handle_batch(singles))
    svc = service(batched)
    run(svc.handle_batch(batches))
    assert batched.window_ends() and sorted(batched.window_ends()) == sorted(reference.window_ends())
    assert svc.metrics.chunks._value.get() == len(singles)  # type: ignore[attr-defined]
    # A batch with a corrupt chunk, a chunk of another clinic and one of a device of another partition:
    # each is dead-lettered with its own bytes and reason; the good chunk beside them is processed.
    p0 = key_partition(device_key("clinic-1", devices[0]).encode(), 6)
    wrong = next(d for d in devices if key_partition(device_key("clinic-1", d).encode(), 6) != p0)
    corrupt = bytearray(streams[devices[0]][29])
    corrupt[40] ^= 0xFF
    x = decode_chunk(simulated_payloads(1, device="dev-x")[0])
    other_clinic = encode_chunk(SignalChunk("clinic-2", x.device_id, x.seq, x.t0_ns, x.sample_rate, x.channels,
                                            x.samples))
    fresh = simulated_payloads(31, device=devices[0], seed=0)[30]
    value = encode_batch(ChunkBatch(clinic_id="clinic-1", gateway_id="gw-1",
                                    chunks=[bytes(corrupt), other_clinic, streams[wrong][0], fresh]))
    kafka = FakeKafka([])
    svc = service(kafka)
    run(svc.handle_batch([RawRecord(b"clinic-1/gateway/gw-1", value, p0, 0, 1_700_000_001.0)]))
    letters = {decode_dead_letter(r[1]).reason: decode_dead_letter(r[1]) for r in kafka.topic(SIGNALS_DLQ)}
    assert set(letters) == {"bad_checksum", "key_mismatch", "wrong_partition"}
    assert letters["bad_checksum"].payload == bytes(corrupt) and letters["wrong_partition"].payload == streams[wrong][0]
    assert svc._live[device_key("clinic-1", devices[0]).encode()].pending  # the good chunk reached its state
