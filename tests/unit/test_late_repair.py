"""Late chunks after a declared gap (issue 14: gateways resend what a restarted Mosquitto acknowledged with
0x10), and device clocks that go back: the stage still produces every window, each once, with the identity and
samples an in-order stream gives, and stays bounded whatever a device sends."""

from __future__ import annotations

import pytest
from test_processor_stage import HOP, T0, WIN, identity, records_of, run, simulated_payloads, windows_of

from bpstream.services.processor.stage import (
    GAP,
    GAP_FILLED,
    NS,
    STREAM_RESET,
    Reassembler,
    StageConfig,
    decode_state,
    encode_state,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def clean() -> list[bytes]:
    return simulated_payloads(80)


def _mosquitto_order(clean: list[bytes], lost: range, ahead: int = 2) -> list[bytes]:
    """What reached Kafka after the broker restart: ``ahead`` newer chunks, then the resent ones, then on."""
    after = lost.stop
    return (clean[: lost.start] + clean[after : after + ahead] + [clean[s] for s in lost]
            + clean[after + ahead :])


@pytest.mark.parametrize("roundtrip", [False, True])
def test_chunks_resent_after_their_gap_give_every_window_once_and_identical(clean: list[bytes],
                                                                             roundtrip: bool) -> None:
    """The order measured in test_broker_faults: seq 30-41 arrive after 42 and 43, 13 s of device time late
    (beyond the 5 s reorder bound, so the gap is declared at once)."""
    _, reference = run(clean)
    state, outputs = run(_mosquitto_order(clean, range(30, 42)), roundtrip=roundtrip)
    got = identity(windows_of(outputs))
    assert sorted(got) == identity(windows_of(reference)), "not the in-order stream's windows"
    assert len(got) == len(set(got))
    assert len(records_of(outputs, GAP)) == 1
    filled = records_of(outputs, GAP_FILLED)
    assert [(f.seq_first, f.seq_last) for f in filled] == [(30, 41)]  # type: ignore[attr-defined]
    assert sum(o.repaired for o in outputs) == 12 and not any(o.late for o in outputs)
    # Once repaired, nothing of the repair is kept.
    assert state is not None and not state.holes and not state.missed_ends and not state.repair


def test_a_partly_filled_gap_cuts_only_the_windows_it_completes(clean: list[bytes]) -> None:
    _, reference = run(clean)
    stream = _mosquitto_order(clean, range(30, 42))
    stream.remove(clean[36])  # never comes
    _, outputs = run(stream)
    got = {w[1] for w in identity(windows_of(outputs))}
    hole = (T0 + 36 * NS, T0 + 37 * NS)
    expected = {w.end_ns for w in windows_of(reference) if w.end_ns <= hole[0] or w.start_ns >= hole[1]}
    assert got == expected
    assert not records_of(outputs, GAP_FILLED)


def test_a_duplicate_of_a_late_chunk_is_a_duplicate(clean: list[bytes]) -> None:
    stream = _mosquitto_order(clean, range(30, 42))
    stream.insert(stream.index(clean[35]) + 1, clean[35])
    state, outputs = run(stream)
    assert state is not None and state.duplicates == 1
    ends = [w.end_ns for w in windows_of(outputs)]
    assert len(ends) == len(set(ends))


def test_late_chunks_beyond_the_horizon_are_ignored_and_the_repair_state_is_dropped(clean: list[bytes]) -> None:
    stage = Reassembler(StageConfig(late_horizon_ns=10 * NS))
    # The resent chunks come 25 s of device time after the gap: past the 10 s horizon.
    stream = clean[:30] + clean[42:67] + [clean[s] for s in range(30, 42)] + clean[67:]
    state, outputs = run(stream, reassembler=stage)
    assert not any(o.repaired for o in outputs)
    assert sum(o.late for o in outputs) == 12
    assert state is not None and not state.repair and not state.holes and not state.missed_ends


def test_a_past_dated_chunk_with_a_missing_seq_cannot_fill_the_gap(clean: list[bytes]) -> None:
    """Only a chunk whose device time lies in the hole is taken: a forged seq 35 dated an hour back is late."""
    forged = simulated_payloads(1, t0_ns=T0 - 3600 * NS, seq0=35, seed=9)[0]
    stream = clean[:30] + clean[42:45] + [forged] + clean[45:]
    state, outputs = run(stream)
    assert outputs[33].late and not outputs[33].repaired
    assert state is not None and state.repaired_chunks == 0


def test_repair_state_is_bounded_and_empty_once_the_horizon_passed() -> None:
    payloads = simulated_payloads(200)
    # Every 10th chunk lost for good: a hole every 10 s, never filled.
    stream = [p for k, p in enumerate(payloads) if k % 10 != 5]
    stage = Reassembler(StageConfig(late_horizon_ns=30 * NS, max_repair_chunks=24))
    state = None
    for k, payload in enumerate(stream):
        state, _ = run([payload], reassembler=stage, state=state)
        assert state is not None and len(state.repair) <= 24 and len(state.missed_ends) <= (30 + 8 + 2) // 2 + 1, k
    # The same stream without holes later: the repair state empties and the state is as small as before.
    later = simulated_payloads(40, t0_ns=T0 + 200 * NS, seq0=200, seed=5)
    state, _ = run(later, reassembler=stage, state=state)
    assert state is not None and not state.repair and not state.holes and not state.missed_ends
    assert len(encode_state(state)) < 16_000


def test_device_clock_going_back_in_order_does_not_block_its_windows() -> None:
    """Seq continues, device time jumps back an hour and stays: windows come in the new time frame."""
    before = simulated_payloads(30)
    back = T0 - 3600 * NS
    after = simulated_payloads(30, seq0=30, t0_ns=back, seed=4)
    _, outputs = run(before + after)
    new = [w.end_ns for w in windows_of(outputs) if w.start_ns >= back and w.end_ns < T0]
    assert new == list(range(-(-(back + WIN) // HOP) * HOP, back + 30 * NS + 1, HOP))


def test_device_rebooted_with_seq_and_clock_back_gets_windows_again() -> None:
    """Seq back to 0 and device time back a day: not late data for ever, a new run after the reorder bound."""
    before = simulated_payloads(30, seq0=500)
    back = T0 - 86400 * NS
    after = simulated_payloads(40, seq0=0, t0_ns=back, seed=4)
    stage = Reassembler(StageConfig(max_reorder_chunks=8))
    state, outputs = run(before + after, reassembler=stage)
    assert len(records_of(outputs, STREAM_RESET)) == 1
    new = [w.end_ns for w in windows_of(outputs) if w.start_ns >= back and w.end_ns < T0]
    assert new and new[-1] == back + 40 * NS - (back + 40 * NS) % HOP
    assert len(new) >= (40 - 9 - 8) // 2
    assert state is not None and decode_state(encode_state(state)) == state


def test_a_burst_of_late_chunks_that_fits_the_run_never_resets_it(clean: list[bytes]) -> None:
    """Twelve consecutive late chunks of the live run (no gap open to fill: horizon 0) stay late data."""
    stage = Reassembler(StageConfig(late_horizon_ns=0))
    _, outputs = run(_mosquitto_order(clean, range(30, 42)), reassembler=stage)
    assert not records_of(outputs, STREAM_RESET)
    assert sum(o.late for o in outputs) == 12
