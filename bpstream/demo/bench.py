"""``bpstream bench pipeline``: the whole system in real time on this machine, measured end to end.

Runs the local servers, every service (subprocesses, as in production) and a simulated fleet streaming at
real-time speed, then reports:

* devices sustained in real time: the pipeline kept up if, once the stream ended, it drained within a few
  hops (consumer lag does not keep growing during the run);
* latency from window end (bridge receipt of the window's newest chunk) to estimate stored, p50/p99, from
  the ``stored_latency_ms`` the writer records with every estimate;
* consumer lag of every group (max during the run, sampled every second);
* messages lost: windows the processor should have emitted (from the simulator's chunk record) that are not
  in InfluxDB, and chunks published but not forwarded by the bridge (must both be 0);
* where the time goes: CPU seconds per service process (from /proc) and the services' own timing metrics.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bpstream.demo.pipeline import Pipeline, PipelineConfig, influx_rows
from bpstream.shared import influx_api
from bpstream.shared.modelspec import HOP_SECONDS, WINDOW_SECONDS

NS = 1_000_000_000


@dataclass(slots=True, frozen=True)
class BenchConfig:
    devices: int = 100
    duration_s: float = 60.0
    inference_workers: int = 1
    output: Path | None = None
    keep_database: bool = False
    #: Run inference, alerting and the writer under cProfile and summarise where their main thread spends time.
    profile: bool = False
    #: 0: one MQTT message per chunk. N >= 1: gateways of N devices, each sending its chunks of a second as
    #: one ``ChunkBatch`` (``FleetConfig.gateway_batch``).
    gateway_batch: int = 0
    #: Connections publish at their own phase within each second (``FleetConfig.stagger``); False: all at once.
    stagger: bool = True


@dataclass(slots=True)
class BenchResult:
    devices: int
    duration_s: float
    inference_workers: int
    machine: str
    chunks_published: int
    chunks_forwarded: int
    windows_expected: int
    windows_stored: int
    windows_lost: int
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    #: Bridge receipt -> estimate produced by inference (the rest of the total is alerting-free writer time).
    to_estimate_p50_ms: float
    to_estimate_p99_ms: float
    #: Bridge receipt -> window emitted by the processor.
    to_window_p50_ms: float
    to_window_p99_ms: float
    max_lag: dict[str, int]
    drain_s: float
    sustained: bool
    fleet_max_lag_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    profile: dict[str, list[str]] = field(default_factory=dict)
    gateway_batch: int = 0
    stagger: bool = False
    #: CPU seconds per process, per 1,000 devices, per 60 s of streaming (``cpu_s`` scaled).
    cpu_s_per_1000_devices_per_min: dict[str, float] = field(default_factory=dict)
    #: The five services' CPU per 1,000 devices, in cores (CPU s per s of streaming).
    services_cores_per_1000_devices: float = float("nan")


def summarise_profile(path: Path, top: int = 12) -> list[str]:
    """The functions with the most own time in a cProfile dump, as ``tottime_s cumtime_s function``."""
    import pstats

    stats = pstats.Stats(str(path))
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    return [f"{tt:8.2f} {ct:8.2f}  {fn[2]} ({Path(fn[0]).name}:{fn[1]})" for fn, (_cc, _nc, tt, ct, _) in rows]


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, {platform.system()} {platform.release()}, Python " \
           f"{platform.python_version()}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = sum(int(x) for x in fields[11:15])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


_SAMPLE = re.compile(r"^(bpstream_[a-z_]+_(?:sum|count))(?:\{[^}]*\})?\s+([0-9.eE+-]+)$")


async def scrape(port: int) -> dict[str, float]:
    """Sum of each ``*_sum`` / ``*_count`` sample of a service's /metrics (labels folded)."""
    out: dict[str, float] = {}
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def expected_windows(chunk_t0: list[int]) -> int:
    """Windows a device's contiguous chunks allow: ends on the hop grid with a full window behind them."""
    first, last_end = min(chunk_t0), max(chunk_t0) + NS
    hop, window = int(HOP_SECONDS * NS), int(WINDOW_SECONDS * NS)
    first_end = -(-(first + window) // hop) * hop  # the first grid point with a full window
    return max(0, (last_end - first_end) // hop + 1)


async def _bench(cfg: BenchConfig) -> BenchResult:
    from bpstream import localservers
    from bpstream.shared.lag import LagProbe
    from bpstream.simulators.fleet import FleetConfig, mqtt_connection, run_fleet

    endpoints = await asyncio.to_thread(localservers.ensure_up)
    tag = f"bench{uuid.uuid4().hex[:6]}"
    profile_dir = Path("reports") / "bench" / tag / "profiles"
    pconf = PipelineConfig(servers=endpoints,
                           topic_prefix=f"{tag}.", database=f"{tag}", log_dir=Path("reports") / "bench" / tag,
                           env={"BPSTREAM_LOG_LEVEL": "WARNING",
                                **({"BPSTREAM_PROFILE_DIR": str(profile_dir.resolve())} if cfg.profile else {})},
                           service_env={"inference": {"BPSTREAM_INFERENCE_BATCH_MAX_SIZE": "128",
                                                      "BPSTREAM_INFERENCE_LOG_LEVEL": "WARNING"}})
    fleet_cfg = FleetConfig(**mqtt_connection(endpoints.mqtt_settings("simulator")), devices=cfg.devices,
                            duration_s=cfg.duration_s, speed=1.0, clinic_id=tag, device_prefix=f"{tag}-d",
                            scenario="mixed", seed=1, gateway_batch=cfg.gateway_batch, stagger=cfg.stagger,
                            connections=math.ceil(cfg.devices / cfg.gateway_batch) if cfg.gateway_batch else None)
    max_lag: dict[str, int] = {}
    async with Pipeline(pconf) as pipeline:
        await pipeline.start()
        for i in range(2, cfg.inference_workers + 1):
            pipeline.supervisor.start("inference", instance=f"inference-{i}")
        ours = (f"{tag}-d",)
        server_pids = {f"server:{st.name}": st.pid for st in await asyncio.to_thread(localservers.status) if st.pid}
        cpu_before = {k: cpu_seconds(c.process.pid) for k, c in pipeline.supervisor.children.items()}
        cpu_before.update({k: cpu_seconds(pid) for k, pid in server_pids.items()})
        own_before = time.process_time()
        stop = asyncio.Event()

        async def sample_lag() -> None:
            async with LagProbe(pconf.kafka()) as probe:
                while not stop.is_set():
                    try:
                        for group, lag in (await probe.lags()).items():
                            max_lag[group] = max(max_lag.get(group, 0), lag)
                    except Exception:  # a probe failure only loses one sample
                        pass
                    await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample_lag())
        fleet = await run_fleet(fleet_cfg)
        stream_end = time.monotonic()
        await pipeline.wait_drained(min_raw=fleet.published, key_prefixes=ours,
                                    timeout_s=max(600.0, cfg.duration_s * 5), settle_probes=1)
        drain_s = time.monotonic() - stream_end
        stop.set()
        await sampler
        cpu = {k: round(cpu_seconds(c.process.pid) - cpu_before.get(k, 0.0), 1)
               for k, c in pipeline.supervisor.children.items()}
        cpu.update({k: round(cpu_seconds(pid) - cpu_before[k], 1) for k, pid in server_pids.items()})
        cpu["simulator (this process)"] = round(time.process_time() - own_before, 1)
        metrics: dict[str, float] = {}
        for port in pipeline.metrics_ports.values():
            metrics.update(await scrape(port))
        forwarded = await pipeline.forwarded(ours)
        from bpstream.shared.kafka_tools import read_topic
        from bpstream.shared.messages import decode_window
        from bpstream.shared.topics import WINDOWS

        window_ms = np.array([(w.emitted_ns - w.received_ns) / 1e6 for w in
                              (decode_window(r.value or b"") for r in await read_topic(pconf.kafka(), WINDOWS))
                              if w.clinic_id == tag and w.received_ns and w.emitted_ns])
        await asyncio.sleep(2.0)
        rows = await influx_rows(pconf.influx(),
                                 "SELECT stored_latency_ms, latency_ms FROM bp_estimate "
                                 f"WHERE clinic = '{tag}' GROUP BY device")
    profile = {p.stem: summarise_profile(p) for p in sorted(profile_dir.glob("*.prof"))} if cfg.profile else {}
    if not cfg.keep_database:
        await influx_api.execute(pconf.influx(), f"DROP DATABASE {influx_api.quote_identifier(pconf.database)}")
    latencies = np.array([float(r["stored_latency_ms"]) for r in rows if r.get("stored_latency_ms") is not None])
    to_estimate = np.array([float(r["latency_ms"]) for r in rows if r.get("latency_ms") is not None])
    expected = sum(expected_windows([t0 for _s, t0, _l in fleet.truth.chunks(d)]) for d in fleet.device_ids)
    stored = len(rows)
    hop_s = HOP_SECONDS
    return BenchResult(
        devices=cfg.devices, duration_s=cfg.duration_s, inference_workers=cfg.inference_workers,
        machine=machine_description(), chunks_published=fleet.published, chunks_forwarded=forwarded,
        windows_expected=expected, windows_stored=stored, windows_lost=max(0, expected - stored),
        latency_p50_ms=round(float(np.percentile(latencies, 50)), 1) if len(latencies) else float("nan"),
        latency_p99_ms=round(float(np.percentile(latencies, 99)), 1) if len(latencies) else float("nan"),
        latency_max_ms=round(float(latencies.max()), 1) if len(latencies) else float("nan"),
        to_estimate_p50_ms=round(float(np.percentile(to_estimate, 50)), 1) if len(to_estimate) else float("nan"),
        to_window_p50_ms=round(float(np.percentile(window_ms, 50)), 1) if len(window_ms) else float("nan"),
        to_window_p99_ms=round(float(np.percentile(window_ms, 99)), 1) if len(window_ms) else float("nan"),
        to_estimate_p99_ms=round(float(np.percentile(to_estimate, 99)), 1) if len(to_estimate) else float("nan"),
        max_lag=max_lag, drain_s=round(drain_s, 1), sustained=drain_s <= 3 * hop_s + 5 and fleet.max_lag_s < 1.0,
        fleet_max_lag_s=round(fleet.max_lag_s, 2), cpu_s=cpu, metrics={k: round(v, 3) for k, v in metrics.items()},
        profile=profile, gateway_batch=cfg.gateway_batch, stagger=cfg.stagger,
        **per_1000_devices(cpu, cfg.devices, cfg.duration_s))


#: The pipeline's five services (processes the bench starts), as named in ``cpu_s``.
SERVICES = ("bridge", "processor", "inference", "alerting", "writer")


def per_1000_devices(cpu: dict[str, float], devices: int, duration_s: float) -> dict[str, Any]:
    """CPU s per 1,000 devices per minute of streaming, per process, and the five services' cores per 1,000.

    >>> out = per_1000_devices({"bridge": 6.0, "processor": 12.0, "server:kafka": 3.0}, 500, 60.0)
    >>> out["cpu_s_per_1000_devices_per_min"], out["services_cores_per_1000_devices"]
    ({'bridge': 12.0, 'processor': 24.0, 'server:kafka': 6.0}, 0.6)
    """
    scale = (1000.0 / devices) * (60.0 / duration_s)
    per = {k: round(v * scale, 2) for k, v in cpu.items()}
    services = sum(v for k, v in cpu.items() if k.split("-")[0] in SERVICES)
    return {"cpu_s_per_1000_devices_per_min": per,
            "services_cores_per_1000_devices": round(services / duration_s * 1000.0 / devices, 3)}


def run_bench(cfg: BenchConfig) -> BenchResult:
    result = asyncio.run(_bench(cfg))
    print_result(result)
    if cfg.output is not None:
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        cfg.output.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def print_result(r: BenchResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bpstream bench pipeline: {r.devices} devices, {r.duration_s:.0f} s real time")
    table.add_column("measure")
    table.add_column("value", justify="right")
    m = r.metrics
    model_s, batches = m.get("bpstream_inference_model_seconds_sum", 0.0), m.get(
        "bpstream_inference_model_seconds_count", 0.0)
    windows = m.get("bpstream_inference_batch_size_sum", 0.0)
    rows: list[tuple[str, Any]] = [
        ("sustained in real time", "yes" if r.sustained else "NO"),
        ("drain after stream end (s)", r.drain_s),
        ("latency p50 / p99 / max (ms)", f"{r.latency_p50_ms} / {r.latency_p99_ms} / {r.latency_max_ms}"),
        ("  of which receipt -> estimate p50 / p99 (ms)", f"{r.to_estimate_p50_ms} / {r.to_estimate_p99_ms}"),
        ("  of which receipt -> window p50 / p99 (ms)", f"{r.to_window_p50_ms} / {r.to_window_p99_ms}"),
        ("windows expected / stored / lost", f"{r.windows_expected} / {r.windows_stored} / {r.windows_lost}"),
        ("chunks published / forwarded", f"{r.chunks_published} / {r.chunks_forwarded}"),
        ("max consumer lag", ", ".join(f"{g.removeprefix('bpstream-')} {n}" for g, n in sorted(r.max_lag.items()))),
        ("simulator max lag behind real time (s)", r.fleet_max_lag_s),
        ("CPU s per service", ", ".join(f"{k} {v}" for k, v in sorted(r.cpu_s.items(), key=lambda kv: -kv[1]))),
        ("CPU s per 1,000 devices per min", ", ".join(
            f"{k} {v}" for k, v in sorted(r.cpu_s_per_1000_devices_per_min.items(), key=lambda kv: -kv[1]))),
        ("five services: cores per 1,000 devices", r.services_cores_per_1000_devices),
        ("gateway batch (chunks per message, 0: none)", r.gateway_batch),
        ("connections staggered within the second", "yes" if r.stagger else "no (all at once)"),
        ("inference: windows / batches / model s", f"{windows:.0f} / {batches:.0f} / {model_s:.1f}"),
        ("inference: mean batch, ms model per window",
         f"{windows / batches:.1f}, {1000 * model_s / windows:.2f}" if batches and windows else "n/a"),
        ("machine", r.machine),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    console = Console()
    console.print(table)
    for service, lines in r.profile.items():
        console.print(f"[b]{service}[/]: main-thread functions by own time (tottime s, cumtime s)")
        for line in lines:
            console.print("  " + line, highlight=False)
