"""The bridge's pure handling of a gateway batch: split it into the usual per-chunk records.

A batch arrives on ``bpstream/<clinic>/gateway/<gateway>/batch`` (``shared.gateway``). How clinic pinning is
enforced, in two layers:

* the broker: a gateway account (``bpstream devices add --clinic C --gateway G``, MQTT user ``C/gateway/G``)
  may write only ``bpstream/C/gateway/G/batch`` (and its status), so it cannot publish under another clinic's
  or gateway's topic;
* the bridge: the batch's ``clinic_id``/``gateway_id`` must equal the topic's (else the whole batch is
  dead-lettered, ``topic_mismatch``), and every chunk's clinic must equal the topic's clinic (else that chunk
  is dead-lettered, ``topic_mismatch``): a gateway may carry any device of its own clinic, none of another.

A malformed batch (bad envelope, bad version, too many chunks, oversize) is dead-lettered whole with the
decoder's reason. Otherwise each chunk is checked exactly as a single-chunk message: the per-device size limit
and token bucket (keyed by the chunk's ``(clinic, device)``), the codec, sample rate and device time; good
chunks are forwarded byte for byte, bad ones dead-lettered one by one with their reason.

Forwarding (:func:`raw_records`): the good chunks are grouped by the ``signals.raw`` partition of their device
key (Kafka's default partitioner) and each group goes out as one ``ChunkBatch`` record sent to that partition
explicitly (a group of one as the usual chunk record keyed ``clinic/device``). Per-device order and the
processor's state ownership are therefore exactly those of single-chunk records, with several times fewer
records for Kafka and the processor.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from bpstream.services.bridge.limits import LimitChecker
from bpstream.services.bridge.stage import BAD_TOPIC, TOPIC_MISMATCH, DeviceTimeLimits, Rejection, check_chunk
from bpstream.shared.errors import DecodeError
from bpstream.shared.gateway import ChunkBatch, decode_batch, encode_batch
from bpstream.shared.kafka import OutgoingRecord, key_partition
from bpstream.shared.messages import SignalChunk, decode_chunk
from bpstream.shared.topics import SIGNALS_RAW, device_key, parse_gateway_topic


@dataclass(frozen=True, slots=True)
class ChunkVerdict:
    """One chunk of a batch: its encoded bytes and either the decoded chunk or why it is refused."""

    payload: bytes
    verdict: SignalChunk | Rejection


def split_batch(topic: str, payload: bytes, allowed_rates: Collection[float], limits: LimitChecker, *,
                mono: float, now_ns: int | None = None,
                time_limits: DeviceTimeLimits | None = None) -> list[ChunkVerdict] | Rejection:
    """The batch's chunks with a verdict each, or the :class:`Rejection` of the whole batch."""
    try:
        clinic_id, gateway_id = parse_gateway_topic(topic)
    except ValueError as exc:
        return Rejection(BAD_TOPIC, str(exc))
    try:
        batch = decode_batch(payload)
    except DecodeError as exc:
        return Rejection(exc.reason, str(exc))
    if (batch.clinic_id, batch.gateway_id) != (clinic_id, gateway_id):
        return Rejection(TOPIC_MISMATCH, f"topic names gateway {clinic_id}/{gateway_id}, "
                                         f"batch {batch.clinic_id}/{batch.gateway_id}")
    out: list[ChunkVerdict] = []
    for data in batch.chunks:
        out.append(ChunkVerdict(data, _chunk_verdict(data, clinic_id, allowed_rates, limits, mono, now_ns,
                                                     time_limits)))
    return out


def _chunk_verdict(data: bytes, clinic_id: str, allowed_rates: Collection[float], limits: LimitChecker,
                   mono: float, now_ns: int | None, time_limits: DeviceTimeLimits | None) -> SignalChunk | Rejection:
    size = limits.check(None, len(data), mono)  # size first: an oversize chunk is not decoded
    if size is not None:
        return size
    try:
        chunk = decode_chunk(data)
    except DecodeError as exc:
        return Rejection(exc.reason, str(exc))
    if chunk.clinic_id != clinic_id:
        return Rejection(TOPIC_MISMATCH, f"chunk of clinic {chunk.clinic_id} in a batch of clinic {clinic_id}")
    limited = limits.check((chunk.clinic_id, chunk.device_id), 0, mono)
    if limited is not None:
        return limited
    return check_chunk(chunk, allowed_rates, now_ns=now_ns, time_limits=time_limits) or chunk


def raw_records(clinic_id: str, gateway_id: str, good: list[tuple[bytes, SignalChunk]], *, batched: bool = True,
                partitions: int = SIGNALS_RAW.partitions) -> list[OutgoingRecord]:
    """The ``signals.raw`` records of a batch's good chunks (``(payload, chunk)`` in arrival order): one
    ``ChunkBatch`` per partition, in order of each partition's first chunk (one record per chunk if not
    ``batched``, and for a partition that gets a single chunk)."""
    keyed = [(payload, device_key(chunk.clinic_id, chunk.device_id)) for payload, chunk in good]
    if not batched:
        return [(SIGNALS_RAW, payload, key) for payload, key in keyed]
    groups: dict[int, list[tuple[bytes, str]]] = {}
    for payload, key in keyed:
        groups.setdefault(key_partition(key.encode(), partitions), []).append((payload, key))
    records: list[OutgoingRecord] = []
    for partition, members in groups.items():
        if len(members) == 1:
            records.append((SIGNALS_RAW, members[0][0], members[0][1]))
            continue
        value = encode_batch(ChunkBatch(clinic_id=clinic_id, gateway_id=gateway_id, chunks=[p for p, _ in members]))
        records.append((SIGNALS_RAW, value, f"{clinic_id}/gateway/{gateway_id}", partition))
    return records
