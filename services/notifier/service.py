"""The notifier's wiring: Kafka ``alerts`` (+ ``alerts.acks``) -> webhook and e-mail, state in ``notify.state``.

Delivery (exactly one notification per transition, also across restarts):

* on start and after every rebalance the compacted ``notify.state`` is read to its end and merged, and
  ``alerts.acks`` is read to its end (then tailed by a group-less reader: every instance sees every ack);
* for each alert record, every channel slot not yet recorded for its transition is delivered; right after a
  receiver accepted (or refused for good), the episode is written to ``notify.state`` (acks=all), and only
  when every delivery owed by a batch of alert records is recorded are their offsets committed;
* a replayed alert record finds its slots recorded and sends nothing; a delivery is repeated only if the
  process dies between the receiver's answer and the state write, and then with the same idempotency key;
* retriable errors are retried in rounds of capped, jittered backoff (``bpstream.shared.retry``); between
  rounds the alert partitions are paused (the consumer keeps polling, so it stays in its group) and the
  offsets stay uncommitted: a receiver that is down for minutes gets the notification when it returns;
* every attempt, whatever its outcome, is a ``NotificationAttempt`` record on ``notifications`` (the writer
  stores it as ``bp_notification``);
* an unacknowledged episode of an escalating severity is sent to the escalation channels ``escalate_after_s``
  after it was first handled, once, by the instance that owns its alerts partition.

Logs name alert ids, channels and outcomes, never readings, secrets or URLs with paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import Counter, Gauge

from bpstream.services.notifier.senders import DeliveryFailed, SmtpSender, WebhookSender
from bpstream.services.notifier.settings import NotifierSettings
from bpstream.services.notifier.stage import (
    UNACKNOWLEDGED,
    Delivery,
    NotifierState,
    Routing,
    email_message,
    encode_episode,
    target_name,
    webhook_body,
)
from bpstream.shared.batching import collect_batch
from bpstream.shared.consumer_loop import KafkaWatch
from bpstream.shared.errors import BpstreamError, DecodeError
from bpstream.shared.kafka import KafkaConsumer, RecoveringProducer, ensure_topics
from bpstream.shared.kafka_tools import read_latest_by_key, topic_partitions
from bpstream.shared.messages import decode_alert
from bpstream.shared.notifications import NotificationAttempt, decode_ack, encode
from bpstream.shared.retry import retry_async
from bpstream.shared.settings import log_settings
from bpstream.shared.telemetry import HealthServer
from bpstream.shared.topics import ALERT_ACKS, ALERTS, NOTIFICATIONS, NOTIFY_STATE, group_name, topic_name

log = logging.getLogger(__name__)

ALERTS_IN = Counter("bpstream_notifier_alerts_total", "Alert records consumed by the notifier")
ATTEMPTS = Counter("bpstream_notifier_attempts_total", "Delivery attempts", ["channel", "outcome"])
DELIVERED = Counter("bpstream_notifier_delivered_total", "Notifications delivered", ["channel", "transition"])
GIVEN_UP = Counter("bpstream_notifier_failed_total", "Deliveries given up (non-retriable error)",
                   ["channel", "reason"])
SKIPPED = Counter("bpstream_notifier_skipped_total", "Alert records that notify no one", ["reason"])
PENDING = Gauge("bpstream_notifier_pending_deliveries", "Deliveries waiting for a receiver")
OPEN = Gauge("bpstream_notifier_open_episodes", "Open alert episodes known to this instance")

Clock = Callable[[], int]


class NotifierService:
    """Alert batches in, deliveries out; ``pending`` holds deliveries whose receiver has not answered yet."""

    def __init__(self, settings: NotifierSettings, consumer: KafkaConsumer, producer: RecoveringProducer,
                 webhook: WebhookSender, smtp: SmtpSender | None, clock: Clock = time.time_ns) -> None:
        self.settings, self.consumer, self.producer = settings, consumer, producer
        self.webhook, self.smtp, self.clock = webhook, smtp, clock
        self.state = NotifierState(Routing(
            channels=settings.channels(), escalation_channels=settings.escalation_channels(),
            escalate_after_ns=int(settings.escalate_after_s * 1e9), escalating=settings.escalating()))
        self.pending: list[Delivery] = []
        self.uncommitted: list[ConsumerRecord[bytes, bytes]] = []
        self.assignment: set[TopicPartition] = set()
        self.attempts: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------------ state and acknowledgements
    async def restore_if_rebalanced(self) -> None:
        assignment = set(self.consumer.client.assignment())
        if assignment == self.assignment:
            return
        self.assignment = assignment
        saved = await retry_async(lambda: read_latest_by_key(self.settings.kafka, NOTIFY_STATE), attempts=10,
                                  what="read notify.state")
        bad = self.state.merge(saved)
        if bad:
            log.warning("unreadable saved episodes ignored", extra={"episodes": len(bad)})
        log.info("notifier state restored", extra={"episodes": len(saved), "partitions": len(assignment)})

    async def apply_acks(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        for record in records:
            if record.value is None:
                continue
            try:
                ack = decode_ack(record.value)
            except DecodeError as exc:
                SKIPPED.labels(exc.reason).inc()
                continue
            episode = self.state.acknowledge(ack)
            if episode is not None:
                await self.producer.send_many([(NOTIFY_STATE, encode_episode(episode), episode.alert_id)])
                log.info("episode acknowledged", extra={"alert_id": ack.alert_id, "by": ack.by})

    # ------------------------------------------------------------------ alerts
    async def handle(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        now = self.clock()
        for record in records:
            ALERTS_IN.inc()
            try:
                alert = decode_alert(record.value or b"")
            except DecodeError as exc:
                SKIPPED.labels(exc.reason).inc()
                key = record.key.decode(errors="replace") if record.key else None
                await self.producer.dead_letter(stage="notifier", reason=exc.reason, detail=str(exc),
                                                source=record.topic, payload=record.value or b"", key=key,
                                                partition=record.partition, offset=record.offset)
                continue
            due = self.state.observe(alert, record.value or b"", record.partition, now)
            if not due and alert.state not in ("raised", "escalated", "resolved"):
                SKIPPED.labels(f"state_{alert.state}"[:40]).inc()
            self._queue(due)
        self.uncommitted.extend(records)

    def _queue(self, deliveries: list[Delivery]) -> None:
        waiting = {(d.key, d.channel) for d in self.pending}
        self.pending.extend(d for d in deliveries if (d.key, d.channel) not in waiting)

    def queue_escalations(self) -> None:
        owned = {tp.partition for tp in self.assignment}
        self._queue(self.state.due_escalations(self.clock(), owned))

    # ------------------------------------------------------------------ delivery
    def _target(self, channel: str) -> str:
        s = self.settings
        return {"webhook": s.webhook_url, "escalation-webhook": s.escalation_webhook_url,
                "email": s.smtp_to, "escalation-email": s.escalation_email_to}[channel]

    async def _send(self, delivery: Delivery) -> int:
        target = self._target(delivery.channel)
        if delivery.channel.endswith("webhook"):
            return await self.webhook.send(target, webhook_body(delivery, self.clock()), delivery.key)
        if self.smtp is None:
            raise DeliveryFailed("smtp is not configured", reason="config", retriable=False)
        recipients = (self.settings.recipients() if delivery.channel == "email"
                      else self.settings.escalation_recipients())
        return await self.smtp.send(email_message(delivery, self.settings.smtp_from, recipients), recipients)

    async def _record_attempt(self, delivery: Delivery, outcome: str, reason: str, status: int) -> None:
        slot = (delivery.key, delivery.channel)
        self.attempts[slot] = number = self.attempts.get(slot, 0) + 1
        alert = delivery.alert
        attempt = NotificationAttempt(
            alert_id=alert.alert_id, clinic_id=alert.clinic_id, device_id=alert.device_id, kind=alert.kind,
            severity=alert.severity, transition=delivery.transition, channel=delivery.channel,
            idempotency_key=delivery.key, attempt=number, outcome=outcome, at_ns=self.clock(),
            target=target_name(self._target(delivery.channel)), reason=reason[:200], status=status)
        ATTEMPTS.labels(delivery.channel, outcome).inc()
        await self.producer.send_many([(NOTIFICATIONS, encode(attempt), alert.device_id)])

    async def deliver(self, delivery: Delivery) -> bool:
        """One round of attempts; True when the delivery is settled (delivered or given up) and recorded."""

        async def once() -> None:
            try:
                status = await self._send(delivery)
            except DeliveryFailed as exc:
                await self._record_attempt(delivery, "retry" if exc.retriable else "failed", exc.reason,
                                           exc.status)
                raise
            await self._record_attempt(delivery, "delivered", "", status)

        s = self.settings
        try:
            await retry_async(once, attempts=s.retry_attempts, base_s=s.retry_base_s, cap_s=s.retry_cap_s,
                              what=f"notify {delivery.channel}")
        except BpstreamError as exc:
            if exc.retriable:
                log.warning("receiver unavailable; will retry",
                            extra={"alert_id": delivery.alert.alert_id, "channel": delivery.channel,
                                   "transition": delivery.transition, "reason": exc.reason})
                return False
            episode = self.state.record(delivery, delivered=False, at_ns=self.clock(), reason=exc.reason)
            GIVEN_UP.labels(delivery.channel, exc.reason).inc()
            log.error("notification refused; given up",
                      extra={"alert_id": delivery.alert.alert_id, "channel": delivery.channel,
                             "transition": delivery.transition, "reason": exc.reason})
        else:
            episode = self.state.record(delivery, delivered=True, at_ns=self.clock())
            DELIVERED.labels(delivery.channel, delivery.transition).inc()
            log.info("notification delivered",
                     extra={"alert_id": delivery.alert.alert_id, "channel": delivery.channel,
                            "transition": delivery.transition, "severity": delivery.alert.severity})
        await self.producer.send_many([(NOTIFY_STATE, encode_episode(episode), episode.alert_id)])
        return True

    async def deliver_pending(self) -> None:
        """Try every pending delivery once (a round each, channels concurrently); keep those still owed."""
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        settled = await asyncio.gather(*(self.deliver(d) for d in batch))
        self.pending = [d for d, ok in zip(batch, settled, strict=True) if not ok] + self.pending
        PENDING.set(len(self.pending))
        OPEN.set(len(self.state.open_episodes()))

    async def commit_if_settled(self) -> bool:
        """Commit the alert records consumed so far once nothing they owe is pending."""
        if any(d.transition != UNACKNOWLEDGED for d in self.pending):
            return False
        if self.uncommitted:
            try:
                await retry_async(lambda: self.consumer.commit_records(self.uncommitted), attempts=10,
                                  what="commit")
            except Exception as exc:  # rebalanced away: the new owner replays; the state prevents repeats
                log.warning("commit failed; alerts will be replayed", extra={"error": repr(exc)[:300]})
            self.uncommitted = []
        return True


class AckReader:
    """Tails every partition of ``alerts.acks`` without a consumer group (each instance sees every ack)."""

    def __init__(self, settings: NotifierSettings) -> None:
        self.settings = settings
        self._reader = AIOKafkaConsumer(**settings.kafka.client_kwargs(), enable_auto_commit=False)

    async def start(self) -> None:
        admin = AIOKafkaAdminClient(**self.settings.kafka.client_kwargs())
        await admin.start()
        try:
            partitions = await topic_partitions(admin, [topic_name(ALERT_ACKS, self.settings.kafka.topic_prefix)])
        finally:
            await admin.close()
        await self._reader.start()
        self._reader.assign(partitions)
        if partitions:
            await self._reader.seek_to_beginning(*partitions)

    async def stop(self) -> None:
        await self._reader.stop()

    async def poll(self, timeout_ms: int = 0) -> list[ConsumerRecord[bytes, bytes]]:
        batches = await self._reader.getmany(timeout_ms=timeout_ms)
        return [r for records in batches.values() for r in records]

    async def read_to_end(self) -> list[ConsumerRecord[bytes, bytes]]:
        partitions = list(self._reader.assignment())
        end = await self._reader.end_offsets(partitions) if partitions else {}
        out: list[ConsumerRecord[bytes, bytes]] = []
        remaining = set(partitions)
        while remaining:
            out.extend(await self.poll(500))
            for tp in list(remaining):
                if await self._reader.position(tp) >= end[tp]:
                    remaining.discard(tp)
        return out


async def run_notifier(settings: NotifierSettings, stop: asyncio.Event, clock: Clock = time.time_ns) -> None:
    """Run until ``stop`` is set, then settle what it can, commit and return."""
    log_settings(settings, "notifier")
    any_webhook = settings.webhook_url or settings.escalation_webhook_url
    if any_webhook and not settings.webhook_secret.get_secret_value():
        raise BpstreamError("a webhook needs BPSTREAM_NOTIFY_WEBHOOK_SECRET to sign its requests",
                                reason="config")
    if not settings.channels():
        log.warning("no channel configured (BPSTREAM_NOTIFY_WEBHOOK_URL, BPSTREAM_NOTIFY_SMTP_HOST/_TO): "
                    "alerts are consumed but reach no one")
    ready = False
    await retry_async(lambda: ensure_topics(settings.kafka, [ALERTS, NOTIFY_STATE, ALERT_ACKS, NOTIFICATIONS]),
                      attempts=10, what="create notifier topics")
    smtp = (SmtpSender(settings.smtp_host, settings.smtp_port, settings.smtp_user,
                       settings.smtp_password.get_secret_value(), settings.smtp_starttls, settings.smtp_timeout_s)
            if settings.smtp_host else None)
    acks = AckReader(settings)
    # Ready while running, Kafka answers (``KafkaWatch``, as in the shared loop) and sends succeed (``ready`` is
    # false until every name the check uses is bound).
    async with HealthServer(settings.metrics_host, settings.metrics_port,
                            lambda: ready and watch.reachable and producer.available), \
            RecoveringProducer(settings.kafka) as producer, \
            WebhookSender(settings.webhook_secret.get_secret_value().encode(), settings.webhook_timeout_s) \
            as webhook, \
            KafkaConsumer(settings.kafka, [ALERTS], group_name(settings.group_id, settings.kafka),
                          max_poll_records=settings.batch_max_size) as consumer, \
            KafkaWatch(settings.kafka, consumer, "notifier") as watch:
        await acks.start()
        service = NotifierService(settings, consumer, producer, webhook, smtp, clock)
        await service.apply_acks(await acks.read_to_end())

        async def fetch(timeout_s: float, max_items: int) -> list[ConsumerRecord[bytes, bytes]]:
            return await consumer.getmany(int(timeout_s * 1000), max_items)

        ready = True
        try:
            while not stop.is_set():
                if await service.commit_if_settled():
                    consumer.client.resume(*consumer.client.assignment())
                    records = await collect_batch(fetch, max_size=settings.batch_max_size,
                                                  max_wait_s=settings.batch_max_wait_ms / 1000,
                                                  idle_poll_s=settings.tick_s, stop=stop)
                else:  # receivers owe deliveries: keep polling (group membership) without taking new alerts
                    consumer.client.pause(*consumer.client.assignment())
                    records = await consumer.getmany(0)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), settings.round_pause_s)
                await service.restore_if_rebalanced()
                if records:
                    await service.handle(records)
                await service.apply_acks(await acks.poll())
                service.queue_escalations()
                await service.deliver_pending()
            await service.commit_if_settled()
        finally:
            ready = False
            await acks.stop()
    log.info("notifier stopped")
