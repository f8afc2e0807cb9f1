"""The one consume -> handle -> produce -> commit loop that inference, alerting and writer are built on.

``ConsumerLoop`` owns a service's Kafka consumer (manual commits) and its ``RecoveringProducer``. Each turn:

1. collect a batch, bounded by ``batch_max_size`` records and ``batch_max_wait_ms`` after the first one;
2. ``service.tick()``: periodic work between batches (model reload, cuff readings, state restore after a
   rebalance), also when the batch is empty;
3. ``service.handle(records)`` returns an ``Outcome``: the records it rejected (each with a reason) and the
   records to produce. The decisions are the service's pure stage; side effects the service owns (the model
   call, the InfluxDB write) happen inside ``handle``;
4. rejected records go to ``signals.dlq`` (never a record that came from the DLQ itself: that is counted and
   logged), then the outgoing records are sent; both wait until Kafka acknowledged them;
5. commit: after every batch (``commit_every_s`` 0), or every ``commit_every_s`` with ``service.
   before_commit()`` first (alerting saves its detector state there, so state and offsets move together).

Delivery is at-least-once: offsets are committed only after everything a batch produced was acknowledged, so
a crash anywhere replays the batch (every consumer downstream is idempotent). A commit is retried with the
shared backoff (``bpstream.shared.retry``); if it still fails (the partitions were rebalanced away) the
records are replayed by their new owner, which is logged, never fatal. A handler that raises stops the loop
without committing (the process exits and the batch is replayed); ``StoppedError`` (stop requested while a
dependency was being retried) ends it quietly, also without committing.

``stop`` (SIGTERM) ends the loop after the batch in hand: it is handled, produced, flushed and committed.

Readiness (``ready``): started, Kafka answering a metadata request (probed every ``probe_interval_s`` by a
background task, so a lost broker shows while the consumer idles), and the producer not failing. A service
folds in its own dependencies (``ready_when``); /readyz returns to 200 by itself once Kafka is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from aiokafka import ConsumerRecord
from prometheus_client import Counter, Gauge, Histogram

from bpstream.shared.batching import collect_batch
from bpstream.shared.brokerwatch import BrokerWatch
from bpstream.shared.errors import StoppedError
from bpstream.shared.kafka import KafkaConsumer, OutgoingRecord, RecoveringProducer
from bpstream.shared.retry import retry_async
from bpstream.shared.service import Component
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import SIGNALS_DLQ, KafkaTopic, group_name, topic_name

log = logging.getLogger(__name__)

#: A consumed Kafka record (bytes key and value).
Record: TypeAlias = ConsumerRecord[bytes, bytes]

BATCHES = Histogram("bpstream_loop_batch_size", "Records per handled batch", ["service"],
                    buckets=(1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10000))
DEAD_LETTERS = Counter("bpstream_loop_dead_letters_total", "Records dead-lettered by the shared loop",
                       ["service", "reason"])
COMMITS = Counter("bpstream_loop_commits_total", "Offset commits, by outcome", ["service", "outcome"])
KAFKA_UP = Gauge("bpstream_loop_kafka_reachable", "1 while Kafka answers the loop's metadata probe", ["service"])


@dataclass(slots=True, frozen=True)
class Rejected:
    """A consumed record that cannot be handled, and why (``reason`` is a short stable code)."""

    record: Record
    reason: str
    detail: str


@dataclass(slots=True)
class Outcome:
    """What handling one batch produced: records to send, and records to dead-letter, before the commit."""

    outgoing: list[OutgoingRecord] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


class BatchService(Protocol):
    """What a service built on ``ConsumerLoop`` provides (``BatchServiceBase`` has no-op hooks)."""

    async def handle(self, records: list[Record]) -> Outcome: ...

    async def tick(self) -> None: ...

    async def before_commit(self) -> None: ...


class BatchServiceBase:
    """Default hooks: nothing between batches, nothing before a commit."""

    async def tick(self) -> None:
        return None

    async def before_commit(self) -> None:
        return None


@dataclass(slots=True, frozen=True)
class LoopConfig:
    """How a service consumes: its name (metrics, dead letters), topics, consumer group and batch bounds."""

    service: str
    topics: Sequence[KafkaTopic]
    group_id: str
    batch_max_size: int
    batch_max_wait_ms: int
    #: 0 commits after every batch; otherwise offsets are committed (after ``before_commit``) this often.
    commit_every_s: float = 0.0
    idle_poll_s: float = 0.5
    probe_interval_s: float = 2.0


class KafkaWatch(BrokerWatch):
    """:class:`BrokerWatch` probing through a started consumer's own client (no extra connection), exporting
    ``bpstream_kafka_up{service}``. A consumer that only waits for records sees no error while the broker is
    gone; this makes the loss visible."""

    def __init__(self, kafka: KafkaSettings, consumer: KafkaConsumer, service: str, interval_s: float = 2.0) -> None:
        super().__init__(lambda: consumer.client.topics(), interval_s=interval_s,
                         timeout_s=min(kafka.request_timeout_ms / 1000, 10.0))
        self.consumer, self.service = consumer, service

    @property
    def reachable(self) -> bool:
        return self.ok

    async def check(self) -> bool:
        ok = await super().check()
        KAFKA_UP.labels(self.service).set(1 if ok else 0)
        return ok


class ConsumerLoop(Component):
    """The shared batch loop of one service: consumer, producer, dead-lettering, commits and readiness."""

    def __init__(self, kafka: KafkaSettings, config: LoopConfig,
                 ready_when: Callable[[], bool] = lambda: True) -> None:
        self.kafka, self.config, self.ready_when = kafka, config, ready_when
        self.producer = RecoveringProducer(kafka)
        self.consumer = KafkaConsumer(kafka, config.topics, group_name(config.group_id, kafka),
                                      max_poll_records=config.batch_max_size)
        self.dlq_topic = topic_name(SIGNALS_DLQ, kafka.topic_prefix)
        self.running = False
        self.watch = KafkaWatch(kafka, self.consumer, config.service, config.probe_interval_s)
        self.uncommitted: list[Record] = []
        self.processed = 0
        self._last_commit = time.monotonic()

    @property
    def ready(self) -> bool:
        """True while the loop runs, Kafka answers and the producer is not failing (and ``ready_when``)."""
        return self.running and self.watch.reachable and self.producer.available and self.ready_when()

    async def start(self) -> None:
        await self.producer.start()
        try:
            await self.consumer.start()
        except BaseException:
            await self.producer.stop()
            raise
        await self.watch.start()

    async def stop(self) -> None:
        self.running = False
        await self.watch.stop()
        try:
            await self.consumer.stop()
        finally:
            await self.producer.stop()

    async def _fetch(self, timeout_s: float, max_items: int) -> list[Record]:
        return await self.consumer.getmany(int(timeout_s * 1000), max_items)

    async def run(self, service: BatchService, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; the batch in hand is finished, flushed and committed before returning."""
        cfg = self.config
        self.running = True
        try:
            while not stop.is_set():
                records = await collect_batch(self._fetch, max_size=cfg.batch_max_size,
                                              max_wait_s=cfg.batch_max_wait_ms / 1000,
                                              idle_poll_s=cfg.idle_poll_s, stop=stop)
                await service.tick()
                if records:
                    await self.process(service, records)
                await self.commit_if_due(service)
            await self.commit_if_due(service, force=True)
        except StoppedError:
            log.info("stopped while a dependency was unavailable; uncommitted records will be replayed",
                     extra={"service": cfg.service, "records": len(self.uncommitted)})
        finally:
            self.running = False

    async def process(self, service: BatchService, records: list[Record]) -> None:
        """Handle one batch and send what it produced (dead letters first); its offsets become committable."""
        outcome = await service.handle(records)
        for rejected in outcome.rejected:
            await self.dead_letter(rejected)
        if outcome.outgoing:
            await self.producer.send_many(outcome.outgoing)
        self.uncommitted.extend(records)
        self.processed += len(records)
        BATCHES.labels(self.config.service).observe(len(records))

    async def dead_letter(self, rejected: Rejected) -> None:
        """Send a rejected record to ``signals.dlq`` with its reason; one from the DLQ itself is only counted."""
        record = rejected.record
        DEAD_LETTERS.labels(self.config.service, rejected.reason).inc()
        if record.topic == self.dlq_topic:
            log.warning("unreadable dead letter skipped", extra={"service": self.config.service,
                                                                 "partition": record.partition,
                                                                 "offset": record.offset,
                                                                 "reason": rejected.reason})
            return
        key = record.key.decode(errors="replace") if record.key else None
        await self.producer.dead_letter(stage=self.config.service, reason=rejected.reason, detail=rejected.detail,
                                        source=record.topic, payload=record.value or b"", key=key,
                                        partition=record.partition, offset=record.offset)

    async def commit_if_due(self, service: BatchService, force: bool = False) -> None:
        """``before_commit`` then commit what was processed, when ``commit_every_s`` has passed (or ``force``)."""
        if not force and time.monotonic() - self._last_commit < self.config.commit_every_s:
            return
        await service.before_commit()
        self._last_commit = time.monotonic()
        if not self.uncommitted:
            return
        records, self.uncommitted = self.uncommitted, []
        try:
            await retry_async(lambda: self.consumer.commit_records(records), attempts=10, cap_s=5.0,
                              what=f"{self.config.service} commit")
            COMMITS.labels(self.config.service, "ok").inc()
        except Exception as exc:  # rebalanced away: the new owner replays; every consumer downstream is idempotent
            COMMITS.labels(self.config.service, "failed").inc()
            log.warning("commit failed; records will be replayed", extra={"service": self.config.service,
                                                                          "error": repr(exc)[:300]})
