"""The processor's pure stage: per-device reassembly in event time and sliding windows (no Kafka, no Faust).

:class:`Reassembler` takes the device's state and one chunk from ``signals.raw`` and returns the new state
plus what to publish: model-ready :class:`~bpstream.shared.messages.Window` messages and
:class:`QualityRecord` events. Everything is in device time (chunk ``t0_ns`` and ``seq``), never arrival time:

* chunks are put back in ``seq`` order; a ``seq`` seen before (buffered, pending or already passed) is a
  duplicate and ignored; a chunk ahead of the next expected ``seq`` is held until the missing one arrives;
* a missing chunk becomes a *gap* once more than ``max_reorder_chunks`` later chunks are waiting or event
  time has moved ``max_lateness_ns`` past where the missing chunk would have started; a chunk arriving after
  its gap was declared still fills it within ``late_horizon_ns`` (:mod:`~bpstream.services.processor.repair`:
  the windows it completes are cut then, same identities), and is *late* and ignored otherwise;
* a chunk dated further than ``max_ahead_ns`` after (or ``max_behind_ns`` before) its Kafka receipt time, or
  whose ``seq`` jumps more than ``max_seq_jump`` ahead without device time moving on accordingly, is refused
  (``StageOutput.rejected``; the service dead-letters it) and changes nothing: it never moves a window clock
  (``bpstream.shared.devicetime``, the same bounds the bridge applies, as defence in depth);
* a device that restarts (``seq`` back to low numbers, device time moving on) starts a new run: a chunk with a
  ``seq`` seen before but another device time is not a duplicate; so does one whose ``seq`` *and* device time
  went back, once more than ``max_reorder_chunks`` such chunks continue each other;
* a chunk whose ``t0_ns`` disagrees with the previous chunk's end by more than ``clock_tolerance_ns`` is a
  *clock jump*, and a change of sample rate or channel set is a *format change*; both restart the run;
* every hop (window ends at multiples of ``hop_ns`` in device time, so a window's identity
  ``(device, end_ns)`` does not depend on when the processor started) a window of ``window_ns`` is cut from
  the contiguous run, prepared with :func:`~bpstream.shared.preprocessing.preprocess_window` and emitted.

Windows are cut only from contiguous data: a window that would span a gap, a clock jump or a format change is
not emitted at all (the gap/jump record says why), because a clinician is better served by an explicit "no
reading: signal lost" than by a pressure estimated from interpolated or misaligned samples. ``gap_fraction``
of emitted windows is therefore 0. In-order window ends only move forward per device (a replay after a restart
re-emits nothing older than the last window recorded in the state), except when the device clock goes back:
the window clock is then rewound, or the device would get no window until its time passed the old one.

The state (:mod:`~bpstream.services.processor.state`) keeps buffered chunks as their wire bytes, bounded by
``max_buffer_chunks`` (and ``max_repair_chunks`` while a gap is open).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bpstream.services.processor import repair
from bpstream.services.processor.state import (
    CLOCK_JUMP,
    FORMAT_CHANGE,
    GAP,
    GAP_FILLED,
    NS,
    STATE_VERSION,
    STREAM_RESET,
    WINDOW,
    WINDOW_ERROR,
    BufferedChunk,
    DeviceState,
    Hole,
    WindowCut,
    chunk_end_ns,
    cut_windows,
    decode_buffered,
    decode_state,
    encode_state,
    first_grid_end,
    remember_decoded,
)
from bpstream.shared.devicetime import TimeVerdict, check_device_time, check_seq_jump
from bpstream.shared.errors import DecodeError
from bpstream.shared.messages import QualityRecord, SignalChunk, Window, decode_chunk
from bpstream.shared.modelspec import HOP_SECONDS, MODEL_CHANNELS, MODEL_SAMPLE_RATE, WINDOW_SECONDS
from bpstream.shared.preprocessing import PreparedWindow, PreprocessError, RawWindow, preprocess_windows

__all__ = [
    "CLOCK_JUMP", "FORMAT_CHANGE", "GAP", "GAP_FILLED", "NS", "STATE_VERSION", "STREAM_RESET", "WINDOW",
    "WINDOW_ERROR", "BufferedChunk", "DeviceState", "Reassembler", "StageConfig", "StageOutput", "WindowCut",
    "decode_state", "encode_state",
]


#: Prepares many raw windows at once (``bpstream.shared.preprocessing.preprocess_windows``).
PrepareManyFn = Callable[[Sequence[RawWindow]], list[PreparedWindow | PreprocessError]]


@dataclass(frozen=True, slots=True)
class StageConfig:
    """Parameters of the stage (the service fills them from its settings and the model's metadata)."""

    window_ns: int = round(WINDOW_SECONDS * NS)
    hop_ns: int = round(HOP_SECONDS * NS)
    max_reorder_chunks: int = 8
    max_lateness_ns: int = 5 * NS
    clock_tolerance_ns: int = NS // 4
    #: Upper bound on buffered + pending chunks per device (memory bound; oldest dropped first).
    max_buffer_chunks: int = 64
    #: Refuse chunks dated more than this after / before their receipt time (None: no bound).
    max_ahead_ns: int | None = None
    max_behind_ns: int | None = None
    #: Refuse chunks whose seq jumps more than this past the next expected one without device time moving on.
    max_seq_jump: int | None = None
    #: Late chunks that fill a declared gap are still taken, and the windows they complete cut, for this much
    #: device time after the gap (0: a chunk arriving after its gap was declared is ignored). Bounded in memory
    #: by ``max_repair_chunks`` (``bpstream.services.processor.repair``).
    late_horizon_ns: int = 60 * NS
    max_repair_chunks: int = 128
    prepare_many: PrepareManyFn = field(default=preprocess_windows)
    #: Leave cut windows in ``StageOutput.cuts`` for the caller to prepare in one batch (``finish``), instead
    #: of preparing each as it is cut (preparing a stack of windows is several times cheaper per window).
    defer_preparation: bool = False


@dataclass(slots=True)
class StageOutput:
    """What one chunk produced."""

    windows: list[Window] = field(default_factory=list)
    quality: list[QualityRecord] = field(default_factory=list)
    #: Windows cut but not prepared (only with ``StageConfig.defer_preparation``; see ``Reassembler.finish``).
    cuts: list[WindowCut] = field(default_factory=list)
    duplicate: bool = False
    late: bool = False
    #: A late chunk that filled a declared gap (the windows it completed are in ``windows``/``cuts``).
    repaired: bool = False
    #: Why the chunk was refused (device time or seq out of bounds); the state is then unchanged.
    rejected: TimeVerdict | None = None


class Reassembler:
    """Applies one chunk to one device's state. Pure: same state and chunk in, same state and output out."""

    def __init__(self, config: StageConfig | None = None) -> None:
        self.config = config or StageConfig()
        self._window_s = self.config.window_ns / NS

    def process(
        self, state: DeviceState | None, chunk: SignalChunk, payload: bytes, *, received_ns: int, now_ns: int
    ) -> tuple[DeviceState, StageOutput]:
        """Apply ``chunk`` (whose wire bytes are ``payload``) to ``state`` (None for a new device).

        ``received_ns`` is when the chunk reached Kafka (the record timestamp), ``now_ns`` the wall clock,
        used only to stamp emitted messages.
        """
        state = state if state is not None else DeviceState()
        out = StageOutput()
        out.rejected = self._refuse(state, chunk, received_ns)
        if out.rejected is not None:
            return state, out
        state.clinic_id = chunk.clinic_id
        remember_decoded(payload, chunk)  # the window cuts use this decoded form instead of decoding again
        item = BufferedChunk(chunk.seq, chunk.t0_ns, chunk.n_samples, received_ns, payload)
        if state.next_seq is None:
            # A device seen for the first time: its first chunks may be reordered too, so they wait like any
            # out-of-order chunk and the run starts at the lowest seq once the reordering bound is reached.
            if any(p.seq == chunk.seq for p in state.pending):
                newest_end = max(chunk_end_ns(p, chunk.sample_rate) for p in state.pending)
                if chunk.t0_ns < newest_end - self.config.clock_tolerance_ns:
                    state.duplicates += 1
                    out.duplicate = True
                    return state, out
                # The same seq again, after everything waiting: the device restarted before its run began.
                out.quality.append(self._record(state, chunk.device_id, STREAM_RESET, chunk.t0_ns, chunk.t0_ns,
                                                chunk.seq, chunk.seq, now_ns, detail="seq went back"))
                state.pending = []
            bisect.insort(state.pending, item, key=lambda c: c.seq)
            if not self._waited_enough(state, state.pending[0].t0_ns, chunk.sample_rate):
                self._bound(state)
                return state, out
            head = state.pending[0]
            self._restart_run(state, chunk if head.seq == chunk.seq else decode_chunk(head.payload))
            state.next_seq = head.seq
        elif chunk.seq < state.next_seq:
            if self._seen(state, chunk.seq, chunk.t0_ns):
                state.duplicates += 1
                out.duplicate = True
                return state, out
            filled = repair.fill(state, chunk, item, tolerance_ns=self.config.clock_tolerance_ns)
            if filled is None:
                state.duplicates += 1
                out.duplicate = True
                return state, out
            if filled:
                # A chunk declared missing arrived after all: cut the windows it completes.
                out.repaired = True
                self._repair(state, chunk.device_id, out, now_ns)
                self._bound(state)
                return state, out
            if (
                state.expected_t0_ns is not None
                and chunk.t0_ns >= state.expected_t0_ns - self.config.clock_tolerance_ns
            ):
                # Older seq but newer device time: the device restarted its sequence numbers.
                out.quality.append(self._record(state, chunk.device_id, STREAM_RESET, chunk.t0_ns, chunk.t0_ns,
                                                chunk.seq, chunk.seq, now_ns, detail="seq went back"))
                self._restart_run(state, chunk)
                repair.clear(state)
                state.next_seq = chunk.seq
                state.pending = []
            elif self._went_back(state, chunk):
                # A sustained run of older seqs *and* older device time is a device that restarted with its
                # clock set back, not late data: start a new run there, with the window clock rewound.
                out.quality.append(self._record(state, chunk.device_id, STREAM_RESET, chunk.t0_ns, chunk.t0_ns,
                                                chunk.seq, chunk.seq, now_ns, detail="seq and device time went back"))
                self._restart_run(state, chunk)
                repair.clear(state)
                state.next_seq = chunk.seq
                state.pending = []
                state.last_window_end_ns = 0
            else:
                state.late += 1
                out.late = True
                return state, out
        elif chunk.seq > state.next_seq:
            if any(p.seq == chunk.seq for p in state.pending):
                state.duplicates += 1
                out.duplicate = True
                return state, out
            bisect.insort(state.pending, item, key=lambda c: c.seq)
        if chunk.seq == state.next_seq:
            self._accept(state, chunk.device_id, chunk, item, out, now_ns)
        while True:
            self._drain_pending(state, chunk.device_id, chunk, out, now_ns)
            if not self._maybe_declare_gap(state, chunk, out, now_ns):
                break
        if state.missed_ends:  # windows after a filled gap may also need the chunks that follow it
            self._repair(state, chunk.device_id, out, now_ns)
        self._emit_windows(state, chunk.device_id, out, now_ns)
        self._bound(state)
        return state, out

    def _refuse(self, state: DeviceState, chunk: SignalChunk, received_ns: int) -> TimeVerdict | None:
        """Why ``chunk`` may not touch the state (device time or seq out of bounds), or None."""
        cfg = self.config
        verdict = check_device_time(chunk.t0_ns, received_ns, max_ahead_ns=cfg.max_ahead_ns,
                                    max_behind_ns=cfg.max_behind_ns)
        if verdict is None and cfg.max_seq_jump is not None and state.next_seq is not None:
            verdict = check_seq_jump(chunk.seq, chunk.t0_ns, chunk.duration_ns, next_seq=state.next_seq,
                                     expected_t0_ns=state.expected_t0_ns, max_seq_jump=cfg.max_seq_jump)
        return verdict

    # -- ordering -------------------------------------------------------------------------------------------

    def _went_back(self, state: DeviceState, chunk: SignalChunk) -> bool:
        """Count a late chunk into the device's run of consecutive late chunks; True once that run (seq
        consecutive, device time continuous) is longer than the reordering bound. A chunk whose device time
        fits the live run's seq-to-time mapping is late data, never counted (however many arrive together)."""
        if state.expected_t0_ns is not None and state.next_seq is not None:
            predicted = state.expected_t0_ns - (state.next_seq - chunk.seq) * chunk.duration_ns
            if abs(chunk.t0_ns - predicted) <= self.config.max_lateness_ns:
                state.behind_run = 0
                return False
        if (state.behind_run and chunk.seq == state.behind_next_seq
                and abs(chunk.t0_ns - state.behind_t0_ns) <= self.config.clock_tolerance_ns):
            state.behind_run += 1
        else:
            state.behind_run = 1
        state.behind_next_seq, state.behind_t0_ns = chunk.seq + 1, chunk.t0_ns + chunk.duration_ns
        return state.behind_run > self.config.max_reorder_chunks

    @staticmethod
    def _seen(state: DeviceState, seq: int, t0_ns: int) -> bool:
        """A duplicate has the same seq *and* device time (after a restart a seq comes back with a new time)."""
        return any(c.seq == seq and c.t0_ns == t0_ns for c in state.buffer)

    def _maybe_declare_gap(
        self, state: DeviceState, chunk: SignalChunk, out: StageOutput, now_ns: int
    ) -> bool:
        """Give up waiting for the missing chunks when too many later ones wait or event time moved on."""
        if not state.pending or state.next_seq is None:
            return False
        if not self._waited_enough(state, state.expected_t0_ns, chunk.sample_rate):
            return False
        first = state.pending[0]
        missing = first.seq - state.next_seq
        start = state.expected_t0_ns if state.expected_t0_ns is not None else first.t0_ns
        state.gaps += 1
        state.missing_chunks += missing
        out.quality.append(self._record(state, chunk.device_id, GAP, start, first.t0_ns, state.next_seq,
                                        first.seq - 1, now_ns, missing=missing))
        cfg = self.config
        if first.t0_ns >= start - cfg.clock_tolerance_ns:
            repair.open_hole(state, Hole(state.next_seq, first.seq - 1, start, first.t0_ns), first.t0_ns,
                             window_ns=cfg.window_ns, hop_ns=cfg.hop_ns, horizon_ns=cfg.late_horizon_ns)
        else:  # device time went back across the gap: rewind the window clock (see ``_accept``)
            repair.clear(state)
            state.last_window_end_ns = 0
        state.next_seq = first.seq
        state.buffer = []
        state.expected_t0_ns = None  # the run restarts at the first waiting chunk
        return True

    def _waited_enough(self, state: DeviceState, since_ns: int | None, fs: float) -> bool:
        """Whether the chunks waiting exceed the reordering bound in count, or in device time ``since_ns``."""
        if len(state.pending) > self.config.max_reorder_chunks:
            return True
        if since_ns is None or not state.pending:
            return False
        newest = state.pending[-1]
        waited_ns = newest.t0_ns + round(newest.n_samples * NS / fs) - since_ns
        return waited_ns > self.config.max_lateness_ns

    def _drain_pending(
        self, state: DeviceState, device_id: str, chunk: SignalChunk, out: StageOutput, now_ns: int
    ) -> None:
        while state.pending and state.pending[0].seq <= (state.next_seq or 0):
            item = state.pending.pop(0)
            if item.seq < (state.next_seq or 0):
                continue
            try:
                pending_chunk = chunk if item.seq == chunk.seq else decode_buffered(item.payload)
            except DecodeError:  # pragma: no cover - payloads were decoded once already
                state.next_seq = item.seq + 1
                continue
            self._accept(state, device_id, pending_chunk, item, out, now_ns)

    # -- runs -----------------------------------------------------------------------------------------------

    @staticmethod
    def _restart_run(state: DeviceState, chunk: SignalChunk) -> None:
        state.sample_rate = chunk.sample_rate
        state.channels = chunk.channels
        state.buffer = []
        state.expected_t0_ns = None

    def _accept(
        self,
        state: DeviceState,
        device_id: str,
        chunk: SignalChunk,
        item: BufferedChunk,
        out: StageOutput,
        now_ns: int,
    ) -> None:
        """Append the in-order chunk to the run, restarting the run on a format change or clock jump."""
        if chunk.sample_rate != state.sample_rate or chunk.channels != state.channels:
            if state.buffer:
                detail = (f"{state.sample_rate:g} Hz {'+'.join(state.channels)} -> "
                          f"{chunk.sample_rate:g} Hz {'+'.join(chunk.channels)}")
                out.quality.append(self._record(state, device_id, FORMAT_CHANGE, chunk.t0_ns, chunk.t0_ns,
                                                chunk.seq, chunk.seq, now_ns, detail=detail))
            self._restart_run(state, chunk)
            repair.clear(state)
        elif (
            state.expected_t0_ns is not None
            and abs(chunk.t0_ns - state.expected_t0_ns) > self.config.clock_tolerance_ns
        ):
            state.clock_jumps += 1
            moved = f"device time moved {(chunk.t0_ns - state.expected_t0_ns) / 1e6:+.1f} ms vs seq"
            out.quality.append(self._record(state, device_id, CLOCK_JUMP, state.expected_t0_ns, chunk.t0_ns,
                                            chunk.seq, chunk.seq, now_ns, detail=moved))
            if chunk.t0_ns < state.expected_t0_ns:
                # The clock went back: rewind the window clock, or the device would get no window until its
                # time passes the last one (forever, if it went back far). Windows of the new run start a
                # window after its first chunk, so only a jump back of more than a window re-uses identities.
                state.last_window_end_ns = 0
            self._restart_run(state, chunk)
            repair.clear(state)
        state.buffer.append(item)
        state.next_seq = chunk.seq + 1
        state.expected_t0_ns = chunk.t0_ns + chunk.duration_ns
        state.behind_run = 0
        repair.keep_accepted(state, item)

    def _bound(self, state: DeviceState) -> None:
        """Trim what no future window needs, and cap the state's size."""
        if state.buffer:
            fs = state.sample_rate
            # Every window ending inside the run has been cut, so the next one ends after the run's end;
            # one hop of margin absorbs device clock drift.
            next_start = chunk_end_ns(state.buffer[-1], fs) - self.config.window_ns - self.config.hop_ns
            keep = 0
            while keep < len(state.buffer) - 1 and chunk_end_ns(state.buffer[keep], fs) <= next_start:
                keep += 1
            if keep:
                del state.buffer[:keep]
        cfg = self.config
        repair.trim(state, window_ns=cfg.window_ns, hop_ns=cfg.hop_ns, horizon_ns=cfg.late_horizon_ns,
                    max_chunks=cfg.max_repair_chunks)
        excess = len(state.buffer) + len(state.pending) - self.config.max_buffer_chunks
        if excess > 0:
            del state.buffer[: min(excess, len(state.buffer))]
            excess = len(state.buffer) + len(state.pending) - self.config.max_buffer_chunks
            if excess > 0:
                del state.pending[-excess:]

    # -- windows --------------------------------------------------------------------------------------------

    def _emit_windows(self, state: DeviceState, device_id: str, out: StageOutput, now_ns: int) -> None:
        if not state.buffer:
            return
        fs = state.sample_rate
        hop, win = self.config.hop_ns, self.config.window_ns
        run_end = chunk_end_ns(state.buffer[-1], fs)
        end = max(first_grid_end(state.buffer[0].t0_ns, win, hop), state.last_window_end_ns + hop)
        if end > run_end:
            return
        cuts = cut_windows(state.buffer, range(end, run_end + 1, hop), clinic_id=state.clinic_id,
                           device_id=device_id, window_ns=win, fs=fs, channels=state.channels)
        if cuts:
            state.last_window_end_ns = cuts[-1].end_ns
            state.windows += len(cuts)
            self._deliver(cuts, out, now_ns)

    def _deliver(self, cuts: list[WindowCut], out: StageOutput, now_ns: int) -> None:
        if self.config.defer_preparation:
            out.cuts.extend(cuts)
            return
        windows, quality = self.finish(cuts, now_ns)
        out.windows.extend(windows)
        out.quality.extend(quality)

    def _repair(self, state: DeviceState, device_id: str, out: StageOutput, now_ns: int) -> None:
        """After a late chunk filled a hole: cut the windows it completed, record the holes now whole."""
        cfg = self.config
        for hole in repair.filled_holes(state):
            out.quality.append(self._record(state, device_id, GAP_FILLED, hole.start_ns, hole.end_ns,
                                            hole.seq_first, hole.seq_last, now_ns,
                                            missing=hole.seq_last - hole.seq_first + 1,
                                            detail="every missing chunk arrived late"))
        cuts = repair.recut(state, device_id, window_ns=cfg.window_ns, tolerance_ns=cfg.clock_tolerance_ns)
        if cuts:
            self._deliver(cuts, out, now_ns)

    def finish(self, cuts: Sequence[WindowCut], now_ns: int) -> tuple[list[Window], list[QualityRecord]]:
        """Prepare cut windows in one batch: the model-ready windows, and a quality record for every cut (its
        SQI, or a ``window_error`` record for a window preprocessing refused)."""
        prepared = self.config.prepare_many([(c.samples, c.channels, c.sample_rate) for c in cuts])
        windows: list[Window] = []
        quality: list[QualityRecord] = []
        for cut, result in zip(cuts, prepared, strict=True):
            if isinstance(result, PreprocessError):
                quality.append(cut.error(f"{result.reason}: {result}", now_ns))
                continue
            ids: dict[str, Any] = dict(clinic_id=cut.clinic_id, device_id=cut.device_id, start_ns=cut.start_ns,
                                       end_ns=cut.end_ns,
                                       seq_first=cut.seq_first, seq_last=cut.seq_last, sqi=dict(result.sqi),
                                       quality_ok=result.quality_ok, heart_rate_bpm=result.heart_rate_bpm,
                                       emitted_ns=now_ns)
            windows.append(Window(**ids, sample_rate=MODEL_SAMPLE_RATE, channels=MODEL_CHANNELS,
                                  n_samples=int(result.samples.shape[1]),
                                  samples=np.ascontiguousarray(result.samples, dtype="<f4").tobytes(),
                                  gap_fraction=0.0, received_ns=cut.received_ns))
            quality.append(QualityRecord(**ids, kind=WINDOW, inputs=result.inputs,
                                         problems=result.problems))
        return windows, quality

    @staticmethod
    def _record(state: DeviceState, device_id: str, kind: str, start: int, end: int, seq_first: int,
                seq_last: int, now_ns: int, *, missing: int = 0, detail: str = "") -> QualityRecord:
        return QualityRecord(kind=kind, clinic_id=state.clinic_id, device_id=device_id, start_ns=start,
                             end_ns=end, seq_first=seq_first, seq_last=seq_last, missing_chunks=missing,
                             quality_ok=False, detail=detail, emitted_ns=now_ns)
