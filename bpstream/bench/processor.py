"""Throughput of the processor on this machine, against the real local Kafka, plus the pure stage alone.

``signals.raw`` is filled with ``devices`` x ``seconds`` one-second chunks of simulated patients (125 Hz
ECG+PPG), then a processor process starts; its ``bpstream_processor_chunks_total`` counter, polled on
/metrics, gives chunks per second from the first processed chunk to the last. The same chunks pushed through
the pure stage in this process (no Kafka) give the baseline: how much of the time is the stage itself.

Run: ``.venv/bin/python -m bpstream.bench.processor --devices 200 --seconds 30``
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import httpx
import numpy as np

from bpstream.services.processor.stage import (
    DeviceState,
    Reassembler,
    StageConfig,
    WindowCut,
    decode_state,
    encode_state,
)
from bpstream.shared.kafka import KafkaProducer, ensure_topics
from bpstream.shared.messages import SignalChunk, decode_chunk, encode_chunk
from bpstream.shared.topics import ALL_TOPICS, SIGNALS_RAW

T0 = 1_700_000_000 * 10**9


def simulated_chunks(devices: int, seconds: int) -> list[tuple[str, bytes]]:
    """(device, payload) in arrival order: every device's second k before any device's second k+1."""
    # Imported by name: the simulator is a development dependency of this tool, not of the service.
    cohort = importlib.import_module("bpstream.simulators.cohort")
    engine = cohort.build_cohort("mixed", devices, 1, float(seconds + 5)).engine
    out: list[tuple[str, bytes]] = []
    for k in range(seconds):
        block = engine.step(1.0)
        for d in range(devices):
            samples = np.stack([block.ecg[d], block.ppg[d]]).astype(np.float32)
            chunk = SignalChunk("bench", f"dev-{d}", k, T0 + k * 10**9, 125.0, ("ecg", "ppg"), samples)
            out.append((chunk.device_id, encode_chunk(chunk)))
    return out


def stage_rate(chunks: list[tuple[str, bytes]], batch: int = 500) -> tuple[float, int]:
    """Chunks/s of decode + stage + preprocessing + state (de)serialisation, in this process; windows made.

    Windows are prepared in batches of ``batch`` chunks, as the service does.
    """
    stage = Reassembler(StageConfig(defer_preparation=True))
    states: dict[str, bytes] = {}
    windows = 0
    cuts: list[WindowCut] = []
    started = time.perf_counter()
    for i, (device, payload) in enumerate(chunks):
        stored = states.get(device)
        state: DeviceState | None = decode_state(stored) if stored is not None else None
        state, out = stage.process(state, decode_chunk(payload), payload, received_ns=0, now_ns=0)
        states[device] = encode_state(state)
        cuts.extend(out.cuts)
        if (i + 1) % batch == 0 or i == len(chunks) - 1:
            windows += len(stage.finish(cuts, 0)[0])
            cuts = []
    return len(chunks) / (time.perf_counter() - started), windows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chunks_done(port: str) -> float:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0.0
    match = re.search(r"^bpstream_processor_chunks_total ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def service_rate(chunks: list[tuple[str, bytes]]) -> float:
    from bpstream.localservers import ensure_up

    servers = ensure_up()
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    kafka = servers.kafka_settings(prefix)  # the admin fills the topics; the processor runs as its own user

    async def fill() -> None:
        await servers.grant_kafka_prefix(prefix)
        await ensure_topics(kafka, ALL_TOPICS)
        async with KafkaProducer(kafka) as producer:
            for i in range(0, len(chunks), 2000):
                await producer.send_many([(SIGNALS_RAW, p, d) for d, p in chunks[i : i + 2000]])

    asyncio.run(fill())
    port = str(_free_port())
    with tempfile.TemporaryDirectory() as data, tempfile.TemporaryFile() as log:
        env = {**os.environ, **servers.env("processor"), "BPSTREAM_KAFKA_TOPIC_PREFIX": prefix,
               "BPSTREAM_PROCESSOR_METRICS_PORT": port, "BPSTREAM_PROCESSOR_DATA_DIR": data,
               "BPSTREAM_LOG_LEVEL": "WARNING"}
        proc = subprocess.Popen([sys.executable, "-m", "bpstream.services.processor.main"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            first_at = None
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                done = _chunks_done(port)
                now = time.perf_counter()
                if done > 0 and first_at is None:
                    first_at, first_done = now, done
                if done >= len(chunks):
                    assert first_at is not None
                    return (done - first_done) / max(now - first_at, 1e-9)
                time.sleep(0.1)
            raise RuntimeError("processor did not finish in 600 s")
        finally:
            proc.terminate()
            proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()
    chunks = simulated_chunks(args.devices, args.seconds)
    pure, windows = stage_rate(chunks)
    service = service_rate(chunks)
    print(json.dumps({"devices": args.devices, "seconds": args.seconds, "chunks": len(chunks), "windows": windows,
                      "stage_chunks_per_s": round(pure), "processor_chunks_per_s": round(service),
                      "processor_vs_stage": round(service / pure, 2)}))


if __name__ == "__main__":
    main()
