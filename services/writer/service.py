"""The InfluxDB writer's wiring: Kafka ``estimates``/``alerts``/``quality``/``signals.dlq`` -> InfluxDB.

Built on the shared loop (``bpstream.shared.consumer_loop``): collect a batch (bounded by size and wait) ->
translate to line protocol (``points``) -> write with retries (``influx_client``) -> commit the Kafka offsets.
Offsets are committed only after InfluxDB acknowledged the batch, so a crash replays records, and replays overwrite
the same points. A record that does not decode goes to ``signals.dlq`` with its reason (or, coming from the DLQ
itself, is counted and logged) and its offset is committed with the batch: it never blocks a partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from prometheus_client import Counter, Gauge, Histogram

from bpstream.services.writer.influx_client import InfluxWriter
from bpstream.services.writer.points import WRITTEN_TOPICS, pipeline_line, record_lines
from bpstream.services.writer.settings import WriterSettings
from bpstream.shared.consumer_loop import BatchServiceBase, ConsumerLoop, LoopConfig, Outcome, Record, Rejected
from bpstream.shared.errors import DecodeError, StoppedError
from bpstream.shared.kafka import ensure_topics
from bpstream.shared.lag import LagProbe
from bpstream.shared.retry import retry_async
from bpstream.shared.settings import log_settings
from bpstream.shared.telemetry import HealthServer

log = logging.getLogger(__name__)

RECORDS = Counter("bpstream_writer_records_total", "Kafka records consumed by the writer", ["topic"])
POINTS = Counter("bpstream_writer_points_written_total", "Points InfluxDB acknowledged")
REJECTED = Counter("bpstream_writer_points_rejected_total", "Points InfluxDB refused as bad (skipped)")
UNDECODABLE = Counter("bpstream_writer_undecodable_total", "Records that did not decode", ["reason"])
BATCH_SIZE = Histogram("bpstream_writer_batch_size", "Records per write batch",
                       buckets=(1, 5, 10, 50, 100, 500, 1000, 2000, 5000, 10000))
WRITE_SECONDS = Histogram("bpstream_writer_write_seconds", "Time to store one batch in InfluxDB (with retries)")
E2E_LATENCY = Histogram("bpstream_writer_e2e_latency_seconds",
                        "Bridge receipt of a window's newest chunk -> its estimate stored in InfluxDB",
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
LAG = Gauge("bpstream_pipeline_consumer_lag", "Messages a pipeline consumer group is behind", ["group"])


class WriterService(BatchServiceBase):
    """One batch at a time (a ``BatchService`` of the shared loop): records in, points stored; the loop
    dead-letters what did not decode or was refused, then commits."""

    def __init__(self, settings: WriterSettings, influx: InfluxWriter) -> None:
        self.settings, self.influx = settings, influx
        self.processed = 0
        self.newest_received_ns = 0

    async def handle(self, records: list[Record]) -> Outcome:
        stored_ns = time.time_ns()
        outcome = Outcome()
        lines: list[str] = []
        origin: dict[str, Record] = {}  # line -> the record it came from
        received: list[int] = []
        for record in records:
            RECORDS.labels(record.topic.removeprefix(self.settings.kafka.topic_prefix)).inc()
            payload = record.value or b""
            try:
                record_point_lines, received_ns = record_lines(
                    record.topic, payload, prefix=self.settings.kafka.topic_prefix, stored_ns=stored_ns)
            except (DecodeError, ValueError) as exc:
                reason = exc.reason if isinstance(exc, DecodeError) else "bad_point"
                UNDECODABLE.labels(reason).inc()
                log.warning("undecodable record", extra={"topic": record.topic, "partition": record.partition,
                                                         "offset": record.offset, "reason": reason})
                outcome.rejected.append(Rejected(record, reason, str(exc)))
                continue
            lines.extend(record_point_lines)
            origin.update((point_line, record) for point_line in record_point_lines)
            if received_ns:
                received.append(received_ns)
        started = time.monotonic()
        result = await self.influx.write(lines)
        WRITE_SECONDS.observe(time.monotonic() - started)
        POINTS.inc(result.written)
        REJECTED.inc(result.rejected)
        outcome.rejected.extend(refused_records(result.refused, origin))
        now = time.time_ns()
        for received_ns in received:
            E2E_LATENCY.observe(max(0, now - received_ns) / 1e9)
        if received:
            self.newest_received_ns = max(self.newest_received_ns, max(received))
        BATCH_SIZE.observe(len(records))
        self.processed += len(records)
        return outcome


def refused_records(refused: list[tuple[str, str]], origin: dict[str, Record]) -> list[Rejected]:
    """The records whose points InfluxDB refused (once per record), to dead-letter so none is lost silently.

    The reason is ours (``influx_<reason>``), never InfluxDB's error text, which repeats patient readings.
    Pipeline samples have no record and are skipped.
    """
    out: list[Rejected] = []
    done: set[tuple[str, int, int]] = set()
    for point_line, reason in refused:
        record = origin.get(point_line)
        if record is None:
            continue
        ident = (record.topic, record.partition, record.offset)
        if ident in done:
            continue
        done.add(ident)
        out.append(Rejected(record, f"influx_{reason}", f"InfluxDB refused a point of this record ({reason})"))
    return out


async def report_pipeline(settings: WriterSettings, stage: WriterService, influx: InfluxWriter,
                          stop: asyncio.Event) -> None:
    """Every ``pipeline_interval_s``: consumer lag of each pipeline group and the writer's own latency."""
    last_processed, last_t = 0, time.monotonic()
    probe: LagProbe | None = None
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=settings.pipeline_interval_s)
            if stop.is_set():
                break
            try:
                if probe is None:
                    probe = LagProbe(settings.kafka)
                    await probe.__aenter__()
                lags = await probe.lags()
            except Exception as exc:  # Kafka restarting: skip this sample, try a fresh probe next time
                log.warning("lag probe failed", extra={"error": repr(exc)[:200]})
                if probe is not None:
                    with contextlib.suppress(Exception):
                        await probe.__aexit__(None, None, None)
                    probe = None
                continue
            now_ns, now_t = time.time_ns(), time.monotonic()
            rate = (stage.processed - last_processed) / max(now_t - last_t, 1e-9)
            last_processed, last_t = stage.processed, now_t
            lines = []
            for group, lag in lags.items():
                LAG.labels(group).set(lag)
                own = group == "bpstream-writer"
                lines.append(pipeline_line(
                    group, settings.instance, now_ns, consumer_lag=lag,
                    lag_ms=(now_ns - stage.newest_received_ns) / 1e6 if own and stage.newest_received_ns else None,
                    processed=stage.processed if own else None, rate_per_s=rate if own else None))
            try:
                await influx.write(lines)
            except StoppedError:
                break
    finally:
        if probe is not None:
            with contextlib.suppress(Exception):
                await probe.__aexit__(None, None, None)


def loop_config(settings: WriterSettings) -> LoopConfig:
    """The shared loop's settings: every stored topic in, offsets committed after each stored batch."""
    return LoopConfig(service="writer", topics=WRITTEN_TOPICS, group_id=settings.group_id,
                      batch_max_size=settings.batch_max_size, batch_max_wait_ms=settings.batch_max_wait_ms)


async def run_writer(settings: WriterSettings, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set, then finish the batch in hand, commit and return."""
    log_settings(settings, "writer")
    # Every topic it reads or writes, so the writer started by hand on fresh servers does not fail on a topic
    # that no other service has created yet.
    await retry_async(lambda: ensure_topics(settings.kafka, WRITTEN_TOPICS), attempts=10, what="ensure topics")
    influx = InfluxWriter(settings.influx, retry_base_s=settings.retry_base_s, retry_cap_s=settings.retry_cap_s,
                          stop=stop)
    # Ready only while the loop runs, Kafka answers and accepts sends, and InfluxDB answers: 503 during an
    # outage, 200 again when it is back, without a restart.
    loop = ConsumerLoop(settings.kafka, loop_config(settings), ready_when=lambda: influx.available)
    async with HealthServer(settings.metrics_host, settings.metrics_port, lambda: loop.ready), influx, loop:
        try:
            await influx.ensure_database()
        except StoppedError:
            return
        service = WriterService(settings, influx)
        reporter = (asyncio.create_task(report_pipeline(settings, service, influx, stop))
                    if settings.pipeline_interval_s > 0 else None)
        log.info("writer ready", extra={"database": settings.influx.database})
        try:
            await loop.run(service, stop)
        finally:
            if reporter is not None:
                stop.set()
                await reporter
    log.info("writer stopped")
