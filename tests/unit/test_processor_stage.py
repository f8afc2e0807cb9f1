"""The processor's pure stage: reassembly by seq in device time, duplicates, reordering, gaps, clock jumps,
format changes, windows on the hop grid, and state that survives being serialised (as the changelog does)."""

from __future__ import annotations

import random
from collections.abc import Iterable

import numpy as np
import pytest

from bpstream.services.processor.stage import (
    CLOCK_JUMP,
    FORMAT_CHANGE,
    GAP,
    NS,
    STREAM_RESET,
    WINDOW,
    DeviceState,
    Reassembler,
    StageConfig,
    StageOutput,
    decode_state,
    encode_state,
)
from bpstream.shared.errors import DecodeError
from bpstream.shared.messages import SignalChunk, Window, decode_chunk, decode_window, encode_chunk, encode_window
from bpstream.shared.modelspec import MODEL_CHANNELS, WINDOW_SAMPLES
from bpstream.simulators.cohort import build_cohort

# A device clock that is not on the 2 s grid, so window boundaries are visibly aligned by the stage.
T0 = 1_700_000_000 * NS + 300_000_000
HOP = 2 * NS
WIN = 8 * NS


def simulated_payloads(seconds: int, *, fs: float = 125.0, t0_ns: int = T0, seq0: int = 0, seed: int = 3,
                       device: str = "dev-1") -> list[bytes]:
    """One-second chunks of a normotensive simulated patient, encoded as a wearable sends them."""
    engine = build_cohort("normotensive", 1, seed, float(seconds + 5), sample_rate=fs).engine
    payloads = []
    for k in range(seconds):
        block = engine.step(1.0)
        samples = np.stack([block.ecg[0], block.ppg[0]]).astype(np.float32)
        payloads.append(encode_chunk(SignalChunk("clinic-1", device, seq0 + k, t0_ns + k * NS, fs, ("ecg", "ppg"),
                                                 samples)))
    return payloads


def run(payloads: Iterable[bytes], *, reassembler: Reassembler | None = None, state: DeviceState | None = None,
        roundtrip: bool = False) -> tuple[DeviceState | None, list[StageOutput]]:
    stage = reassembler or Reassembler()
    outputs = []
    for i, payload in enumerate(payloads):
        chunk = decode_chunk(payload)
        state, out = stage.process(state, chunk, payload, received_ns=10**18 + i, now_ns=2 * 10**18)
        if roundtrip:
            state = decode_state(encode_state(state))
        outputs.append(out)
    return state, outputs


def windows_of(outputs: list[StageOutput]) -> list[Window]:
    return [w for out in outputs for w in out.windows]


def records_of(outputs: list[StageOutput], kind: str) -> list[object]:
    return [q for out in outputs for q in out.quality if q.kind == kind]


def identity(windows: list[Window]) -> list[tuple[str, int, int, int, bytes]]:
    return [(w.device_id, w.end_ns, w.seq_first, w.seq_last, w.samples) for w in windows]


@pytest.fixture(scope="module")
def clean() -> list[bytes]:
    return simulated_payloads(40)


def test_clean_stream_emits_a_window_every_hop_on_the_device_time_grid(clean: list[bytes]) -> None:
    _, outputs = run(clean)
    windows = windows_of(outputs)
    ends = [w.end_ns for w in windows]
    # The first grid point with 8 s of data behind it: run starts at T0 (x.3 s), grid is even seconds.
    first_end = -(-(T0 + WIN) // HOP) * HOP
    assert ends == list(range(first_end, T0 + 40 * NS + 1, HOP))
    for w in windows:
        assert w.start_ns == w.end_ns - WIN
        assert w.end_ns % HOP == 0
        assert w.channels == MODEL_CHANNELS and w.sample_rate == 125.0 and w.n_samples == WINDOW_SAMPLES
        assert w.array().shape == (2, WINDOW_SAMPLES) and np.isfinite(w.array()).all()
        # seq range = the chunks that hold the window's first and last sample.
        assert w.seq_first == (w.start_ns - T0) // NS and w.seq_last == (w.end_ns - 1 - T0) // NS
        assert w.quality_ok, w.sqi
        assert w.gap_fraction == 0.0
        assert decode_window(encode_window(w)) == w
    quality = records_of(outputs, WINDOW)
    assert [q.end_ns for q in quality] == ends
    assert not records_of(outputs, GAP)


def test_window_holds_exactly_the_samples_of_its_device_time_span(clean: list[bytes]) -> None:
    captured: list[tuple[np.ndarray, tuple[str, ...], float]] = []

    def capture(windows: list[tuple[np.ndarray, tuple[str, ...], float]]) -> object:
        from bpstream.shared.preprocessing import preprocess_windows

        captured.extend((np.array(samples), tuple(channels), fs) for samples, channels, fs in windows)
        return preprocess_windows(windows)

    _, outputs = run(clean, reassembler=Reassembler(StageConfig(prepare_many=capture)))  # type: ignore[arg-type]
    windows = windows_of(outputs)
    raw = np.concatenate([decode_chunk(p).samples for p in clean], axis=1)
    for w, (samples, channels, fs) in zip(windows, captured, strict=True):
        start = -(-(w.start_ns - T0) * 125 // NS)  # first sample at or after the window start
        assert channels == ("ecg", "ppg") and fs == 125.0
        np.testing.assert_array_equal(samples, raw[:, start : start + 1000])


def test_duplicates_and_bounded_reordering_give_the_same_windows_as_the_clean_stream(clean: list[bytes]) -> None:
    _, reference = run(clean)
    rng = random.Random(7)
    messy = list(clean)
    # Swap neighbours within a distance of 3 chunks (even the first ones) and resend 8 chunks up to 6 later.
    for i in range(0, len(messy) - 3, 4):
        j = i + rng.randint(1, 3)
        messy[i], messy[j] = messy[j], messy[i]
    for _ in range(8):
        original = messy.index(clean[rng.randrange(len(clean))])
        messy.insert(min(len(messy), original + rng.randint(1, 6)), messy[original])
    state, outputs = run(messy)
    assert identity(windows_of(outputs)) == identity(windows_of(reference))
    assert not records_of(outputs, GAP)
    assert state is not None and state.duplicates + state.late == 8
    assert sum(o.duplicate or o.late for o in outputs) == 8


def test_missing_chunk_becomes_one_gap_record_and_no_window_spans_it(clean: list[bytes]) -> None:
    lost = 20
    stream = clean[:lost] + clean[lost + 1 :]
    state, outputs = run(stream)
    gaps = records_of(outputs, GAP)
    assert len(gaps) == 1
    gap = gaps[0]
    assert (gap.seq_first, gap.seq_last, gap.missing_chunks) == (lost, lost, 1)  # type: ignore[attr-defined]
    assert gap.start_ns == T0 + lost * NS and gap.end_ns == T0 + (lost + 1) * NS  # type: ignore[attr-defined]
    assert state is not None and state.gaps == 1 and state.missing_chunks == 1
    windows = windows_of(outputs)
    hole = (T0 + lost * NS, T0 + (lost + 1) * NS)
    assert all(w.end_ns <= hole[0] or w.start_ns >= hole[1] for w in windows)
    # Windows resume once 8 s of contiguous data follow the gap, still on the grid.
    after = [w.end_ns for w in windows if w.start_ns >= hole[1]]
    assert after and after[0] == -(-(hole[1] + WIN) // HOP) * HOP
    assert after == list(range(after[0], T0 + 40 * NS + 1, HOP))


def test_gap_waits_for_lateness_then_a_chunk_arriving_after_it_is_ignored(clean: list[bytes]) -> None:
    # Without a late horizon (test_late_repair.py covers the default, which still takes it).
    config = StageConfig(max_reorder_chunks=8, max_lateness_ns=3 * NS, late_horizon_ns=0)
    stage = Reassembler(config)
    lost = 10
    # Chunk 10 arrives after 11..14: by then event time moved more than 3 s past where it should have started.
    stream = clean[:lost] + clean[lost + 1 : lost + 5] + [clean[lost]] + clean[lost + 5 :]
    state, outputs = run(stream, reassembler=stage)
    assert len(records_of(outputs, GAP)) == 1
    assert outputs[lost + 4].late and state is not None and state.late == 1
    # The same chunk within the lateness bound is reordered, not lost.
    stream = clean[:lost] + clean[lost + 1 : lost + 3] + [clean[lost]] + clean[lost + 3 :]
    _, outputs = run(stream, reassembler=stage)
    assert not records_of(outputs, GAP)
    assert identity(windows_of(outputs)) == identity(windows_of(run(clean)[1]))


def test_too_many_chunks_waiting_declares_the_gap_even_within_lateness(clean: list[bytes]) -> None:
    stage = Reassembler(StageConfig(max_reorder_chunks=2, max_lateness_ns=60 * NS))
    state, outputs = run(clean[:5] + clean[6:], reassembler=stage)
    gaps = records_of(outputs, GAP)
    assert len(gaps) == 1 and gaps[0].seq_first == 5  # type: ignore[attr-defined]
    assert state is not None and not state.pending


def test_clock_jump_restarts_the_run_and_is_recorded() -> None:
    before = simulated_payloads(20)
    # Seq continues but the device clock jumps forward by 1 h (e.g. an NTP correction).
    after = simulated_payloads(20, seq0=20, t0_ns=T0 + 3600 * NS + 20 * NS, seed=4)
    state, outputs = run(before + after)
    jumps = records_of(outputs, CLOCK_JUMP)
    assert len(jumps) == 1 and jumps[0].seq_first == 20  # type: ignore[attr-defined]
    windows = windows_of(outputs)
    new_base = T0 + 3600 * NS + 20 * NS
    assert all(w.end_ns <= T0 + 20 * NS or w.start_ns >= new_base for w in windows)
    assert any(w.start_ns >= new_base for w in windows)
    assert state is not None and state.clock_jumps == 1


def test_small_clock_jitter_is_tolerated(clean: list[bytes]) -> None:
    jittered = []
    rng = random.Random(1)
    for payload in clean:
        c = decode_chunk(payload)
        jitter = rng.randint(-20, 20) * 1_000_000  # +/- 20 ms, well inside the 250 ms tolerance
        jittered.append(encode_chunk(SignalChunk(c.clinic_id, c.device_id, c.seq, c.t0_ns + jitter, c.sample_rate,
                                                 c.channels, c.samples)))
    _, outputs = run(jittered)
    assert not records_of(outputs, CLOCK_JUMP)
    assert [w.end_ns for w in windows_of(outputs)] == [w.end_ns for w in windows_of(run(clean)[1])]


def test_sample_rate_change_mid_stream_restarts_the_run_and_windows_stay_model_ready() -> None:
    first = simulated_payloads(20)
    second = simulated_payloads(20, fs=250.0, seq0=20, t0_ns=T0 + 20 * NS, seed=5)
    _, outputs = run(first + second)
    changes = records_of(outputs, FORMAT_CHANGE)
    assert len(changes) == 1 and "125 Hz" in changes[0].detail and "250 Hz" in changes[0].detail  # type: ignore[attr-defined]
    windows = windows_of(outputs)
    late = [w for w in windows if w.start_ns >= T0 + 20 * NS]
    assert late and all(w.n_samples == WINDOW_SAMPLES and w.sample_rate == 125.0 for w in late)
    assert all(w.end_ns <= T0 + 20 * NS or w.start_ns >= T0 + 20 * NS for w in windows)


def test_device_restarting_its_sequence_numbers_is_a_reset_not_late_data() -> None:
    first = simulated_payloads(20)
    rebooted = simulated_payloads(20, seq0=0, t0_ns=T0 + 30 * NS, seed=6)
    state, outputs = run(first + rebooted)
    assert len(records_of(outputs, STREAM_RESET)) == 1
    assert state is not None and state.late == 0
    assert any(w.start_ns >= T0 + 30 * NS for w in windows_of(outputs))


def test_state_survives_serialisation_and_a_replay_emits_nothing_twice(clean: list[bytes]) -> None:
    _, reference = run(clean)
    _, roundtripped = run(clean, roundtrip=True)
    assert identity(windows_of(roundtripped)) == identity(windows_of(reference))
    # A restart that resumes from the state after chunk 25 and replays chunks 20.. (at-least-once) emits the
    # windows after chunk 25 exactly once.
    state, first = run(clean[:26], roundtrip=True)
    state, second = run(clean[20:], state=decode_state(encode_state(state)))
    combined = windows_of(first) + windows_of(second)
    assert identity(combined) == identity(windows_of(reference))


def test_state_is_bounded_whatever_arrives() -> None:
    config = StageConfig(max_buffer_chunks=16, max_reorder_chunks=1000, max_lateness_ns=10**6 * NS)
    stage = Reassembler(config)
    payloads = simulated_payloads(60)
    # Chunk 0, then everything but chunk 1: nothing can be accepted in order, everything waits.
    state, _ = run([payloads[0], *payloads[2:]], reassembler=stage)
    assert state is not None and len(state.buffer) + len(state.pending) <= 16
    state, _ = run(payloads, reassembler=stage)
    assert state is not None and len(state.buffer) + len(state.pending) <= 16
    # With default settings a long clean stream keeps only about window + hop of chunks.
    state, _ = run(simulated_payloads(120))
    assert state is not None and len(state.buffer) <= 11 and not state.pending
    assert len(encode_state(state)) < 16_000


def test_undecodable_state_is_reported() -> None:
    with pytest.raises(DecodeError):
        decode_state(b"\x00garbage")
