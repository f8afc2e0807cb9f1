"""Replay recorded data as devices over MQTT: the MIMIC-III CSV windows or a simulator dataset.

Every record becomes one device that publishes 1 s chunks (QoS 1, same payload and topics as the fleet), so
recorded signals flow through the live pipeline and its estimates can be compared with the recorded
reference. Short gaps (<= 0.5 s) are interpolated; a chunk that still has missing samples is not published
(the pipeline sees a sequence gap, as with a real dropout) and is listed in the report. The reference (beat SBP
and DBP from the ABP wave, or the dataset's ground truth) goes to a truth file in the fleet's format
(``load_truth`` reads it), never into the payload.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bpstream.shared.messages import SignalChunk, encode_chunk
from bpstream.shared.mqtt import ssl_context
from bpstream.shared.settings import MqttSettings
from bpstream.shared.topics import ID_PATTERN, mqtt_signals_topic, mqtt_status_topic
from bpstream.simulators.dataset import load_dataset
from bpstream.simulators.errors import DataFormatError, InvalidParameterError
from bpstream.simulators.fleet import FleetTruth
from bpstream.simulators.mqtt_async import AsyncMqttConnection
from bpstream.simulators.realdata import abp_beats, fill_short_gaps, list_mimic, read_mimic_csv

CHANNELS = ("ecg", "ppg")


@dataclass(slots=True)
class ReplaySource:
    """One recording to publish as a device."""

    device_id: str
    sample_rate: float
    ecg: np.ndarray
    ppg: np.ndarray
    beat_time_s: np.ndarray
    beat_sbp: np.ndarray
    beat_dbp: np.ndarray
    origin: str = ""


@dataclass(slots=True)
class ReplayReport:
    device_ids: list[str]
    published: int
    skipped_gaps: dict[str, list[int]]
    wall_s: float
    truth: FleetTruth
    sources: dict[str, str] = field(default_factory=dict)


def _safe_id(prefix: str, name: str) -> str:
    ident = f"{prefix}-{re.sub(r'[^A-Za-z0-9_.-]', '-', name)}"[:64]
    if not ID_PATTERN.match(ident):
        raise InvalidParameterError(f"cannot make a device id from {name!r}")
    return ident


def load_sources(data: Path, device_prefix: str = "rec", limit: int | None = None) -> list[ReplaySource]:
    """Recordings from a MIMIC windows folder (CSV) or a simulator dataset folder (manifest.json)."""
    data = Path(data)
    if not data.exists():
        raise DataFormatError(f"{data} does not exist (the MIMIC windows live in ../shared/data/mimic3-windows)")
    sources: list[ReplaySource] = []
    if (data / "manifest.json").exists():
        ds = load_dataset(data)
        for rec in ds.records[:limit]:
            sources.append(ReplaySource(_safe_id(device_prefix, rec.subject_id), rec.sample_rate,
                                        rec.ecg.astype(float), rec.ppg.astype(float), rec.beat_times_s,
                                        rec.beat_sbp.astype(float), rec.beat_dbp.astype(float), "simulated"))
        return sources
    files = list_mimic(data)
    if not files:
        raise DataFormatError(f"{data} holds neither a manifest.json nor MIMIC CSV files")
    for path in files[:limit]:
        real = read_mimic_csv(path)
        bt, sbp, dbp = abp_beats(real.abp, real.sample_rate)
        max_gap = int(0.5 * real.sample_rate)
        sources.append(ReplaySource(_safe_id(device_prefix, real.name), real.sample_rate,
                                    fill_short_gaps(real.ecg, max_gap), fill_short_gaps(real.ppg, max_gap),
                                    bt, sbp, dbp, f"mimic3:{path.name}"))
    return sources


async def replay(sources: list[ReplaySource], host: str, port: int, *, clinic_id: str = "replay",
                 speed: float = 1.0, truth_path: Path | None = None, start_time_ns: int | None = None,
                 username: str | None = None, password: str | None = None,
                 tls: ssl.SSLContext | None = None) -> ReplayReport:
    """Publish every source as a device, 1 s per chunk, one chunk every ``1/speed`` s."""
    if not (math.isfinite(speed) and speed > 0):
        raise InvalidParameterError(f"speed must be a positive number, got {speed}")
    if not sources:
        raise InvalidParameterError("nothing to replay")
    start_ns = start_time_ns if start_time_ns is not None else time.time_ns()
    tag = uuid.uuid4().hex[:6]
    conns = [AsyncMqttConnection(f"bpreplay-{tag}-{s.device_id}"[:64], host, port,
                                 will_topic=mqtt_status_topic(clinic_id, s.device_id), username=username,
                                 password=password, tls=tls) for s in sources]
    await asyncio.gather(*(c.connect() for c in conns))
    for c, s in zip(conns, sources, strict=True):
        c.publish(mqtt_status_topic(clinic_id, s.device_id), b"online", retain=True)
    truth = FleetTruth({s.device_id: s.origin for s in sources})
    skipped: dict[str, list[int]] = {s.device_id: [] for s in sources}
    fh = Path(truth_path).open("w") if truth_path else None  # noqa: ASYNC230, SIM115 (followed live)
    if fh:
        for s in sources:
            fh.write(json.dumps({"type": "device", "device_id": s.device_id, "clinic_id": clinic_id,
                                 "scenario": s.origin, "start_ns": start_ns}) + "\n")
    n_chunks = [int(len(s.ecg) // s.sample_rate) for s in sources]
    loop = asyncio.get_running_loop()
    wall0 = loop.time()
    published = 0
    try:
        for k in range(max(n_chunks)):
            delay = wall0 + k / speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            for s, c, nk in zip(sources, conns, n_chunks, strict=True):
                if k >= nk:
                    continue
                fs = s.sample_rate
                a, b = round(k * fs), round((k + 1) * fs)
                t0_ns = start_ns + k * 10**9
                sel = (s.beat_time_s >= k) & (s.beat_time_s < k + 1)
                beat_ns = start_ns + np.round(s.beat_time_s[sel] * 1e9).astype(np.int64)
                truth.add_chunk(s.device_id, k, t0_ns, beat_ns, s.beat_sbp[sel], s.beat_dbp[sel], s.origin)
                samples = np.stack([s.ecg[a:b], s.ppg[a:b]]).astype(np.float32)
                gap = not np.isfinite(samples).all()
                if fh:
                    fh.write(json.dumps({"type": "chunk", "device_id": s.device_id, "seq": k, "t0_ns": t0_ns,
                                         "duration_ns": 10**9, "label": s.origin, "lost": gap,
                                         "beat_ns": beat_ns.tolist(),
                                         "beat_sbp": np.round(s.beat_sbp[sel], 2).tolist(),
                                         "beat_dbp": np.round(s.beat_dbp[sel], 2).tolist()}) + "\n")
                if gap:
                    skipped[s.device_id].append(k)
                    continue
                c.publish(mqtt_signals_topic(clinic_id, s.device_id),
                          encode_chunk(SignalChunk(clinic_id, s.device_id, k, t0_ns, fs, CHANNELS, samples)))
                published += 1
            if fh:
                fh.flush()
        await asyncio.gather(*(c.drain(within_s=60) for c in conns))
        for c, s in zip(conns, sources, strict=True):
            c.publish(mqtt_status_topic(clinic_id, s.device_id), b"offline", retain=True)
        await asyncio.gather(*(c.drain(within_s=10) for c in conns))
    finally:
        for c in conns:
            await c.disconnect()
        if fh:
            fh.close()
    return ReplayReport([s.device_id for s in sources], published, skipped, loop.time() - wall0, truth,
                        {s.device_id: s.origin for s in sources})


def replay_connection(settings: MqttSettings) -> dict[str, Any]:
    """:func:`replay` keyword arguments that connect as ``settings`` say (host, port, account, TLS)."""
    return {"host": settings.host, "port": settings.port, "username": settings.username,
            "password": settings.password.get_secret_value() if settings.password else None,
            "tls": ssl_context(settings)}
