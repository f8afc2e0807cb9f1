"""CPU per chunk of the processor's batch handling alone: ``ProcessorService.handle_batch`` on a dict store, with
a producer that only keeps an order-independent digest of the windows (no Kafka, no Faust), so two versions of
the code can be compared on the same chunks: the digest must be equal, the CPU per chunk is the difference.

Run: ``.venv/bin/python -m bpstream.bench.processor_batches --devices 500 --seconds 40 --batch 500``
(``--gateway-batch N`` feeds the chunks as the bridge's per-partition ``ChunkBatch`` records of N-device
gateways; ``--profile`` prints the top of a cProfile).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import hashlib
import logging
import os
import pstats
import time
from collections.abc import Sequence

import numpy as np
from aiokafka.partitioner import murmur2
from prometheus_client import CollectorRegistry

from bpstream.services.processor.changelog import changelog_topic
from bpstream.services.processor.checkpoint import DictStore
from bpstream.services.processor.readback import RawRecord
from bpstream.services.processor.service import ProcessorService
from bpstream.services.processor.settings import ProcessorSettings
from bpstream.shared.kafka import OutgoingRecord
from bpstream.shared.messages import SignalChunk, decode_chunk, decode_window, encode_chunk
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import SIGNALS_RAW, WINDOWS, device_key
from bpstream.simulators.cohort import build_cohort

T0_NS = 1_700_000_000 * 10**9


def key_partition(key: bytes, partitions: int) -> int:
    # Kafka's default partitioner (kept here so that this bench also runs on older versions of the code)
    return (int(murmur2(key)) & 0x7FFFFFFF) % partitions


def records(devices: int, seconds: int, gateway_batch: int) -> list[RawRecord]:
    """``devices`` x ``seconds`` one-second chunks (mixed simulated patients, 125 Hz) as ``signals.raw`` records."""
    engine = build_cohort("mixed", devices, 1, float(seconds + 5), sample_rate=125.0).engine
    offsets = [0] * SIGNALS_RAW.partitions
    out: list[RawRecord] = []

    def add(key: bytes, value: bytes, partition: int, second: int) -> None:
        out.append(RawRecord(key, value, partition, offsets[partition], T0_NS / 1e9 + second + 0.1))
        offsets[partition] += 1

    for k in range(seconds):
        block = engine.step(1.0)
        payloads = [encode_chunk(SignalChunk("clinic-1", f"dev-{d}", k, T0_NS + k * 10**9, 125.0, ("ecg", "ppg"),
                                             np.stack([block.ecg[d], block.ppg[d]]).astype(np.float32)))
                    for d in range(devices)]
        if not gateway_batch:
            for d, value in enumerate(payloads):
                key = device_key("clinic-1", f"dev-{d}").encode()
                add(key, value, key_partition(key, SIGNALS_RAW.partitions), k)
            continue
        from bpstream.services.bridge.batches import raw_records

        for start in range(0, devices, gateway_batch):
            good = [(p, decode_chunk(p)) for p in payloads[start:start + gateway_batch]]
            for record in raw_records("clinic-1", f"gw-{start // gateway_batch}", good):
                key = record[2].encode() if isinstance(record[2], str) else (record[2] or b"")
                partition = record[3] if len(record) == 4 else key_partition(key, SIGNALS_RAW.partitions)
                add(key, record[1] or b"", partition, k)
    return out


class DigestSink:
    """The producer: counts records and hashes every window's identity, SQI and samples."""

    def __init__(self) -> None:
        self.records = 0
        self.windows: list[bytes] = []

    async def send_many(self, batch: Sequence[OutgoingRecord]) -> None:
        self.records += len(batch)
        for record in batch:
            if record[0] is WINDOWS and record[1] is not None:
                w = decode_window(record[1])
                identity = f"{w.device_id}{w.end_ns}{w.seq_first}{w.seq_last}{w.sqi}".encode()
                self.windows.append(hashlib.sha256(identity + w.samples).digest())

    def digest(self) -> str:
        """One hash of every window, whatever order the devices were processed in."""
        return hashlib.sha256(b"".join(sorted(self.windows))).hexdigest()[:16]


async def _no_records(*_: object) -> list[RawRecord]:
    return []


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--seconds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=500, help="records per handle_batch call")
    parser.add_argument("--gateway-batch", type=int, default=0)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    logging.disable(logging.WARNING)
    raw = records(args.devices, args.seconds, args.gateway_batch)
    settings = ProcessorSettings(kafka=KafkaSettings(topic_prefix="bench."), checkpoint_interval_s=5)
    sink = DigestSink()
    service = ProcessorService(settings, store=DictStore(), changelog=changelog_topic(settings), producer=sink,
                               read_back=_no_records, read_changelog=_no_records, registry=CollectorRegistry())

    async def run() -> None:
        for at in range(0, len(raw), args.batch):
            await service.handle_batch(raw[at:at + args.batch])
        await service.checkpoint()

    gc.freeze()
    profiler = cProfile.Profile() if args.profile else None
    started = time.process_time()
    if profiler:
        profiler.enable()
    asyncio.run(run())
    if profiler:
        profiler.disable()
    cpu = time.process_time() - started
    chunks = args.devices * args.seconds
    print(f"{chunks} chunks in {len(raw)} records: {cpu:.2f} CPU s, {cpu / chunks * 1e3:.3f} ms per chunk; "
          f"{sink.records} records out, {len(sink.windows)} windows, digest {sink.digest()}")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
