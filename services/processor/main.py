"""Entry point of the processor process (``bpstream processor``): a Faust worker run until SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from bpstream.services.processor.app import Processor, create_topics
from bpstream.services.processor.settings import ProcessorSettings
from bpstream.shared.logging import configure_logging
from bpstream.shared.retry import retry_async
from bpstream.shared.service import run_until_signalled
from bpstream.shared.settings import log_settings
from bpstream.shared.telemetry import HealthServer

log = logging.getLogger(__name__)


async def serve(settings: ProcessorSettings, stop: asyncio.Event) -> None:
    """Create the topics, run the Faust worker until ``stop`` is set, then stop it (which commits)."""
    await retry_async(lambda: create_topics(settings), attempts=10, cap_s=5.0, what="create topics")
    processor = Processor(settings)
    port = settings.metrics_port if settings.metrics_port > 0 else -1
    async with processor.producer, HealthServer(settings.metrics_host, port, processor.ready):
        # The app is started as a service inside this loop rather than through faust.Worker, which would
        # take over the process's signal handlers and block until it is stopped.
        await processor.app.start()
        processor.started = True
        log.info("processor started", extra={"app_id": processor.app.conf.id})
        try:
            await stop.wait()
        finally:
            processor.started = False
            await processor.app.stop()
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
