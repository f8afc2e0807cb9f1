"""``bpstream bench simulator``: devices simulated in real time per core, generation alone and publishing.

Generation: one process, one thread, so CPU seconds are one core's; "devices per core" is device-seconds
generated per CPU second. The baseline in the same process is the same engine driven one device at a time
(no vectorisation across devices). Publishing: the whole fleet (generation, encoding, MQTT QoS 1 with
acknowledgements) against a real broker as fast as it goes, reported as device-seconds per wall and CPU second.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
from typing import TYPE_CHECKING

import numpy as np

from bpstream.shared.messages import SignalChunk, encode_chunk
from bpstream.simulators.cohort import build_cohort

if TYPE_CHECKING:
    from bpstream.shared.settings import MqttSettings


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, NumPy {np.__version__}"


def measure_generation(n: int, seconds: int, encode: bool, seed: int = 0) -> tuple[float, float]:
    """(CPU s, wall s) to generate ``seconds`` of ``n`` devices (optionally encoding every chunk)."""
    cohort = build_cohort("mixed", n, seed, float(seconds + 1))
    cohort.engine.step(1.0)  # warm-up
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for k in range(seconds):
        block = cohort.engine.step(1.0)
        if encode:
            for i in range(n):
                encode_chunk(SignalChunk("clinic-1", f"dev-{i}", k, 1_800_000_000_000_000_000 + k * 10**9, 125.0,
                                         ("ecg", "ppg"), np.stack([block.ecg[i], block.ppg[i]])))
    return time.process_time() - cpu0, time.perf_counter() - wall0


def measure_one_at_a_time(n: int, seconds: int) -> float:
    """Baseline: CPU s for ``n`` separate one-device engines."""
    engines = [build_cohort("mixed", 1, i, float(seconds + 1)).engine for i in range(n)]
    for e in engines:
        e.step(1.0)
    cpu0 = time.process_time()
    for _ in range(seconds):
        for e in engines:
            e.step(1.0)
    return time.process_time() - cpu0


def measure_publish(n: int, seconds: int, mqtt: MqttSettings,
                    speed: float = 1000.0) -> tuple[float, float, int, float]:
    """(CPU s, wall s, chunks acknowledged, max lag behind schedule in s) of one fleet run."""
    from bpstream.simulators.fleet import FleetConfig, mqtt_connection, run_fleet

    cfg = FleetConfig(**mqtt_connection(mqtt), devices=n, duration_s=seconds, speed=speed, clinic_id="bench",
                      device_prefix=f"b{n}", scenario="mixed")
    cpu0 = time.process_time()
    report = asyncio.run(run_fleet(cfg))
    return time.process_time() - cpu0, report.wall_s, report.published, report.max_lag_s


def run_bench(devices: list[int], seconds: int, mqtt: MqttSettings | None,
              publish_devices: list[int], realtime_devices: list[int] | None = None) -> None:
    print(f"machine: {machine()}")
    print(f"generation, {seconds} device-seconds per device, one thread:")
    print("| devices | engine CPU s | devices/core (engine) | + encode CPU s | devices/core (engine+encode) |")
    print("|---|---|---|---|---|")
    for n in devices:
        cpu, _ = measure_generation(n, seconds, encode=False)
        cpu_e, _ = measure_generation(n, seconds, encode=True)
        print(f"| {n} | {cpu:.2f} | {n * seconds / cpu:,.0f} | {cpu_e:.2f} | {n * seconds / cpu_e:,.0f} |")
    base_n = min(100, min(devices))
    base = measure_one_at_a_time(base_n, seconds)
    vec, _ = measure_generation(base_n, seconds, encode=False)
    print(f"baseline: {base_n} one-device engines {base:.2f} CPU s vs one {base_n}-device engine {vec:.2f} CPU s: "
          f"vectorised is {base / vec:.1f}x faster")
    if mqtt is None:
        return
    print(f"publishing to {mqtt.host}:{mqtt.port} (TLS {'on' if mqtt.tls else 'off'}, QoS 1, acknowledged, "
          "as fast as possible):")
    print("| devices | wall s | process CPU s | device-s per wall s | device-s per CPU s | chunks acked |")
    print("|---|---|---|---|---|---|")
    for n in publish_devices:
        cpu, wall, published, _ = measure_publish(n, seconds, mqtt)
        print(f"| {n} | {wall:.2f} | {cpu:.2f} | {n * seconds / wall:,.0f} | {n * seconds / cpu:,.0f} | {published} |")
    if realtime_devices:
        print(f"real time (speed 1, {seconds} s): does the fleet keep its schedule?")
        print("| devices | wall s | process CPU s | CPU use of one core | max lag behind schedule s | chunks acked |")
        print("|---|---|---|---|---|---|")
        for n in realtime_devices:
            cpu, wall, published, lag = measure_publish(n, seconds, mqtt, speed=1.0)
            print(f"| {n} | {wall:.2f} | {cpu:.2f} | {cpu / wall:.0%} | {lag:.3f} | {published} |")
