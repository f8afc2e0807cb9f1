"""Gateway batches: the ``ChunkBatch`` contract (round trip, every named rejection, random and corrupted bytes
only ever raise ``DecodeError``) and the bridge's split (per-chunk verdicts, clinic pinning, limits per chunk)."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_messages import corrupted

from bpstream.services.bridge.batches import split_batch
from bpstream.services.bridge.limits import PAYLOAD_TOO_LARGE, RATE_LIMITED, DeviceLimits, LimitChecker
from bpstream.services.bridge.stage import BAD_SAMPLE_RATE, BAD_TOPIC, TOPIC_MISMATCH, Rejection
from bpstream.shared.errors import DecodeError, EncodeError
from bpstream.shared.gateway import MAX_BATCH_BYTES, MAX_BATCH_CHUNKS, ChunkBatch, decode_batch, encode_batch
from bpstream.shared.messages import MAX_CHUNK_BYTES, SignalChunk, decode_chunk, encode_chunk
from bpstream.shared.topics import mqtt_gateway_topic, parse_gateway_topic

RATES = (125.0,)
TOPIC = mqtt_gateway_topic("clinic-1", "gw-1")
T0 = 1_700_000_000_000_000_000


def chunk(device: str = "dev-1", *, clinic: str = "clinic-1", seq: int = 0, rate: float = 125.0) -> bytes:
    n = round(rate)
    samples = np.stack([np.sin(np.arange(n) / 7.0), np.cos(np.arange(n) / 5.0)]).astype(np.float32)
    return encode_chunk(SignalChunk(clinic, device, seq, T0 + seq * 10**9, rate, ("ecg", "ppg"), samples))


def batch(*chunks: bytes, clinic: str = "clinic-1", gateway: str = "gw-1") -> bytes:
    return encode_batch(ChunkBatch(clinic_id=clinic, gateway_id=gateway, chunks=list(chunks)))


def limits(rate: float | None = None, burst: float = 1000.0, size: int = MAX_CHUNK_BYTES) -> LimitChecker:
    return LimitChecker(DeviceLimits(size, rate, burst))


def test_round_trip_keeps_every_chunk_byte_for_byte() -> None:
    chunks = [chunk("dev-1", seq=0), chunk("dev-2", seq=0), chunk("dev-1", seq=1)]
    decoded = decode_batch(batch(*chunks))
    assert (decoded.v, decoded.clinic_id, decoded.gateway_id, decoded.chunks) == (1, "clinic-1", "gw-1", chunks)


def test_topic_layout() -> None:
    assert TOPIC == "bpstream/clinic-1/gateway/gw-1/batch"
    assert parse_gateway_topic(TOPIC) == ("clinic-1", "gw-1")
    for bad in ("bpstream/clinic-1/gw-1/batch", "bpstream/clinic-1/gateway/gw-1/signals",
                "bpstream/clinic 1/gateway/gw-1/batch", "other/clinic-1/gateway/gw-1/batch"):
        with pytest.raises(ValueError, match="topic"):
            parse_gateway_topic(bad)


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: ChunkBatch(clinic_id="clinic 1", gateway_id="gw", chunks=[b"x"]), "bad_id"),
    (lambda: ChunkBatch(clinic_id="c", gateway_id="gw", chunks=[]), "empty"),
    (lambda: ChunkBatch(clinic_id="c", gateway_id="gw", chunks=[b"x"] * (MAX_BATCH_CHUNKS + 1)), "too_many_chunks"),
    (lambda: ChunkBatch(clinic_id="c", gateway_id="gw", chunks=[b"x" * (MAX_CHUNK_BYTES + 1)]), "oversize"),
])
def test_encoder_refuses_what_breaks_the_contract(make: object, reason: str) -> None:
    with pytest.raises(EncodeError) as err:
        encode_batch(make())  # type: ignore[operator]
    assert err.value.reason == reason


def _raw(**fields: object) -> bytes:
    return msgspec.msgpack.encode({"v": 1, "clinic_id": "clinic-1", "gateway_id": "gw-1", "chunks": [b"x"],
                                   **fields})


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "invalid_message"),
    (b"BP\x01" + b"\x00" * 40, "invalid_message"),  # an old single chunk is not a batch
    (_raw(v=2), "bad_version"),
    (_raw(clinic_id="../x"), "bad_id"),
    (_raw(gateway_id=""), "bad_id"),
    (_raw(chunks=[]), "empty"),
    (_raw(chunks=[b"x"] * (MAX_BATCH_CHUNKS + 1)), "too_many_chunks"),
    (_raw(chunks="not a list"), "invalid_message"),
    (_raw(chunks=[1, 2]), "invalid_message"),
    (b"\x00" * (MAX_BATCH_BYTES + 1), "oversize"),
])
def test_decoder_rejections_are_named(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode_batch(data)
    assert err.value.reason == reason


def _decode_or_error(data: bytes) -> None:
    try:
        decoded = decode_batch(data)
    except DecodeError as exc:
        error = exc
    else:
        assert decoded.v == 1 and 1 <= len(decoded.chunks) <= MAX_BATCH_CHUNKS
        assert all(isinstance(c, bytes) for c in decoded.chunks)
        return
    assert error.reason and str(error)



@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_escape_as_anything_but_decode_error(data: bytes) -> None:
    _decode_or_error(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupted_batches_decode_or_raise_and_their_chunks_too(data: st.DataObject) -> None:
    payload = corrupted(batch(chunk("dev-1"), chunk("dev-2"), chunk("dev-1", seq=1)), data)
    _decode_or_error(payload)
    # what the bridge does with it never raises: a whole-batch rejection or a verdict per chunk
    verdicts = split_batch(TOPIC, bytes(payload), RATES, limits(), mono=0.0)
    if not isinstance(verdicts, Rejection):
        for one in verdicts:
            if not isinstance(one.verdict, Rejection):
                assert decode_chunk(one.payload).clinic_id == "clinic-1"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["dev-1", "dev-2", "dev-3"]), st.integers(0, 1000)), min_size=1,
                max_size=40))
def test_any_valid_batch_splits_into_its_chunks_in_order(items: list[tuple[str, int]]) -> None:
    chunks = [chunk(device, seq=seq) for device, seq in items]
    verdicts = split_batch(TOPIC, batch(*chunks), RATES, limits(), mono=0.0)
    assert not isinstance(verdicts, Rejection)
    assert [v.payload for v in verdicts] == chunks
    assert [(v.verdict.device_id, v.verdict.seq) for v in verdicts if isinstance(v.verdict, SignalChunk)] == items


def test_a_bad_chunk_is_dead_lettered_alone_with_its_reason() -> None:
    good, corrupt = chunk("dev-1"), bytearray(chunk("dev-2"))
    corrupt[40] ^= 0xFF
    verdicts = split_batch(TOPIC, batch(good, bytes(corrupt), chunk("dev-3", rate=250.0)), RATES, limits(),
                           mono=0.0)
    assert not isinstance(verdicts, Rejection)
    reasons = [v.verdict.reason if isinstance(v.verdict, Rejection) else "ok" for v in verdicts]
    assert reasons == ["ok", "bad_checksum", BAD_SAMPLE_RATE]
    assert verdicts[1].payload == bytes(corrupt)  # the dead letter keeps the chunk's own bytes


def test_clinic_pinning_batch_and_chunks() -> None:
    # the batch names another clinic or gateway than its topic: refused whole
    for other in (batch(chunk(), clinic="clinic-2"), batch(chunk(), gateway="gw-2")):
        verdict = split_batch(TOPIC, other, RATES, limits(), mono=0.0)
        assert isinstance(verdict, Rejection) and verdict.reason == TOPIC_MISMATCH
    # a chunk of another clinic inside this clinic's batch: that chunk alone is refused
    verdicts = split_batch(TOPIC, batch(chunk("dev-1"), chunk("dev-9", clinic="clinic-2")), RATES, limits(),
                           mono=0.0)
    assert not isinstance(verdicts, Rejection)
    assert isinstance(verdicts[0].verdict, SignalChunk)
    assert isinstance(verdicts[1].verdict, Rejection) and verdicts[1].verdict.reason == TOPIC_MISMATCH


def test_malformed_batch_and_bad_topic_are_refused_whole() -> None:
    verdict = split_batch(TOPIC, b"\x93garbage", RATES, limits(), mono=0.0)
    assert isinstance(verdict, Rejection) and verdict.reason == "invalid_message"
    verdict = split_batch("bpstream/clinic-1/dev-1/signals", batch(chunk()), RATES, limits(), mono=0.0)
    assert isinstance(verdict, Rejection) and verdict.reason == BAD_TOPIC


def test_rate_limit_and_size_limit_apply_per_chunk_and_per_device() -> None:
    checker = limits(rate=1.0, burst=2.0)
    chunks = [chunk("dev-1", seq=s) for s in range(3)] + [chunk("dev-2", seq=0)]
    verdicts = split_batch(TOPIC, batch(*chunks), RATES, checker, mono=0.0)
    assert not isinstance(verdicts, Rejection)
    reasons = [v.verdict.reason if isinstance(v.verdict, Rejection) else "ok" for v in verdicts]
    assert reasons == ["ok", "ok", RATE_LIMITED, "ok"]  # dev-1's third chunk is over its burst; dev-2 is not
    small = limits(size=1024)
    verdicts = split_batch(TOPIC, batch(chunk("dev-1", rate=500.0)), RATES, small, mono=0.0)  # ~2 KB
    assert not isinstance(verdicts, Rejection)
    assert isinstance(verdicts[0].verdict, Rejection) and verdicts[0].verdict.reason == PAYLOAD_TOO_LARGE


def test_good_chunks_are_forwarded_as_one_record_per_partition_in_device_order() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from bpstream.services.bridge.batches import raw_records
    from bpstream.shared.gateway import raw_record_chunks
    from bpstream.shared.topics import SIGNALS_RAW, device_key

    payloads = [chunk(f"dev-{d}", seq=s) for s in range(3) for d in range(20)]
    good = [(p, decode_chunk(p)) for p in payloads]
    records = raw_records("clinic-1", "gw-1", good)
    partitioner = DefaultPartitioner()
    assert len(records) == SIGNALS_RAW.partitions  # 20 devices cover all 6 partitions
    forwarded: list[bytes] = []
    for record in records:
        assert record[0] == SIGNALS_RAW and len(record) == 4 and record[2] == "clinic-1/gateway/gw-1"
        members = raw_record_chunks(record[1])  # type: ignore[arg-type]
        for member in members:  # every chunk sits in the partition Kafka's partitioner gives its device
            c = decode_chunk(member)
            key = device_key(c.clinic_id, c.device_id).encode()
            assert partitioner(key, list(range(6)), list(range(6))) == record[3]  # type: ignore[misc]
        forwarded.extend(members)
    assert sorted(forwarded) == sorted(payloads)  # byte for byte, none lost or doubled
    for device in range(20):  # each device's chunks in the order the gateway sent them
        own = [decode_chunk(m).seq for m in forwarded if decode_chunk(m).device_id == f"dev-{device}"]
        assert own == [0, 1, 2]
    # a partition that gets one chunk keeps the plain chunk record; unbatched: one record per chunk
    assert raw_records("clinic-1", "gw-1", good[:1]) == [(SIGNALS_RAW, payloads[0], "clinic-1/dev-0")]
    assert [r[1] for r in raw_records("clinic-1", "gw-1", good, batched=False)] == payloads
    # a record that does not start as a MessagePack map is a chunk (garbage is the chunk decoder's to refuse)
    assert raw_record_chunks(payloads[0]) == [payloads[0]] and raw_record_chunks(b"garbage") == [b"garbage"]
