"""The MQTT-to-Kafka bridge service: paho-mqtt (MQTT 5, shared subscription, manual QoS 1 acks) into Kafka.

Flow of one message: paho's network thread calls ``on_message``, which hands ``(topic, payload, mid, qos)``
to the event loop (``run_coroutine_threadsafe``) into a bounded queue; the forwarding task takes what is
queued (up to ``batch_max``), validates each payload (``stage.validate_payload``), produces the valid ones
byte for byte to ``signals.raw`` keyed by device and the invalid ones to ``signals.dlq``, waits until Kafka
acknowledged all of them, and only then acknowledges the MQTT messages. A message is therefore either in
Kafka or still unacknowledged in the broker's session, which redelivers it after a reconnect or restart.

Gateway batches (``bpstream/<clinic>/gateway/<gateway>/batch``, ``shared.gateway``) are split into the same
per-chunk records (``batches.split_batch``: each chunk validated, limited and dead-lettered on its own); the
MQTT message is acknowledged once all of its records are in Kafka.

Cuff readings (``bpstream/<clinic>/<device>/cuff``, JSON) take the same path: validated
(``stage.validate_cuff``), forwarded as a normalised ``CuffReading`` to the compacted ``cuff`` topic keyed by
``clinic/device``, or dead-lettered with the reason (``bpstream_bridge_rejected_total{reason="cuff_..."}``).

Backpressure: the broker sends at most ``max_in_flight`` unacknowledged QoS 1 messages (MQTT 5 Receive
Maximum), so the queue never holds more; should a broker ignore that, ``on_message`` blocks paho's thread
until there is room, so the socket stops being read instead of memory growing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from bpstream.services.bridge.batches import raw_records, split_batch
from bpstream.services.bridge.limits import RATE_LIMITED, LimitChecker
from bpstream.services.bridge.settings import BridgeSettings
from bpstream.services.bridge.stage import Rejection, device_of, validate_cuff, validate_payload
from bpstream.shared.errors import BpstreamError
from bpstream.shared.kafka import OutgoingRecord, RecoveringProducer, ensure_topics
from bpstream.shared.messages import MAX_CHUNK_BYTES, CuffReading, DeadLetter, SignalChunk, encode_json
from bpstream.shared.mqtt import configure_client
from bpstream.shared.retry import backoff_delay, retry_async
from bpstream.shared.service import Component
from bpstream.shared.topics import (
    CUFF,
    SIGNALS_DLQ,
    SIGNALS_RAW,
    cuff_key,
    device_key,
    mqtt_cuff_topic,
    mqtt_gateway_topic,
    mqtt_shared_subscription,
    mqtt_signals_topic,
    parse_gateway_topic,
)

log = logging.getLogger(__name__)

STAGE: Final = "bridge"


class BridgeMetrics:
    """Prometheus metrics of one bridge (a registry per instance keeps tests independent)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.received = Counter("bpstream_bridge_received_total", "MQTT messages received", registry=registry)
        self.forwarded = Counter(
            "bpstream_bridge_forwarded_total", "Chunks Kafka accepted into signals.raw", registry=registry
        )
        self.cuff_forwarded = Counter(
            "bpstream_bridge_cuff_forwarded_total", "Cuff readings Kafka accepted into cuff", registry=registry
        )
        self.rejected = Counter(
            "bpstream_bridge_rejected_total",
            "Payloads dead-lettered, by reason",
            ["reason"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "bpstream_bridge_in_flight", "MQTT messages received and not yet acknowledged", registry=registry
        )
        self.produce_seconds = Histogram(
            "bpstream_bridge_produce_seconds",
            "Time for Kafka to accept one batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.batch_size = Histogram(
            "bpstream_bridge_batch_size",
            "Messages per Kafka batch",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class Incoming:
    """One MQTT message as handed from paho's thread to the event loop."""

    topic: str
    payload: bytes
    mid: int
    qos: int


class BridgeService(Component):
    """Async context manager: connects Kafka and MQTT on enter; :meth:`run` forwards until ``stop`` is set."""

    def __init__(self, settings: BridgeSettings, *, registry: CollectorRegistry = REGISTRY) -> None:
        self.settings = settings
        self.metrics = BridgeMetrics(registry)
        # Replaced by a fresh producer when the idempotent one cannot recover (broker lost its producer state
        # after a SIGKILL); retries capped and jittered; ``available`` feeds readiness.
        self.producer = RecoveringProducer(settings.kafka)
        self._queue: asyncio.Queue[Incoming] = asyncio.Queue(maxsize=settings.max_in_flight)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._mqtt_connected = threading.Event()
        self._producer_started = False
        self._closing = threading.Event()
        self._in_flight = 0
        #: Set once stopping: a batch Kafka still refuses after this monotonic time stays unacknowledged.
        self._abandon_at: float | None = None
        #: Retire mode: set once the broker confirmed the unsubscription; monotonic time of the last message.
        self._unsubscribed = threading.Event()
        self._last_message_at = time.monotonic()
        self._limits = LimitChecker(settings.device_limits())

    # -- lifecycle ------------------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Readiness: connected to MQTT, the Kafka producer started, and Kafka accepting sends (false from the
        first failed send until one succeeds again: 503 while a broker is lost, 200 again without a restart)."""
        return self._mqtt_connected.is_set() and self._producer_started and self.producer.available

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await retry_async(
            lambda: ensure_topics(self.settings.kafka, [SIGNALS_RAW, SIGNALS_DLQ, CUFF]),
            attempts=10,
            cap_s=5.0,
            what="ensure topics",
        )
        await self.producer.start()
        self._producer_started = True
        self._client = self._make_client()
        self._client.connect_async(
            self.settings.mqtt.host,
            self.settings.mqtt.port,
            keepalive=self.settings.mqtt.keepalive_s,
            clean_start=False,
            properties=self._connect_properties(),
        )
        self._client.loop_start()
        log.info(
            "bridge started",
            extra={"client_id": self.settings.client_id, "max_in_flight": self.settings.max_in_flight},
        )

    async def stop(self) -> None:
        self._closing.set()
        if self._client is not None:
            # Messages still queued are not acknowledged: the broker keeps them in the session and
            # redelivers them when a bridge with this client id reconnects.
            self._client.disconnect()
            await asyncio.to_thread(self._client.loop_stop)
            self._client = None
        self._mqtt_connected.clear()
        if self._producer_started:
            self._producer_started = False
            await self.producer.stop()
        log.info("bridge stopped", extra={"left_unacknowledged": self._queue.qsize()})


    # -- MQTT (paho's thread) -------------------------------------------------------------------------------

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # Retiring: the session ends when this connection closes (after what it held was forwarded).
        props.SessionExpiryInterval = 0 if self.settings.retire else self.settings.session_expiry_s
        props.ReceiveMaximum = self.settings.max_in_flight
        return props

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.settings.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        configure_client(client, self.settings.mqtt)  # credentials and TLS (CA, client cert) from settings
        client.reconnect_delay_set(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        client.max_inflight_messages_set(self.settings.max_in_flight)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_unsubscribe = self._on_unsubscribe
        return client

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.warning("mqtt connect refused", extra={"reason": str(reason)})
            return
        # Subscribing again when the session survived is harmless and covers an expired session.
        topic_filter = mqtt_signals_topic(self.settings.clinic, "+")
        cuff_filter = mqtt_cuff_topic(self.settings.clinic, "+")
        filters = [mqtt_shared_subscription(self.settings.share_group, topic_filter),
                   mqtt_shared_subscription(self.settings.share_group, cuff_filter),
                   mqtt_shared_subscription(self.settings.share_group,
                                            mqtt_gateway_topic(self.settings.clinic, "+"))]
        if self.settings.retire:
            # Leave the share group: no new messages are routed to this session; what it holds still comes.
            client.unsubscribe(filters)
        else:
            client.subscribe([(f, 1) for f in filters])
        self._mqtt_connected.set()
        log.info("mqtt connected", extra={"session_present": flags.session_present})

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._mqtt_connected.clear()
        if not self._closing.is_set():
            log.warning("mqtt disconnected; reconnecting", extra={"reason": str(reason)})

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                        properties: Properties | None) -> None:
        self._last_message_at = time.monotonic()
        self._unsubscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._last_message_at = time.monotonic()
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        item = Incoming(message.topic, bytes(message.payload), message.mid, message.qos)
        future = asyncio.run_coroutine_threadsafe(self._enqueue(item), loop)
        while not self._closing.is_set():
            try:
                future.result(timeout=1.0)
                return
            except TimeoutError:
                continue  # queue full: keep paho's thread (and so the socket) waiting
        future.cancel()

    async def _enqueue(self, item: Incoming) -> None:
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        self.metrics.received.inc()
        await self._queue.put(item)

    # -- forwarding (event loop) ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Forward batches until ``stop`` is set, then finish what was received (within the drain timeout).

        Retiring, it also stops by itself once the broker confirmed the unsubscription, everything received
        is acknowledged and nothing arrived for ``retire_idle_s``."""
        retire = asyncio.create_task(self._retired(stop)) if self.settings.retire else None
        while not stop.is_set():
            batch = await self._next_batch(stop)
            if batch:
                await self._forward(batch)
        deadline = self._abandon_at = time.monotonic() + self.settings.drain_timeout_s
        while not self._queue.empty() and time.monotonic() < deadline:
            await self._forward(self._take(self.settings.batch_max))
        if retire is not None:
            retire.cancel()

    async def _retired(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(0.2)
            idle = time.monotonic() - self._last_message_at
            if self._unsubscribed.is_set() and self._in_flight == 0 and idle >= self.settings.retire_idle_s:
                log.info("retired: the session held nothing more; ending it", extra={
                    "client_id": self.settings.client_id})
                stop.set()

    async def _next_batch(self, stop: asyncio.Event) -> list[Incoming]:
        if self._queue.empty():
            getter = asyncio.ensure_future(self._queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if getter not in done:
                getter.cancel()
                return []
            first = [getter.result()]
        else:
            first = []
        return first + self._take(self.settings.batch_max - len(first))

    def _take(self, n: int) -> list[Incoming]:
        items: list[Incoming] = []
        while len(items) < n and not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    async def _forward(self, batch: list[Incoming]) -> None:
        """Send the batch to Kafka (retrying until it is accepted), then acknowledge it over MQTT."""
        records: list[OutgoingRecord] = []
        rejected: list[str] = []
        cuffs = 0
        now = time.time_ns()
        limits = self.settings.cuff_limits()
        time_limits = self.settings.device_time_limits()
        mono = time.monotonic()
        forwarded = 0
        for item in batch:
            if item.topic.endswith("/batch"):
                forwarded += self._split(item, records, rejected, now, mono)
                continue
            try:
                limited = self._limits.check(device_of(item.topic), len(item.payload), mono)
                if limited is not None:
                    verdict: CuffReading | Rejection | SignalChunk = limited
                elif item.topic.endswith("/cuff"):
                    verdict = validate_cuff(item.topic, item.payload, now, limits)
                else:
                    verdict = validate_payload(item.topic, item.payload, self.settings.allowed_sample_rates,
                                               now_ns=now, time_limits=time_limits)
            except Exception as exc:  # a bug, not bad input: dead-letter rather than crash-loop on redelivery
                log.exception("validation failed")
                verdict = Rejection("internal_error", f"{type(exc).__name__}: {exc}")
            if isinstance(verdict, Rejection):
                records.append((SIGNALS_DLQ, self._dead_letter(item.topic, item.payload, verdict, now), STAGE))
                rejected.append(verdict.reason)
            elif isinstance(verdict, CuffReading):
                records.append((CUFF, encode_json(verdict), cuff_key(verdict.clinic_id, verdict.device_id)))
                cuffs += 1
            else:
                records.append((SIGNALS_RAW, item.payload, device_key(verdict.clinic_id, verdict.device_id)))
                forwarded += 1
        started = time.perf_counter()
        attempt = 0
        while True:
            try:
                await self.producer.send_many(records)
                break
            except BpstreamError as exc:
                # Not acknowledged yet, so nothing is lost by waiting: retry with capped backoff until Kafka
                # is back. When shutting down, give up after the drain timeout: the broker keeps the messages.
                if self._abandon_at is not None and time.monotonic() > self._abandon_at:
                    log.error(
                        "kafka unavailable at shutdown; leaving batch unacknowledged",
                        extra={"batch": len(batch), "reason": exc.reason},
                    )
                    return
                attempt += 1
                delay = backoff_delay(attempt - 1)  # the shared capped, full-jitter formula
                log.warning(
                    "kafka send failed; retrying",
                    extra={"reason": exc.reason, "attempt": attempt, "batch": len(records), "delay_s": delay},
                )
                await asyncio.sleep(delay)
        self.metrics.produce_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(batch))
        client = self._client
        for item in batch:
            if client is not None and item.qos > 0:
                client.ack(item.mid, item.qos)
        self._in_flight -= len(batch)
        self.metrics.in_flight.set(self._in_flight)
        self.metrics.forwarded.inc(forwarded)
        self.metrics.cuff_forwarded.inc(cuffs)
        for reason in rejected:
            self.metrics.rejected.labels(reason=reason).inc()
        if rejected:
            log.info("dead-lettered payloads", extra={"count": len(rejected), "reasons": sorted(set(rejected))})

    def _split(self, item: Incoming, records: list[OutgoingRecord],
               rejected: list[str], now: int, mono: float) -> int:
        """Append a gateway batch's records (its chunks, or one dead letter); return the chunks forwarded."""
        try:
            verdicts = split_batch(item.topic, item.payload, self.settings.allowed_sample_rates, self._limits,
                                   mono=mono, now_ns=now, time_limits=self.settings.device_time_limits())
        except Exception as exc:  # a bug, not bad input (see _forward)
            log.exception("batch validation failed")
            verdicts = Rejection("internal_error", f"{type(exc).__name__}: {exc}")
        if isinstance(verdicts, Rejection):
            records.append((SIGNALS_DLQ, self._dead_letter(item.topic, item.payload, verdicts, now), STAGE))
            rejected.append(verdicts.reason)
            return 0
        good: list[tuple[bytes, SignalChunk]] = []
        for one in verdicts:
            if isinstance(one.verdict, Rejection):
                records.append((SIGNALS_DLQ, self._dead_letter(item.topic, one.payload, one.verdict, now), STAGE))
                rejected.append(one.verdict.reason)
            else:
                good.append((one.payload, one.verdict))
        if good:
            clinic_id, gateway_id = parse_gateway_topic(item.topic)  # split_batch checked it
            records.extend(raw_records(clinic_id, gateway_id, good, batched=self.settings.raw_batches))
        return len(good)

    @staticmethod
    def _dead_letter(source: str, payload: bytes, rejection: Rejection, now_ns: int) -> bytes:
        detail = rejection.detail
        if rejection.reason == RATE_LIMITED:
            payload = b""  # a flood must not fill the dead-letter topic: the reason and the source suffice
        elif len(payload) > MAX_CHUNK_BYTES:
            # Keep the record under Kafka's message size limit: the head is enough to diagnose it.
            detail = f"{detail} (payload truncated from {len(payload)} bytes)"
            payload = payload[:MAX_CHUNK_BYTES]
        record = DeadLetter(
            stage=STAGE,
            reason=rejection.reason,
            detail=detail[:1000],
            source=source,
            payload=payload,
            key=None,
            received_ns=now_ns,
        )
        return encode_json(record)
