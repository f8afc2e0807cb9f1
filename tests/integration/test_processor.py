"""The processor (Faust worker) against the real Kafka: windows every hop in device time, duplicates and
reordering changing nothing, gaps recorded, bad records dead-lettered without blocking, and a restart that
resumes from the changelog-backed state without losing a window.

The processor runs as a real process (``python -m bpstream.services.processor.main``), as it is deployed.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from bpstream.localservers import ServerEndpoints
from bpstream.shared.kafka import KafkaConsumer, KafkaProducer
from bpstream.shared.messages import QualityRecord, SignalChunk, decode_dead_letter, decode_window, encode_chunk
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import QUALITY, SIGNALS_DLQ, SIGNALS_RAW, WINDOWS, KafkaTopic, device_key, topic_name
from bpstream.simulators.cohort import build_cohort

NS = 1_000_000_000
HOP, WIN = 2 * NS, 8 * NS
T0 = 1_700_000_000 * NS + 300_000_000  # not on the 2 s grid: the processor aligns windows itself


def simulated_samples(seconds: int, seed: int) -> list[np.ndarray]:
    engine = build_cohort("normotensive", 1, seed, float(seconds + 5)).engine
    blocks = [engine.step(1.0) for _ in range(seconds)]
    return [np.stack([b.ecg[0], b.ppg[0]]).astype(np.float32) for b in blocks]


def payloads(device: str, samples: list[np.ndarray], seqs: range | list[int] | None = None) -> list[bytes]:
    """Encoded one-second chunks of ``device`` for the given seqs (default: all, in order)."""
    chosen = range(len(samples)) if seqs is None else seqs
    return [encode_chunk(SignalChunk("clinic-p", device, k, T0 + k * NS, 125.0, ("ecg", "ppg"), samples[k]))
            for k in chosen]


def expected_ends(first_seq: int, last_seq: int) -> list[int]:
    """Window ends of a contiguous run of one-second chunks ``first_seq..last_seq``."""
    start, stop = T0 + first_seq * NS, T0 + (last_seq + 1) * NS
    first = -(-(start + WIN) // HOP) * HOP
    return list(range(first, stop + 1, HOP))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessorProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "bpstream.services.processor.main"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.env['BPSTREAM_PROCESSOR_METRICS_PORT']}{path}", timeout=5)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def processor(servers: ServerEndpoints, service_env: dict[str, str], tmp_path: Path) -> Iterator[ProcessorProcess]:
    env = {**os.environ, **service_env, **servers.env("processor"),  # its own Kafka user, ACLs for the prefix
           "BPSTREAM_PROCESSOR_DATA_DIR": str(tmp_path / "faust"),
           "BPSTREAM_PROCESSOR_METRICS_PORT": str(free_port()),
           "BPSTREAM_KAFKA_SESSION_TIMEOUT_MS": "6000",
           "BPSTREAM_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
           "BPSTREAM_PROCESSOR_FAUST_LOGLEVEL": "INFO",  # the log is only read when a test fails
           "BPSTREAM_LOG_JSON": "false"}
    process = ProcessorProcess(env, tmp_path / "processor.log")
    yield process
    process.ensure_stopped()


class Reader:
    """Reads a topic from the beginning with its own consumer group, keeping everything read so far."""

    def __init__(self, settings: KafkaSettings, topic: KafkaTopic) -> None:
        self.consumer = KafkaConsumer(settings, [topic], f"check-{uuid.uuid4().hex[:8]}")
        self.values: list[bytes] = []

    async def __aenter__(self) -> Reader:
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def until(self, done: Callable[[list[bytes]], bool], timeout_s: float, why: str,
                    log: Callable[[], str]) -> list[bytes]:
        deadline = time.monotonic() + timeout_s
        while not done(self.values):
            assert time.monotonic() < deadline, f"timed out waiting for {why}; processor log:\n{log()}"
            self.values.extend(r.value or b"" for r in await self.consumer.getmany(timeout_ms=500))
        return self.values


async def produce(settings: KafkaSettings, records: list[tuple[str, bytes]]) -> None:
    async with KafkaProducer(settings) as producer:
        # signals.raw is keyed by clinic/device, as the bridge keys it.
        await producer.send_many([(SIGNALS_RAW, value, device_key("clinic-p", key)) for key, value in records])


def windows_by_device(values: list[bytes]) -> dict[str, list[tuple[int, int, int, bytes]]]:
    out: dict[str, list[tuple[int, int, int, bytes]]] = {}
    for value in values:
        w = decode_window(value)
        out.setdefault(w.device_id, []).append((w.end_ns, w.seq_first, w.seq_last, w.samples))
    return out

async def process_first_seconds(processor: ProcessorProcess, kafka_settings: KafkaSettings, reader: Reader,
                                streams: dict[str, list[bytes]], seconds: int,
                                log: Callable[[], str] | None = None) -> None:
    """Produce the first ``seconds`` chunks of every device, start the processor, wait for all their windows."""
    await produce(kafka_settings, [(d, streams[d][k]) for k in range(seconds) for d in streams])
    processor.start()
    want = len(expected_ends(0, seconds - 1))
    await reader.until(lambda vs: all(len(windows_by_device(vs).get(d, [])) >= want for d in streams), 120,
                       "first windows", log or processor.log_tail)


async def every_window(reader: Reader, devices: list[str], seconds: int, log: Callable[[], str],
                       timeout_s: float = 120) -> list[bytes]:
    """Read until every device has a window at every grid point of its first ``seconds`` chunks."""
    full = len(expected_ends(0, seconds - 1))
    return await reader.until(lambda vs: all(len({w[0] for w in windows_by_device(vs).get(d, [])}) >= full
                                             for d in devices), timeout_s, "all windows", log)



async def test_windows_in_device_time_with_duplicates_reordering_gaps_and_bad_records(
        processor: ProcessorProcess, kafka_settings: KafkaSettings) -> None:
    seconds = 36
    samples = simulated_samples(seconds, seed=11)
    clean = payloads("dev-clean", samples)
    # The same signal from another device id, delivered with duplicates and bounded reordering.
    messy = payloads("dev-messy", samples)
    rng = random.Random(5)
    for i in range(0, len(messy) - 3, 4):
        j = i + rng.randint(1, 3)
        messy[i], messy[j] = messy[j], messy[i]
    for k in rng.sample(range(len(messy)), 6):
        messy.insert(min(len(messy), k + rng.randint(1, 4)), messy[k])
    lost = 18
    gappy = payloads("dev-gap", samples, [k for k in range(seconds) if k != lost])
    records = [("dev-clean", p) for p in clean[:10]]
    records.append(("dev-clean", b"this is not a signal chunk, yet it is in signals.raw"))  # same partition
    records += [("dev-clean", p) for p in clean[10:]]
    records += [("dev-messy", p) for p in messy] + [("dev-gap", p) for p in gappy]
    await produce(kafka_settings, records)
    processor.start()

    want = {"dev-clean": expected_ends(0, seconds - 1), "dev-messy": expected_ends(0, seconds - 1),
            "dev-gap": [e for e in expected_ends(0, seconds - 1)
                        if e <= T0 + lost * NS or e - WIN >= T0 + (lost + 1) * NS]}

    def complete(values: list[bytes]) -> bool:
        got = windows_by_device(values)
        return all(len(got.get(d, [])) >= len(ends) for d, ends in want.items())

    async with Reader(kafka_settings, WINDOWS) as reader:
        values = await reader.until(complete, 120, "windows", processor.log_tail)
    got = windows_by_device(values)
    for device, ends in want.items():
        assert [end for end, *_ in got[device]] == ends, device
    # Seq ranges are those of the chunks holding the first and last sample of each window.
    for end, seq_first, seq_last, _ in got["dev-clean"]:
        assert (seq_first, seq_last) == ((end - WIN - T0) // NS, (end - 1 - T0) // NS)
    # Duplicates and reordering change nothing: same windows, same samples.
    assert got["dev-messy"] == got["dev-clean"]
    assert all(decode_window(v).quality_ok for v in values)

    def gap_seen(values: list[bytes]) -> bool:
        return any(msgspec.json.decode(v, type=QualityRecord).kind == "gap" for v in values)

    async with Reader(kafka_settings, QUALITY) as reader:
        quality = [msgspec.json.decode(v, type=QualityRecord)
                   for v in await reader.until(gap_seen, 60, "gap record", processor.log_tail)]
    gaps = [q for q in quality if q.kind == "gap"]
    assert [(g.device_id, g.seq_first, g.seq_last, g.missing_chunks) for g in gaps] == [("dev-gap", lost, lost, 1)]
    assert gaps[0].start_ns == T0 + lost * NS and gaps[0].end_ns == T0 + (lost + 1) * NS

    async with Reader(kafka_settings, SIGNALS_DLQ) as reader:
        letters = [decode_dead_letter(v) for v in await reader.until(bool, 60, "dead letter", processor.log_tail)]
    assert [(d.stage, d.reason, d.key) for d in letters] == [("processor", "bad_magic", "clinic-p/dev-clean")]
    assert letters[0].payload == b"this is not a signal chunk, yet it is in signals.raw"
    assert processor.get("/readyz").status_code == 200
    metrics = processor.get("/metrics").text
    assert f"bpstream_processor_chunks_total {float(len(records))}" in metrics
    assert 'bpstream_processor_stream_events_total{kind="gap"} 1.0' in metrics
    assert 'bpstream_processor_dead_letters_total{reason="bad_magic"} 1.0' in metrics
    assert processor.terminate() == 0


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_restart_mid_stream_resumes_from_the_changelog_without_losing_windows(
        processor: ProcessorProcess, kafka_settings: KafkaSettings, how: str) -> None:
    seconds, cut = 40, 20
    devices = [f"dev-{i}" for i in range(3)]
    streams = {d: payloads(d, simulated_samples(seconds, seed=20 + i)) for i, d in enumerate(devices)}
    async with Reader(kafka_settings, WINDOWS) as reader:
        await process_first_seconds(processor, kafka_settings, reader, streams, cut)
        if how == "sigterm":
            assert processor.terminate() == 0
        else:
            processor.kill()
        # The second half arrives while the processor is down; a new process must resume each device's
        # reassembly (buffered chunks, next seq, last window) from the changelog.
        await produce(kafka_settings, [(d, streams[d][k]) for k in range(cut, seconds) for d in devices])
        processor.start()
        full = expected_ends(0, seconds - 1)
        values = await every_window(reader, devices, seconds, processor.log_tail)
    got = windows_by_device(values)
    for device in devices:
        ends = [end for end, *_ in got[device]]
        assert sorted(set(ends)) == full, device  # nothing lost, including the windows spanning the restart
        if how == "sigterm":
            assert Counter(ends) == Counter(full)  # a clean stop commits: nothing is emitted twice
        else:
            # After a crash a window may be re-emitted, always identical, so identity-keyed sinks converge.
            by_end: dict[int, set[tuple[int, int, bytes]]] = {}
            for end, first, last, data in got[device]:
                by_end.setdefault(end, set()).add((first, last, data))
            assert all(len(versions) == 1 for versions in by_end.values())
    assert processor.terminate() == 0


async def raw_end_offsets(settings: KafkaSettings) -> dict[TopicPartition, int]:
    name = topic_name(SIGNALS_RAW, settings.topic_prefix)
    partitions = [TopicPartition(name, p) for p in range(SIGNALS_RAW.partitions)]
    consumer = AIOKafkaConsumer(**settings.client_kwargs(), enable_auto_commit=False)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


async def commit_past(settings: KafkaSettings, group_id: str, processed: dict[TopicPartition, int],
                      skip: int) -> dict[TopicPartition, int]:
    """Commit, for the (idle) group, ``skip`` records past what the processor processed in every partition that
    has them, as a consumer does that acks records it never handed over. Returns the offsets skipped from.

    Measured from what was processed, not from the group's committed offset: Faust may have committed less
    than it processed (its commits are periodic), and a skip inside already-processed records is no skip."""
    ends = await raw_end_offsets(settings)
    skipped = {tp: offset for tp, offset in processed.items() if offset > 0 and offset + skip <= ends[tp]}
    consumer = AIOKafkaConsumer(**settings.client_kwargs(), group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(skipped))
        await consumer.commit({tp: offset + skip for tp, offset in skipped.items()})
        return skipped
    finally:
        await consumer.stop()


async def test_records_the_consumer_skipped_are_read_back_from_kafka(
        processor: ProcessorProcess, kafka_settings: KafkaSettings) -> None:
    # Faust can ack (and so commit) records its agent never received: records fetched before a rebalance or
    # while flow control was paused are dropped and acked. The processor's own offset marks must catch that.
    seconds, cut, skip = 40, 20, 5
    devices = [f"dev-{i}" for i in range(3)]
    streams = {d: payloads(d, simulated_samples(seconds, seed=40 + i)) for i, d in enumerate(devices)}
    async with Reader(kafka_settings, WINDOWS) as reader:
        await process_first_seconds(processor, kafka_settings, reader, streams, cut)
        assert processor.terminate() == 0
        processed = await raw_end_offsets(kafka_settings)  # all of it: every first-half window came out
        await produce(kafka_settings, [(d, streams[d][k]) for k in range(cut, seconds) for d in devices])
        group = f"{kafka_settings.topic_prefix}bpstream-processor"
        skipped = await commit_past(kafka_settings, group, processed, skip)
        assert skipped, "no partition had records to skip"
        processor.start()
        full = expected_ends(0, seconds - 1)
        values = await every_window(reader, devices, seconds, processor.log_tail)
    got = windows_by_device(values)
    for device in devices:
        assert sorted({end for end, *_ in got[device]}) == full, device
    metrics = processor.get("/metrics").text
    # Every skipped record was read back; more is allowed: a second rebalance before the next checkpoint reads
    # the same gap again (its windows are re-emitted identical, which identity-keyed sinks absorb).
    read_back = [float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("bpstream_processor_read_back_records_total ")]
    assert read_back and read_back[0] >= skip * len(skipped), (read_back, skip, skipped)
    assert 'bpstream_processor_stream_events_total{kind="gap"}' not in metrics
    assert processor.terminate() == 0


async def test_a_worker_joining_and_a_worker_crashing_mid_stream_lose_no_window(
        processor: ProcessorProcess, kafka_settings: KafkaSettings, service_env: dict[str, str],
        tmp_path: Path) -> None:
    # Two workers in one group: the second joins mid-stream (partitions move to it), then the first crashes
    # (its partitions move back). Each move must resume from the changelog without losing a window.
    seconds, devices = 45, [f"dev-{i}" for i in range(12)]
    streams = {d: payloads(d, simulated_samples(seconds, seed=60 + i)) for i, d in enumerate(devices)}
    second = ProcessorProcess({**processor.env, "BPSTREAM_PROCESSOR_DATA_DIR": str(tmp_path / "faust-2"),
                               "BPSTREAM_PROCESSOR_METRICS_PORT": str(free_port())}, tmp_path / "processor-2.log")

    def logs() -> str:
        return processor.log_tail() + "\n--- second worker ---\n" + second.log_tail()

    async def stream(first: int, last: int, pause_s: float) -> None:
        for k in range(first, last):
            await produce(kafka_settings, [(d, streams[d][k]) for d in devices])
            await asyncio.sleep(pause_s)

    def chunks_done(worker: ProcessorProcess) -> float:
        try:
            text = worker.get("/metrics").text
        except httpx.HTTPError:
            return 0.0
        found = [line for line in text.splitlines() if line.startswith("bpstream_processor_chunks_total ")]
        return float(found[0].split()[1]) if found else 0.0

    try:
        async with Reader(kafka_settings, WINDOWS) as reader:
            await process_first_seconds(processor, kafka_settings, reader, streams, 15, logs)
            second.start()
            # In real time: the join's rebalance happens while the stream goes on.
            await stream(15, 30, pause_s=1.0)
            assert chunks_done(second) > 0, f"the second worker never got a partition\n{logs()}"
            processor.kill()
            await stream(30, seconds, pause_s=0.3)
            full = expected_ends(0, seconds - 1)
            values = await every_window(reader, devices, seconds, logs, timeout_s=180)
        got = windows_by_device(values)
        for device in devices:
            assert sorted({end for end, *_ in got[device]}) == full, device
            versions: dict[int, set[tuple[int, int, bytes]]] = {}
            for end, first_seq, last_seq, data in got[device]:
                versions.setdefault(end, set()).add((first_seq, last_seq, data))
            assert all(len(v) == 1 for v in versions.values()), device  # a replayed window is identical
        assert second.terminate() == 0
    finally:
        second.ensure_stopped()
