"""Late-data repair: chunks that arrive after their gap was declared still complete their windows (pure).

A gap is declared quickly (``max_reorder_chunks`` / ``max_lateness_ns``) so that windows after it are not held
up. But a missing chunk may still come: after a Mosquitto crash, gateways resend what the restarted broker
acknowledged with 0x10 ("no matching subscribers") only once the bridges are back, 10-60 s late. So when a
gap is declared, the stage keeps, for at most ``late_horizon_ns`` of device time:

* the *hole*: the missing seq range and the device time it should cover;
* the *missed ends*: the window ends on the hop grid that the hole prevented (only those; windows already
  emitted are never re-cut);
* the *repair store*: the chunks around the hole that those windows need (the run before it, the run after
  it up to the last missed end, and the late chunks that fill it), capped at ``max_repair_chunks``.

A late chunk is taken only if it fills a hole: its seq is in the hole's range and its device time within the
hole's span. Anything else stays "late" and is ignored, so past-dated chunks cannot grow the state or move a
clock. Whenever a chunk fills a hole, every missed end whose window is now covered by contiguous chunks (seq
consecutive, device time continuous, one format) is cut with the same arithmetic as in-order windows
(:func:`~bpstream.services.processor.state.cut_windows`): same identity ``(device, end_ns)``, same chunks,
same samples. A missed end is cut at most once and then forgotten; a replay after a restart repeats the same
cut (identical window, which sinks overwrite). Ends older than the horizon (behind the device's newest time)
are given up, and with them the chunks only they needed. With no gap open the repair state is empty, so the
steady-state device state (and the changelog) does not grow.
"""

from __future__ import annotations

import bisect

from bpstream.services.processor.state import (
    BufferedChunk,
    DeviceState,
    Hole,
    WindowCut,
    chunk_end_ns,
    cut_windows,
    decode_buffered,
    first_grid_end,
)
from bpstream.shared.messages import SignalChunk

#: At most this many open holes per device (the oldest are given up first).
MAX_HOLES = 32


def _add(store: list[BufferedChunk], item: BufferedChunk) -> bool:
    """Insert ``item`` in seq order unless a chunk with its seq is there; True if inserted."""
    at = bisect.bisect_left(store, item.seq, key=lambda c: c.seq)
    if at < len(store) and store[at].seq == item.seq:
        return False
    store.insert(at, item)
    return True


def open_hole(state: DeviceState, hole: Hole, next_run_start_ns: int, *, window_ns: int, hop_ns: int,
              horizon_ns: int) -> None:
    """Record a declared gap as fillable; call before the run before it is discarded.

    The missed ends are the grid ends after the last window emitted and before the next run's first window
    (the next run starts at ``next_run_start_ns``), no further back than the horizon.
    """
    if horizon_ns <= 0:
        return
    for item in state.buffer:
        _add(state.repair, item)
    earliest = state.repair[0].t0_ns if state.repair else hole.start_ns
    stop = first_grid_end(next_run_start_ns, window_ns, hop_ns)
    start = max(state.last_window_end_ns + hop_ns, first_grid_end(earliest, window_ns, hop_ns),
                -(-(stop - horizon_ns) // hop_ns) * hop_ns)
    missed = set(state.missed_ends)
    missed.update(range(start, stop, hop_ns))
    state.missed_ends = sorted(missed)
    if state.missed_ends:
        state.holes.append(hole)
        del state.holes[:-MAX_HOLES]


def keep_accepted(state: DeviceState, item: BufferedChunk) -> None:
    """Keep an in-order chunk in the repair store if a missed window may need it."""
    if state.missed_ends and item.t0_ns < state.missed_ends[-1]:
        _add(state.repair, item)


def fill(state: DeviceState, chunk: SignalChunk, item: BufferedChunk, *, tolerance_ns: int) -> bool | None:
    """Take a late chunk that fills an open hole: True; a repeat of one already taken: None; else False."""
    for hole in state.holes:
        if not hole.seq_first <= chunk.seq <= hole.seq_last:
            continue
        if not hole.start_ns - tolerance_ns <= chunk.t0_ns <= hole.end_ns + tolerance_ns - chunk.duration_ns:
            continue
        if _add(state.repair, item):
            state.repaired_chunks += 1
            hole.filled += 1
            return True
        at = bisect.bisect_left(state.repair, chunk.seq, key=lambda c: c.seq)
        return None if state.repair[at].t0_ns == chunk.t0_ns else False
    return False


def filled_holes(state: DeviceState) -> list[Hole]:
    """Remove and return the holes whose every missing chunk arrived."""
    done = [h for h in state.holes if h.filled > h.seq_last - h.seq_first]
    if done:
        state.holes = [h for h in state.holes if h not in done]
    return done


def _segments(store: list[BufferedChunk], tolerance_ns: int) -> list[list[BufferedChunk]]:
    """Split the store into runs of consecutive seq, continuous device time and one format."""
    runs: list[list[BufferedChunk]] = []
    previous = None
    for item in store:
        chunk = decode_buffered(item.payload)
        if (previous is not None and item.seq == previous[0].seq + 1
                and abs(item.t0_ns - previous[1]) <= tolerance_ns
                and (chunk.sample_rate, chunk.channels) == previous[2]):
            runs[-1].append(item)
        else:
            runs.append([item])
        previous = (item, chunk_end_ns(item, chunk.sample_rate), (chunk.sample_rate, chunk.channels))
    return runs


def recut(state: DeviceState, device_id: str, *, window_ns: int, tolerance_ns: int) -> list[WindowCut]:
    """Cut every missed window that contiguous chunks in the repair store now cover (each once)."""
    if not state.missed_ends or not state.repair:
        return []
    cuts: list[WindowCut] = []
    for run in _segments(state.repair, tolerance_ns):
        fmt = decode_buffered(run[0].payload)
        run_start, run_end = run[0].t0_ns, chunk_end_ns(run[-1], fmt.sample_rate)
        ends = [e for e in state.missed_ends if e - window_ns >= run_start and e <= run_end]
        cuts.extend(cut_windows(run, ends, clinic_id=state.clinic_id, device_id=device_id, window_ns=window_ns,
                                fs=fmt.sample_rate, channels=fmt.channels))
    if cuts:
        done = {c.end_ns for c in cuts}
        state.missed_ends = [e for e in state.missed_ends if e not in done]
        state.repaired_windows += len(cuts)
        state.windows += len(cuts)
    return cuts


def trim(state: DeviceState, *, window_ns: int, hop_ns: int, horizon_ns: int, max_chunks: int) -> None:
    """Give up missed ends older than the horizon, and drop what no remaining missed end needs."""
    newest = state.expected_t0_ns
    if newest is not None:
        state.missed_ends = [e for e in state.missed_ends if newest - e <= horizon_ns]
    if not state.missed_ends:
        clear(state)
        return
    low, high = state.missed_ends[0] - window_ns - hop_ns, state.missed_ends[-1] + hop_ns
    state.repair = [c for c in state.repair
                    if c.t0_ns < high and chunk_end_ns(c, decode_buffered(c.payload).sample_rate) > low]
    state.holes = [h for h in state.holes if h.end_ns > low and h.start_ns < high]
    excess = len(state.repair) - max_chunks
    if excess > 0:
        del state.repair[:excess]


def clear(state: DeviceState) -> None:
    """Forget every open hole (the device's run restarted in another time frame or format)."""
    if state.holes or state.missed_ends or state.repair:
        state.holes, state.missed_ends, state.repair = [], [], []
