"""Bounds on what a device may claim about time and sequence (pure; used by the bridge and the processor).

Event time comes from the device, and windows only move forward per device, so one chunk dated in the future
(or with a huge sequence number) would make every later, honest chunk "late": one message could silence a
patient. A chunk is therefore checked against the time it was received (the bridge's clock, or the Kafka
record timestamp the bridge's producer set) before it may move any clock:

* ``device_time_ahead``: its first-sample time is more than ``max_ahead_ns`` after the receipt time;
* ``device_time_behind``: it is more than ``max_behind_ns`` before the receipt time (off unless set: devices
  on poor links legitimately send old data, and an old chunk cannot freeze a window clock);
* ``seq_jump`` (processor only, where the device's previous chunk is known): its ``seq`` is more than
  ``max_seq_jump`` ahead of the next expected one *and* its device time did not move on by as many chunks
  (a device that really lost chunks moves on in time too, which the time bound already limits).

Refused chunks are dead-lettered with the reason and counted (``bpstream_bridge_rejected_total``,
``bpstream_processor_dead_letters_total``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DEVICE_TIME_AHEAD: Final = "device_time_ahead"
DEVICE_TIME_BEHIND: Final = "device_time_behind"
SEQ_JUMP: Final = "seq_jump"


@dataclass(frozen=True, slots=True)
class TimeVerdict:
    """Why a chunk's device time or sequence number is refused."""

    reason: str
    detail: str


def check_device_time(t0_ns: int, received_ns: int, *, max_ahead_ns: int | None,
                      max_behind_ns: int | None = None) -> TimeVerdict | None:
    """``None`` if ``t0_ns`` lies within the bounds around ``received_ns``, else why not."""
    if max_ahead_ns is not None and t0_ns - received_ns > max_ahead_ns:
        return TimeVerdict(DEVICE_TIME_AHEAD, f"device time is {(t0_ns - received_ns) / 1e9:.0f} s ahead of "
                                              f"its receipt (limit {max_ahead_ns / 1e9:g} s)")
    if max_behind_ns is not None and received_ns - t0_ns > max_behind_ns:
        return TimeVerdict(DEVICE_TIME_BEHIND, f"device time is {(received_ns - t0_ns) / 1e9:.0f} s behind "
                                               f"its receipt (limit {max_behind_ns / 1e9:g} s)")
    return None


def check_seq_jump(seq: int, t0_ns: int, duration_ns: int, *, next_seq: int, expected_t0_ns: int | None,
                   max_seq_jump: int) -> TimeVerdict | None:
    """``None`` unless ``seq`` jumps more than ``max_seq_jump`` past ``next_seq`` without device time moving
    on accordingly (at least ``jump - max_seq_jump`` chunk durations past where the next chunk should start)."""
    jump = seq - next_seq
    if jump <= max_seq_jump:
        return None
    if expected_t0_ns is not None and duration_ns > 0 and t0_ns - expected_t0_ns >= (jump - max_seq_jump) * duration_ns:
        return None
    return TimeVerdict(SEQ_JUMP, f"seq jumped {jump} past the next expected one (limit {max_seq_jump}) "
                                 "without device time moving on")
