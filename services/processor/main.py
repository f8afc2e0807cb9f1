"""Entry point of the processor process (``bpstream processor``): a Faust worker run until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bpstream.services.processor.faust_app import ProcessorApp, create_topics
from bpstream.services.processor.settings import ProcessorSettings
from bpstream.shared.brokerwatch import BrokerWatch
from bpstream.shared.logging import configure_logging
from bpstream.shared.retry import retry_async
from bpstream.shared.service import run_until_signalled
from bpstream.shared.settings import log_settings
from bpstream.shared.telemetry import HealthServer
from bpstream.shared.topics import SIGNALS_RAW, topic_name

log = logging.getLogger(__name__)


async def waiting_records(settings: ProcessorSettings, group_id: str) -> int:
    """Records in signals.raw past the processor group's committed offsets."""
    topic = topic_name(SIGNALS_RAW, settings.kafka.topic_prefix)
    admin = AIOKafkaAdminClient(**settings.kafka.client_kwargs())
    reader = AIOKafkaConsumer(**settings.kafka.client_kwargs(), enable_auto_commit=False)
    try:
        await admin.start()
        await reader.start()
        committed = await admin.list_consumer_group_offsets(group_id)
        partitions = [TopicPartition(topic, p) for p in range(SIGNALS_RAW.partitions)]
        ends = await reader.end_offsets(partitions)
        return sum(max(0, ends[tp] - max(committed[tp].offset, 0)) if tp in committed else ends[tp]
                   for tp in partitions)
    finally:
        await reader.stop()
        await admin.close()


async def watch_for_stall(processor: ProcessorApp, settings: ProcessorSettings, broker: BrokerWatch) -> None:
    """Re-execute the process when records wait in signals.raw and nothing was processed for a while.

    Faust's consumer has been seen to stop fetching after a restart's table recovery (the agent never
    receives a record, sometimes with the worker stuck in a rebalance). A fresh process resumes from the
    committed offsets and the changelog, like a crash restart, so nothing is lost.
    """
    limit = settings.stall_restart_s
    while True:
        await asyncio.sleep(min(5.0, limit / 3))
        # Readiness is not consulted: the stall has also shown up as a rebalance that never ends. Time while
        # the broker is lost is no stall (nothing can be processed); the limit counts from its return.
        service = processor.service
        if not service.started or not broker.ok:
            service.last_progress = time.monotonic()
            continue
        if time.monotonic() - service.last_progress < limit:
            continue
        try:
            waiting = await waiting_records(settings, processor.group_id)
        except (KafkaError, OSError) as exc:
            log.warning("stall check failed", extra={"error": repr(exc)[:200]})
            continue
        if waiting == 0:
            service.last_progress = time.monotonic()
            continue
        log.error("processor stalled: records wait but none was processed; restarting the process",
                  extra={"waiting_records": waiting, "stalled_s": round(time.monotonic() - service.last_progress)})
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.execv(sys.executable, [sys.executable, "-m", "bpstream.services.processor.main"])


async def serve(settings: ProcessorSettings, stop: asyncio.Event) -> None:
    """Create the topics, run the Faust worker until ``stop`` is set, then stop it (which commits)."""
    await retry_async(lambda: create_topics(settings), attempts=10, cap_s=5.0, what="create topics")
    processor = ProcessorApp(settings)
    service = processor.service
    port = settings.metrics_port if settings.metrics_port > 0 else -1
    # /readyz: the worker holds its partitions, and Kafka answers (a probe) and accepts the outputs.
    broker = BrokerWatch.for_kafka(settings.kafka)

    def ready() -> bool:
        return processor.ready() and broker.ok and processor.producer.available

    async with processor.producer, broker, HealthServer(settings.metrics_host, port, ready):
        # Every partition's states up front, in one read, so the first records are not held up by it.
        await service.restore_partitions(range(SIGNALS_RAW.partitions))
        await processor.start()
        log.info("processor started", extra={"app_id": processor.group_id})
        watchdog = (asyncio.create_task(watch_for_stall(processor, settings, broker))
                    if settings.stall_restart_s > 0 else None)
        try:
            await stop.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
            await processor.stop()
            # The agent finished its last batch; store what changed since the last checkpoint, so a restart
            # resumes exactly here (nothing re-read, nothing emitted twice).
            async with service.lock:
                await service.checkpoint()
            log.info("processor stopped")


def main() -> None:
    settings = ProcessorSettings()
    configure_logging("processor", settings.log_level, settings.log_json)
    for name in ("faust", "mode"):
        logging.getLogger(name).setLevel(settings.faust_loglevel.upper())
    log_settings(settings, "processor")
    run_until_signalled(lambda stop: serve(settings, stop))


if __name__ == "__main__":
    main()
