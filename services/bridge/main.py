"""Entry point of the bridge process (``bpstream bridge``): settings from the environment, runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging

from bpstream.services.bridge.service import BridgeService
from bpstream.services.bridge.settings import BridgeSettings
from bpstream.shared.logging import configure_logging
from bpstream.shared.service import run_until_signalled
from bpstream.shared.settings import log_settings
from bpstream.shared.telemetry import HealthServer

log = logging.getLogger(__name__)


async def serve(settings: BridgeSettings, stop: asyncio.Event) -> None:
    """Run one bridge with its health server until ``stop`` is set; drain and disconnect on the way out."""
    async with BridgeService(settings) as bridge:
        port = settings.metrics_port if settings.metrics_port > 0 else -1
        async with HealthServer(settings.metrics_host, port, bridge.ready):
            await bridge.run(stop)


def main() -> None:
    settings = BridgeSettings()
    configure_logging("bridge", settings.log_level, settings.log_json)
    log_settings(settings, "bridge")
    run_until_signalled(lambda stop: serve(settings, stop))


if __name__ == "__main__":
    main()
