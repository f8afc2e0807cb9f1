"""The gateway batch contract: several encoded chunks in one MQTT message (``ChunkBatch`` v1, MessagePack).

Clinic gateways (and phones) collect BLE readings from several wearables and may send them together: one
message on ``bpstream/<clinic>/gateway/<gateway>/batch`` carrying chunks of several devices and/or several
seconds of one device. Each chunk inside is a complete ``SignalChunk`` in its own binary encoding
(``messages.encode_chunk``, with its own CRC), so the bridge never re-encodes a chunk: it validates every chunk
exactly as a single-chunk message and forwards the valid ones byte for byte (below).
Single-chunk messages on ``bpstream/<clinic>/<device>/signals`` stay accepted unchanged.

The same envelope also travels on ``signals.raw``: the bridge forwards a gateway batch's valid chunks as one
``ChunkBatch`` record per Kafka partition (the chunks of the devices whose keys hash to that partition, sent
to it explicitly, so per-device order and state ownership are those of single-chunk records). A record is a
batch when it starts as a MessagePack map (a chunk starts with the magic ``BP``), a chunk otherwise;
:func:`raw_record_chunks` gives the chunks of either.

A batch names its clinic and gateway; both must match the topic it arrived on (the broker's ACL lets a gateway
account write only its own topic) and every chunk must belong to that clinic (the bridge checks each one).

``decode_batch`` raises ``DecodeError`` (reasons ``oversize``, ``invalid_message``, ``bad_version``, ``bad_id``,
``empty``, ``too_many_chunks``) and nothing else; chunk contents are checked by ``decode_chunk`` per chunk.

>>> import numpy as np
>>> from bpstream.shared.messages import SignalChunk, encode_chunk
>>> c = encode_chunk(SignalChunk("clinic-1", "dev-7", 0, 1_700_000_000_000_000_000, 125.0, ("ppg",),
...                               np.zeros((1, 125), dtype=np.float32)))
>>> len(decode_batch(encode_batch(ChunkBatch(clinic_id="clinic-1", gateway_id="gw-1", chunks=[c, c]))).chunks)
2
"""

from __future__ import annotations

from typing import Final

import msgspec

from bpstream.shared.errors import DecodeError, EncodeError
from bpstream.shared.messages import MAX_CHUNK_BYTES
from bpstream.shared.topics import ID_PATTERN

BATCH_VERSION: Final = 1
#: At most this many chunks in one batch (a gateway of 64 devices sending 4 s at a time).
MAX_BATCH_CHUNKS: Final = 256
#: Mosquitto's message size limit on the local servers (and a sane bound for any deployment).
MAX_BATCH_BYTES: Final = 256 * 1024


class ChunkBatch(msgspec.Struct, frozen=True, kw_only=True):
    """A gateway's batch: encoded chunks (``encode_chunk`` bytes), in the order the gateway received them."""

    v: int = BATCH_VERSION
    clinic_id: str
    gateway_id: str
    chunks: list[bytes]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ChunkBatch)


def encode_batch(batch: ChunkBatch) -> bytes:
    """Encode a batch; ``EncodeError`` if it breaks the contract (ids, chunk count or sizes)."""
    for value, what in ((batch.clinic_id, "clinic_id"), (batch.gateway_id, "gateway_id")):
        if not ID_PATTERN.match(value):
            raise EncodeError(f"{what} must match {ID_PATTERN.pattern}", reason="bad_id")
    if not batch.chunks or len(batch.chunks) > MAX_BATCH_CHUNKS:
        raise EncodeError(f"a batch holds 1..{MAX_BATCH_CHUNKS} chunks, not {len(batch.chunks)}",
                          reason="too_many_chunks" if batch.chunks else "empty")
    if any(len(chunk) > MAX_CHUNK_BYTES for chunk in batch.chunks):
        raise EncodeError(f"a chunk exceeds {MAX_CHUNK_BYTES} bytes", reason="oversize")
    data = _encoder.encode(batch)
    if len(data) > MAX_BATCH_BYTES:
        raise EncodeError(f"batch of {len(data)} bytes exceeds {MAX_BATCH_BYTES}", reason="oversize")
    return data


def decode_batch(data: bytes | bytearray | memoryview) -> ChunkBatch:
    """Decode a batch's envelope (the chunks stay encoded). Raises ``DecodeError`` with a stable reason."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}", reason="bad_type")
    if len(data) > MAX_BATCH_BYTES:
        raise DecodeError(f"batch of {len(data)} bytes exceeds {MAX_BATCH_BYTES}", reason="oversize")
    try:
        batch = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise DecodeError(f"invalid ChunkBatch: {exc}", reason="invalid_message") from exc
    if batch.v != BATCH_VERSION:
        raise DecodeError(f"ChunkBatch version {batch.v} is not supported", reason="bad_version")
    if not ID_PATTERN.match(batch.clinic_id) or not ID_PATTERN.match(batch.gateway_id):
        raise DecodeError("batch clinic_id or gateway_id is not a valid id", reason="bad_id")
    if not batch.chunks:
        raise DecodeError("batch carries no chunks", reason="empty")
    if len(batch.chunks) > MAX_BATCH_CHUNKS:
        raise DecodeError(f"batch carries {len(batch.chunks)} chunks > {MAX_BATCH_CHUNKS}",
                          reason="too_many_chunks")
    return batch


def is_batch(value: bytes) -> bool:
    """True when a ``signals.raw`` record is meant as a ``ChunkBatch`` (it starts as a MessagePack map); anything
    else is read as a chunk, so garbage is refused by the chunk decoder (``bad_magic``, ...)."""
    return bool(value) and (0x80 <= value[0] <= 0x8F or value[0] in (0xDE, 0xDF))


def raw_record_chunks(value: bytes) -> list[bytes]:
    """The encoded chunks a ``signals.raw`` record carries (a batch's, or the record itself); ``DecodeError``
    for a bad batch (a bad chunk is the chunk decoder's to refuse)."""
    return decode_batch(value).chunks if is_batch(value) else [value]
