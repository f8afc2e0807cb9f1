"""The alerting service's wiring: Kafka ``estimates`` -> per-patient detectors -> Kafka ``alerts``.

Delivery and state (at-least-once, no duplicate alerts):

* alerts of a batch are produced (and acknowledged) before anything else happens to that batch;
* built on the shared loop (``bpstream.shared.consumer_loop``); every ``state_flush_s`` the changed detectors
  are written to the compacted ``alerting.state`` topic (key =
  device) and, only after Kafka acknowledged them, the offsets of every estimate processed so far are
  committed. State and committed offsets therefore move together;
* on start and after every rebalance the state topic is read to its end and merged into memory, then the
  consumer resumes at the committed offsets. Replayed estimates are ignored by the detector (it skips windows
  at or before the last one it saw), and alert ids are derived from device, kind and the episode's first
  window, so a replayed alert is the same record again: the writer overwrites the same point;
* a device silent for ``evict_after_s`` of record time (the newest window end seen here) loses its detector:
  it is dropped from memory and, if this instance owns the device's partition, a tombstone (null value) is
  written to ``alerting.state`` with the next flush, so neither memory nor the compacted topic grows with
  every device ever seen.

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

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import Counter, Gauge, Histogram

from bpstream.services.alerting.settings import AlertingSettings
from bpstream.services.alerting.stage import AlertingState
from bpstream.shared.consumer_loop import BatchServiceBase, ConsumerLoop, LoopConfig, Outcome, Record, Rejected
from bpstream.shared.errors import DecodeError
from bpstream.shared.kafka import KafkaConsumer, OutgoingRecord, RecoveringProducer, ensure_topics
from bpstream.shared.kafka_tools import CuffFollower, read_latest_by_key
from bpstream.shared.logging import pseudonym
from bpstream.shared.messages import Alert, CuffReading, Estimate, decode_estimate, encode_json
from bpstream.shared.retry import retry_async
from bpstream.shared.settings import log_settings
from bpstream.shared.telemetry import HealthServer
from bpstream.shared.topics import ALERTING_STATE, ALERTS, CUFF, ESTIMATES, device_key, topic_name

log = logging.getLogger(__name__)

ESTIMATES_IN = Counter("bpstream_alerting_estimates_total", "Estimates consumed by alerting")
ALERTS_OUT = Counter("bpstream_alerting_alerts_total", "Alerts produced", ["kind", "state"])
FUTURE = Counter("bpstream_alerting_future_estimates_total",
                 "Estimates ignored because their window lay too far ahead of their receipt time")
UNDECODABLE = Counter("bpstream_alerting_undecodable_total", "Estimates that did not decode", ["reason"])
EVICTED = Counter("bpstream_alerting_evicted_total", "Detector states of silent devices dropped", ["tombstoned"])
ACTIVE = Gauge("bpstream_alerting_active_alerts", "Alert episodes currently active")
BATCH_SECONDS = Histogram("bpstream_alerting_batch_seconds", "Time to handle one batch of estimates")


class AlertingService(BatchServiceBase):
    """One batch at a time (a ``BatchService`` of the shared loop); state flushed before each commit."""

    def __init__(self, settings: AlertingSettings, consumer: KafkaConsumer, producer: RecoveringProducer,
                 follower: CuffFollower | None = None) -> None:
        self.settings, self.consumer, self.producer, self.follower = settings, consumer, producer, follower
        self.state = AlertingState(settings.alert_config())
        self.assignment: set[TopicPartition] = set()
        self.backlog_read = False
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
        if alerts:
            await self.producer.send_many(self._alert_records(alerts))

    @staticmethod
    def _alert_records(alerts: list[Alert]) -> list[OutgoingRecord]:
        for a in alerts:
            ALERTS_OUT.labels(a.kind, a.state).inc()
            log.info("alert", extra={"alert_ref": pseudonym(a.alert_id), "kind": a.kind, "state": a.state,
                                     "severity": a.severity, "basis": a.basis})
        return [(ALERTS, encode_json(a), device_key(a.clinic_id, a.device_id)) for a in alerts]

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

    async def tick(self) -> None:
        """After each fetch: restore state if partitions moved, then take cuff readings for owned devices."""
        await self.restore_if_rebalanced()
        if self.follower is None:
            return
        try:
            if not self.backlog_read and self.assignment:
                backlog = await self.follower.start()  # once partitions are assigned: owners are known
                self.backlog_read = True
                await self.handle_cuff(backlog, time.time_ns(), backlog=True)
            elif self.backlog_read:
                new = await self.follower.poll()
                if new:
                    await self.handle_cuff(new, time.time_ns())
        except KafkaError as exc:  # Kafka restarting: the readings wait in the topic
            log.warning("cuff poll failed", extra={"error": repr(exc)[:200]})

    async def handle(self, records: list[Record]) -> Outcome:
        started = time.monotonic()
        outcome = Outcome()
        estimates: list[Estimate] = []
        for record in records:
            ESTIMATES_IN.inc()
            try:
                estimates.append(decode_estimate(record.value or b""))
            except DecodeError as exc:
                UNDECODABLE.labels(exc.reason).inc()
                outcome.rejected.append(Rejected(record, exc.reason, str(exc)))
        future_before = self.state.future_ignored
        outcome.outgoing.extend(self._alert_records(self.state.apply(estimates)))
        FUTURE.inc(self.state.future_ignored - future_before)
        ACTIVE.set(sum(len(kinds) for kinds in self.state.active_alerts().values()))
        BATCH_SECONDS.observe(time.monotonic() - started)
        return outcome

    def evict_silent(self) -> list[OutgoingRecord]:
        """Drop silent devices' detectors; tombstones for those whose partition this instance owns."""
        gone = self.state.evict_silent(round(self.settings.evict_after_s * 1e9))
        mine = [key for key in gone if self.owns(key)]
        if gone:
            EVICTED.labels("true").inc(len(mine))
            EVICTED.labels("false").inc(len(gone) - len(mine))
            log.info("silent devices evicted", extra={"devices": len(gone), "tombstoned": len(mine)})
        return [(ALERTING_STATE, None, key) for key in mine]

    async def before_commit(self) -> None:
        """Save changed detectors (and silent devices' tombstones) before the offsets are committed."""
        records = self.evict_silent()
        records.extend((ALERTING_STATE, data, device) for device, data in self.state.take_dirty().items())
        if records:
            await self.producer.send_many(records)


def loop_config(settings: AlertingSettings) -> LoopConfig:
    """The shared loop's settings: ``estimates`` in, offsets committed every ``state_flush_s`` with the state."""
    return LoopConfig(service="alerting", topics=[ESTIMATES], group_id=settings.group_id,
                      batch_max_size=settings.batch_max_size, batch_max_wait_ms=settings.batch_max_wait_ms,
                      commit_every_s=settings.state_flush_s)


async def run_alerting(settings: AlertingSettings, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set, then flush state, commit and return."""
    log_settings(settings, "alerting")
    # Every topic this service reads or writes (see inference): none is left to another service to create.
    await retry_async(lambda: ensure_topics(settings.kafka, [ESTIMATES, ALERTS, ALERTING_STATE, CUFF]), attempts=10,
                      what="ensure topics")
    follower = CuffFollower(settings.kafka)
    loop = ConsumerLoop(settings.kafka, loop_config(settings))
    try:
        async with HealthServer(settings.metrics_host, settings.metrics_port, lambda: loop.ready), loop:
            await loop.run(AlertingService(settings, loop.consumer, loop.producer, follower), stop)
    finally:
        await follower.stop()
    log.info("alerting stopped")
