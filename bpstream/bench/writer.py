# mypy: disallow-untyped-calls=False
"""``bpstream bench writer``: the writer's InfluxDB path alone, against the real local InfluxDB.

Two measurements, each with its baseline in the same process:

* encoding: estimate records (the writer's commonest) decoded and turned into line protocol by our encoder
  (``bpstream.shared.influx.line`` through ``points.record_lines``), against the same points built as
  ``influxdb_client.Point`` and serialised by the client (``Point.to_line_protocol``);
* writing: the same lines stored by the writer's ``InfluxWriter`` in batches of ``batch`` points into a fresh
  database, against a bare ``httpx`` POST of the same batches to the v1 ``/write`` endpoint (no retry or error
  handling, the lower bound of a Python HTTP client). Points per second (wall) and this process's CPU per point.

Every pass writes a fresh set of points (distinct device and window times), so each write stores new points
as in production rather than overwriting.
"""

from __future__ import annotations

import asyncio
import os
import platform
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
from influxdb_client.client.write.point import Point
from influxdb_client.domain.write_precision import WritePrecision

from bpstream.services.writer.influx_client import InfluxWriter
from bpstream.services.writer.points import record_lines
from bpstream.shared import influx_api
from bpstream.shared.influx import MEASUREMENT_ESTIMATE
from bpstream.shared.messages import Estimate, decode_estimate, encode_json
from bpstream.shared.settings import InfluxSettings
from bpstream.shared.tls import client_ssl_context
from bpstream.shared.topics import ESTIMATES

NS = 1_000_000_000


@dataclass(slots=True, frozen=True)
class Timing:
    points: int
    wall_s: float
    cpu_s: float

    @property
    def points_per_s(self) -> float:
        return self.points / self.wall_s

    @property
    def cpu_us_per_point(self) -> float:
        return 1e6 * self.cpu_s / self.points


def estimate_payloads(n: int, start_ns: int) -> list[bytes]:
    """``n`` encoded estimates: 100 devices, consecutive 2 s windows, realistic values."""
    out = []
    for i in range(n):
        device, window = i % 100, i // 100
        end = start_ns + window * 2 * NS
        out.append(encode_json(Estimate(
            clinic_id="bench-clinic", device_id=f"dev-{device:04d}", window_start_ns=end - 8 * NS,
            window_end_ns=end, sbp=118.0 + (i % 37) * 0.731, dbp=76.0 + (i % 23) * 0.417, sbp_sd=6.25,
            dbp_sd=4.5, anomaly_prob=0.0375, sqi=0.93, quality_ok=True, inputs="ecg+ppg",
            model_version="bench-1", received_ns=end + 150_000_000, estimated_ns=end + 400_000_000)))
    return out


def client_point_line(payload: bytes, stored_ns: int) -> str:
    """The same ``bp_estimate`` point as ``points.estimate_line``, built and serialised by influxdb-client."""
    e = decode_estimate(payload)
    point = (Point(MEASUREMENT_ESTIMATE).tag("clinic", e.clinic_id).tag("device", e.device_id)
             .field("sbp", e.sbp).field("dbp", e.dbp).field("sbp_sd", e.sbp_sd).field("dbp_sd", e.dbp_sd)
             .field("anomaly_prob", e.anomaly_prob).field("sqi", float(e.sqi)).field("quality_ok", 1)
             .field("latency_ms", (e.estimated_ns - e.received_ns) / 1e6)
             .field("stored_latency_ms", (stored_ns - e.received_ns) / 1e6)
             .field("model_version", e.model_version).time(e.window_end_ns, WritePrecision.NS))
    return str(point.to_line_protocol())


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


async def _timed_async(n: int, fn: Callable[[list[list[str]]], Awaitable[None]], batches: list[list[str]]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    await fn(batches)
    return Timing(n, time.perf_counter() - wall, time.process_time() - cpu)


async def run(admin: InfluxSettings, writer_user: InfluxSettings, n: int, batch: int, rounds: int) -> str:
    """Both variants write as ``writer_user`` (WRITE only); ``admin`` creates, counts and drops the database."""
    start_ns = time.time_ns() - 3600 * NS
    payloads = estimate_payloads(n, start_ns)
    stored_ns = time.time_ns()
    topic = ESTIMATES.name

    def ours() -> list[str]:
        return [record_lines(topic, p, prefix="", stored_ns=stored_ns)[0][0] for p in payloads]

    def theirs() -> list[str]:
        return [client_point_line(p, stored_ns) for p in payloads]

    enc_ours = min(_timed(ours)[1] for _ in range(rounds))
    enc_theirs = min(_timed(theirs)[1] for _ in range(rounds))
    # a fresh set of points for every pass (2 warm-up passes, then `rounds` of each variant), so every write
    # stores new points as in production, not overwrites
    passes = iter(range(2 + 2 * rounds))

    def next_batches() -> list[list[str]]:
        shift = next(passes) * (n // 100 + 1) * 2 * NS
        lines = [record_lines(topic, p, prefix="", stored_ns=stored_ns)[0][0]
                 for p in estimate_payloads(n, start_ns + shift)]
        return [lines[i:i + batch] for i in range(0, len(lines), batch)]

    database = f"bench_{uuid.uuid4().hex[:8]}"
    settings = admin.model_copy(update={"database": database})
    writes_as = writer_user.model_copy(update={"database": database})
    await influx_api.execute(settings, f"CREATE DATABASE {influx_api.quote_identifier(database)}")
    if writes_as.username and writes_as.username != settings.username:
        await influx_api.execute(settings, f"GRANT WRITE ON {influx_api.quote_identifier(database)} TO "
                                           f"{influx_api.quote_identifier(writes_as.username)}")
    token = influx_api.token(writes_as)
    verify: ssl.SSLContext | bool = (client_ssl_context(writes_as.ca_file) if writes_as.verify_ssl else False)
    try:
        writer_runs, baseline_runs = [], []
        async with InfluxWriter(writes_as) as writer, httpx.AsyncClient(
                base_url=writes_as.url, timeout=30, verify=verify,
                headers={"Authorization": f"Token {token}"} if token else {}) as http:
            async def with_writer(batches: list[list[str]]) -> None:
                for chunk in batches:
                    result = await writer.write(chunk)
                    assert result.written == len(chunk), result

            async def with_httpx(batches: list[list[str]]) -> None:
                for chunk in batches:
                    answer = await http.post("/write", params={"db": database, "precision": "ns"},
                                             content="\n".join(chunk).encode())
                    assert answer.status_code == 204, answer.status_code

            await with_writer(next_batches())  # warm both connections, the server's shards and caches
            await with_httpx(next_batches())
            for _ in range(rounds):  # alternate, so drift in the machine's load hits both alike
                writer_runs.append(await _timed_async(n, with_writer, next_batches()))
                baseline_runs.append(await _timed_async(n, with_httpx, next_batches()))
        stored = await influx_api.query_rows(settings, f'SELECT count("sbp") FROM "{MEASUREMENT_ESTIMATE}"')
        assert stored and stored[0]["count"] == n * (2 + 2 * rounds), stored
    finally:
        await influx_api.execute(settings, f"DROP DATABASE {influx_api.quote_identifier(database)}")

    best_w = min(writer_runs, key=lambda t: t.wall_s)
    best_b = min(baseline_runs, key=lambda t: t.wall_s)
    version = await influx_api.server_version(settings)
    return "\n".join([
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"InfluxDB {version}; {n} estimate points, batches of {batch}, best of {rounds}",
        f"encode  ours (shared.influx.line)        {1e6 * enc_ours / n:7.2f} us/point",
        f"encode  influxdb-client Point            {1e6 * enc_theirs / n:7.2f} us/point  "
        f"(ours is {enc_theirs / enc_ours:.2f}x faster)",
        f"write   InfluxWriter                     {best_w.points_per_s:9.0f} points/s  "
        f"{best_w.cpu_us_per_point:6.2f} us CPU/point",
        f"write   baseline httpx POST /write       {best_b.points_per_s:9.0f} points/s  "
        f"{best_b.cpu_us_per_point:6.2f} us CPU/point",
        f"ratio   InfluxWriter / baseline          {best_w.points_per_s / best_b.points_per_s:9.2f} x throughput  "
        f"{best_w.cpu_us_per_point / best_b.cpu_us_per_point:6.2f} x CPU/point",
    ])


def main(admin: InfluxSettings, writer_user: InfluxSettings, n: int = 50_000, batch: int = 5000,
         rounds: int = 3) -> None:
    print(asyncio.run(run(admin, writer_user, n, batch, rounds)))
