"""The alerting service's wiring: Kafka ``estimates`` -> per-patient detectors -> Kafka ``alerts``.

Delivery and state (at-least-once, no duplicate alerts):

* alerts of a batch are produced (and acknowledged) before anything else happens to that batch;
* every ``state_flush_s`` the changed detectors are written to the compacted ``alerting.state`` topic (key =
  device) and, only after Kafka acknowledged them, the offsets of every estimate processed so far are
  committed. State and committed offsets therefore move together;
* on start and after every rebalance the state topic is read to its end and merged into memory, then the
  consumer resumes at the committed offsets. Replayed estimates are ignored by the detector (it skips windows
  at or before the last one it saw), and alert ids are derived from device, kind and the episode's first
  window, so a replayed alert is the same record again: the writer overwrites the same point.

Cuff readings: every instance follows the compacted ``cuff`` topic (no consumer group) and hands a reading to
the detector of its device when that device's ``estimates`` partition is assigned to this instance (so one
detector state per device, as for estimates). Readings of the backlog read at start that the bridge received
more than ``cuff_backlog_max_age_s`` ago only update the detector (no alert). A reading that arrives while its
device's partition is not assigned here is handled by the instance that owns it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import Counter, Gauge, Histogram

from bpstream.services.alerting.settings import AlertingSettings
from bpstream.services.alerting.stage import AlertingState
from bpstream.shared.batching import collect_batch
from bpstream.shared.errors import DecodeError
from bpstream.shared.kafka import KafkaConsumer, RecoveringProducer, ensure_topics
from bpstream.shared.kafka_tools import CuffFollower, read_latest_by_key
from bpstream.shared.logging import pseudonym
from bpstream.shared.messages import Alert, CuffReading, Estimate, decode_estimate, encode_json
from bpstream.shared.retry import retry_async
from bpstream.shared.settings import log_settings
from bpstream.shared.telemetry import HealthServer
from bpstream.shared.topics import ALERTING_STATE, ALERTS, CUFF, ESTIMATES, device_key, group_name, topic_name

log = logging.getLogger(__name__)

ESTIMATES_IN = Counter("bpstream_alerting_estimates_total", "Estimates consumed by alerting")
ALERTS_OUT = Counter("bpstream_alerting_alerts_total", "Alerts produced", ["kind", "state"])
FUTURE = Counter("bpstream_alerting_future_estimates_total",
                 "Estimates ignored because their window lay too far ahead of their receipt time")
UNDECODABLE = Counter("bpstream_alerting_undecodable_total", "Estimates that did not decode", ["reason"])
ACTIVE = Gauge("bpstream_alerting_active_alerts", "Alert episodes currently active")
BATCH_SECONDS = Histogram("bpstream_alerting_batch_seconds", "Time to handle one batch of estimates")


class AlertingService:
    """One batch at a time; state flushed and offsets committed together every ``state_flush_s``."""

    def __init__(self, settings: AlertingSettings, consumer: KafkaConsumer, producer: RecoveringProducer) -> None:
        self.settings, self.consumer, self.producer = settings, consumer, producer
        self.state = AlertingState(settings.alert_config())
        self.uncommitted: list[ConsumerRecord[bytes, bytes]] = []
        self.last_flush = time.monotonic()
        self.assignment: set[TopicPartition] = set()
        self._partitioner = DefaultPartitioner()

    def owns(self, key: str) -> bool:
        """True when the ``estimates`` partition of the device with Kafka key ``key`` (clinic/device) is assigned
        to this instance."""
        name = topic_name(ESTIMATES, self.settings.kafka.topic_prefix)
        partitions = self.consumer.client.partitions_for_topic(name)
        owned = {tp.partition for tp in self.consumer.client.assignment() if tp.topic == name}
        if not owned:
            return False
        every = sorted(partitions) if partitions else list(range(ESTIMATES.partitions))
        return int(self._partitioner(key.encode(), every, every)) in owned

    async def handle_cuff(self, readings: list[CuffReading], now_ns: int, *, backlog: bool = False) -> None:
        mine = [r for r in readings if self.owns(device_key(r.clinic_id, r.device_id))]
        alerts: list[Alert] = []
        if backlog:
            horizon = now_ns - round(self.settings.cuff_backlog_max_age_s * 1e9)
            alerts.extend(self.state.apply_cuff([r for r in mine if r.received_ns < horizon], raise_alerts=False))
            mine = [r for r in mine if r.received_ns >= horizon]
        alerts.extend(self.state.apply_cuff(mine))
        await self._send_alerts(alerts)

    async def _send_alerts(self, alerts: list[Alert]) -> None:
        if alerts:
            await self.producer.send_many(
                [(ALERTS, encode_json(a), device_key(a.clinic_id, a.device_id)) for a in alerts])
            for a in alerts:
                ALERTS_OUT.labels(a.kind, a.state).inc()
                log.info("alert", extra={"alert_ref": pseudonym(a.alert_id), "kind": a.kind, "state": a.state,
                                         "severity": a.severity, "basis": a.basis})

    async def restore_if_rebalanced(self) -> None:
        assignment = set(self.consumer.client.assignment())
        if assignment == self.assignment:
            return
        self.assignment = assignment
        saved = await retry_async(lambda: read_latest_by_key(self.settings.kafka, ALERTING_STATE), attempts=10,
                                  what="read alerting state")
        bad = self.state.merge(saved)
        if bad:
            log.warning("unreadable saved detector state ignored", extra={"devices": len(bad)})
        log.info("alerting state restored", extra={"devices": len(saved), "partitions": len(assignment)})

    async def handle(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        started = time.monotonic()
        estimates: list[Estimate] = []
        for record in records:
            ESTIMATES_IN.inc()
            try:
                estimates.append(decode_estimate(record.value or b""))
            except DecodeError as exc:
                UNDECODABLE.labels(exc.reason).inc()
                await self._dead_letter(record, exc)
        future_before = self.state.future_ignored
        await self._send_alerts(self.state.apply(estimates))
        FUTURE.inc(self.state.future_ignored - future_before)
        self.uncommitted.extend(records)
        ACTIVE.set(sum(len(kinds) for kinds in self.state.active_alerts().values()))
        BATCH_SECONDS.observe(time.monotonic() - started)

    async def _dead_letter(self, record: ConsumerRecord[bytes, bytes], exc: DecodeError) -> None:
        key = record.key.decode(errors="replace") if record.key else None

        await self.producer.dead_letter(stage="alerting", reason=exc.reason, detail=str(exc), source=record.topic,
                                        payload=record.value or b"", key=key, partition=record.partition,
                                        offset=record.offset)

    async def flush_if_due(self, force: bool = False) -> None:
        if not self.uncommitted and not self.state.dirty:
            return
        if not force and time.monotonic() - self.last_flush < self.settings.state_flush_s:
            return
        saved = self.state.take_dirty()
        if saved:
            await self.producer.send_many([(ALERTING_STATE, data, device) for device, data in saved.items()])
        try:
            await retry_async(lambda: self.consumer.commit_records(self.uncommitted), attempts=10, what="commit")
        except Exception as exc:  # rebalanced away: the new owner resumes from the saved state
            log.warning("commit failed; estimates will be replayed", extra={"error": repr(exc)[:300]})
        self.uncommitted = []
        self.last_flush = time.monotonic()


async def run_alerting(settings: AlertingSettings, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set, then flush state, commit and return."""
    log_settings(settings, "alerting")
    ready = False
    # Every topic this service reads or writes (see inference): none is left to another service to create.
    await retry_async(lambda: ensure_topics(settings.kafka, [ESTIMATES, ALERTS, ALERTING_STATE, CUFF]), attempts=10,
                      what="ensure topics")
    follower = CuffFollower(settings.kafka)
    async with HealthServer(settings.metrics_host, settings.metrics_port, lambda: ready), \
            RecoveringProducer(settings.kafka) as producer, \
            KafkaConsumer(settings.kafka, [ESTIMATES], group_name(settings.group_id, settings.kafka),
                          max_poll_records=settings.batch_max_size) as consumer:
        service = AlertingService(settings, consumer, producer)

        async def fetch(timeout_s: float, max_items: int) -> list[ConsumerRecord[bytes, bytes]]:
            return await consumer.getmany(int(timeout_s * 1000), max_items)

        backlog: list[CuffReading] | None = None
        ready = True
        try:
            while not stop.is_set():
                records = await collect_batch(fetch, max_size=settings.batch_max_size,
                                              max_wait_s=settings.batch_max_wait_ms / 1000, stop=stop)
                await service.restore_if_rebalanced()
                try:
                    if backlog is None and service.assignment:
                        backlog = await follower.start()  # once partitions are assigned: owners are known
                        await service.handle_cuff(backlog, time.time_ns(), backlog=True)
                    elif backlog is not None:
                        new = await follower.poll()
                        if new:
                            await service.handle_cuff(new, time.time_ns())
                except KafkaError as exc:  # Kafka restarting: the readings wait in the topic
                    log.warning("cuff poll failed", extra={"error": repr(exc)[:200]})
                if records:
                    await service.handle(records)
                await service.flush_if_due()
            await service.flush_if_due(force=True)
        finally:
            ready = False
            await follower.stop()
    log.info("alerting stopped")
