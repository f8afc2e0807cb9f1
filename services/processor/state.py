"""The processor's per-device state and the window cut, shared by the stage and late-data repair (pure).

:class:`DeviceState` is a msgspec struct encoded as MessagePack (:func:`encode_state` / :func:`decode_state`),
stored in the changelog-backed table. Buffered chunks keep their original wire bytes (int16, about 570 bytes
a second), so a state stays small and bounded. Fields added later have defaults, so older stored states stay
readable without a version bump.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

from bpstream.shared.errors import DecodeError
from bpstream.shared.messages import QualityRecord, SignalChunk, decode_chunk

NS: Final = 1_000_000_000
STATE_VERSION: Final = 1

#: Kinds of :class:`QualityRecord`.
WINDOW: Final = "window"
GAP: Final = "gap"
GAP_FILLED: Final = "gap_filled"
CLOCK_JUMP: Final = "clock_jump"
FORMAT_CHANGE: Final = "format_change"
STREAM_RESET: Final = "stream_reset"
WINDOW_ERROR: Final = "window_error"


class BufferedChunk(msgspec.Struct, array_like=True):
    """A chunk kept in the device state: its position in seq and device time, and its original bytes."""

    seq: int
    t0_ns: int
    n_samples: int
    received_ns: int
    payload: bytes


class Hole(msgspec.Struct, array_like=True):
    """Chunks declared missing (a gap) that may still arrive late: their seq range and device-time span."""

    seq_first: int
    seq_last: int
    start_ns: int
    end_ns: int
    #: Missing chunks that arrived late so far.
    filled: int = 0


class DeviceState(msgspec.Struct, kw_only=True):
    """Everything the processor remembers about one device (serialised into the changelog-backed table)."""

    v: int = STATE_VERSION
    clinic_id: str = ""
    #: Next seq to accept in order; None before the first chunk.
    next_seq: int | None = None
    #: Sample rate and channels of the current contiguous run.
    sample_rate: float = 0.0
    channels: tuple[str, ...] = ()
    #: Contiguous chunks of the current run, in seq order (oldest trimmed once no window needs them).
    buffer: list[BufferedChunk] = []
    #: Chunks ahead of ``next_seq`` waiting for the missing ones, in seq order.
    pending: list[BufferedChunk] = []
    #: Device time where the last accepted chunk ended (where the next one should start).
    expected_t0_ns: int | None = None
    #: End (device time) of the last window emitted in order; in-order windows only move forward.
    last_window_end_ns: int = 0
    duplicates: int = 0
    late: int = 0
    gaps: int = 0
    missing_chunks: int = 0
    clock_jumps: int = 0
    windows: int = 0
    #: Late-data repair (``bpstream.services.processor.repair``), empty unless a gap is open: the gaps that
    #: late chunks may still fill, the window ends their absence prevented, and the chunks around them.
    holes: list[Hole] = []
    missed_ends: list[int] = []
    repair: list[BufferedChunk] = []
    repaired_chunks: int = 0
    repaired_windows: int = 0
    #: Consecutive late chunks that continue each other (seq and device time): a device whose clock went back.
    behind_run: int = 0
    behind_next_seq: int = 0
    behind_t0_ns: int = 0
    #: Eviction of silent devices: the receipt time (Kafka record time) of the last chunk that changed this
    #: state, and the ``signals.raw`` partition it came from (only the partition's owner evicts it).
    last_received_ns: int = 0
    partition: int = -1


_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(DeviceState)


def encode_state(state: DeviceState) -> bytes:
    return _state_encoder.encode(state)


def decode_state(data: bytes) -> DeviceState:
    """Decode a stored state; raise ``DecodeError`` if it is not one (the caller then starts afresh)."""
    try:
        state = _state_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"invalid device state: {exc}", reason="bad_state") from exc
    if state.v != STATE_VERSION:
        raise DecodeError(f"device state version {state.v} is not supported", reason="bad_state")
    return state


@dataclass(slots=True)
class WindowCut:
    """A window cut from a device's contiguous run, not yet prepared for the model."""

    clinic_id: str
    device_id: str
    start_ns: int
    end_ns: int
    seq_first: int
    seq_last: int
    #: When the newest chunk of the window reached Kafka.
    received_ns: int
    samples: npt.NDArray[np.float32]
    channels: tuple[str, ...]
    sample_rate: float

    def error(self, detail: str, now_ns: int) -> QualityRecord:
        """The ``window_error`` record of a cut window that could not be prepared."""
        return QualityRecord(kind=WINDOW_ERROR, clinic_id=self.clinic_id, device_id=self.device_id,
                             start_ns=self.start_ns, end_ns=self.end_ns, seq_first=self.seq_first,
                             seq_last=self.seq_last, quality_ok=False, detail=detail[:1000], emitted_ns=now_ns)


#: Decoded forms of buffered chunks, least recently used first (a chunk sits in about window/hop windows, so
#: each is cut from several times). Keyed by the chunk's bytes, so a different chunk can never be mistaken for
#: it. Sized for about 3,000 devices' buffers (window + hop + a chunk each) in one worker.
DECODED_CHUNKS_MAX: Final = 32768
_decoded: OrderedDict[bytes, SignalChunk] = OrderedDict()


def remember_decoded(payload: bytes, chunk: SignalChunk) -> None:
    """Keep a chunk the caller has just decoded from ``payload``, so cutting windows does not decode it again."""
    _decoded[payload] = chunk
    if len(_decoded) > DECODED_CHUNKS_MAX:
        _decoded.popitem(last=False)  # O(1); deleting a plain dict's first key makes the next scan longer


def decode_buffered(payload: bytes) -> SignalChunk:
    """Decode a buffered chunk's bytes, or return the decoded form already kept; callers must not modify it."""
    chunk = _decoded.get(payload)
    if chunk is None:
        chunk = decode_chunk(payload)
        remember_decoded(payload, chunk)
    else:
        _decoded.move_to_end(payload)
    return chunk


def chunk_end_ns(chunk: BufferedChunk, fs: float) -> int:
    return chunk.t0_ns + round(chunk.n_samples * NS / fs)


def first_grid_end(start_ns: int, window_ns: int, hop_ns: int) -> int:
    """The first window end on the hop grid whose window starts at or after ``start_ns``."""
    return -(-(start_ns + window_ns) // hop_ns) * hop_ns


def _index(t_ns: int, starts: list[int], offsets: npt.NDArray[np.int64], fs: float) -> int:
    """Index of the first sample at or after device time ``t_ns``, anchored on the chunk that contains it
    (so slow device clock drift does not accumulate into misaligned windows)."""
    k = max(0, bisect.bisect_right(starts, t_ns) - 1)
    return int(offsets[k]) + math.ceil((t_ns - starts[k]) * fs / NS - 1e-6)


def cut_windows(run: Sequence[BufferedChunk], ends: Sequence[int], *, clinic_id: str, device_id: str,
                window_ns: int, fs: float, channels: tuple[str, ...]) -> list[WindowCut]:
    """Cut the windows ending at ``ends`` from ``run``, contiguous chunks in seq order of one format.

    A window is the ``window_ns`` of samples before the first sample at or after its end, counted on the
    chunk that contains the end, so the same chunks give the same samples whichever run they are cut from
    (a window repaired from late chunks is identical to the one an in-order stream gives).
    """
    if not run or not ends:
        return []
    n_win = round(window_ns / NS * fs)
    decoded = [decode_buffered(c.payload) for c in run]
    offsets = np.cumsum([0] + [c.n_samples for c in run])
    data = np.concatenate([c.samples for c in decoded], axis=1)
    starts = [c.t0_ns for c in run]
    cuts: list[WindowCut] = []
    for end in ends:
        stop = _index(end, starts, offsets, fs)
        if stop - n_win < 0 or stop > data.shape[1]:
            continue
        first = int(np.searchsorted(offsets, stop - n_win, side="right")) - 1
        last = int(np.searchsorted(offsets, stop, side="left")) - 1
        used = run[first : last + 1]
        cuts.append(WindowCut(clinic_id=clinic_id, device_id=device_id, start_ns=end - window_ns, end_ns=end,
                              seq_first=used[0].seq, seq_last=used[-1].seq,
                              received_ns=max(c.received_ns for c in used), samples=data[:, stop - n_win : stop],
                              channels=channels, sample_rate=fs))
    return cuts
