"""Process entry point of the alerting service (``bpstream alerting``)."""

from __future__ import annotations

import asyncio

from bpstream.shared.logging import configure_logging
from bpstream.shared.profiling import profiled
from bpstream.shared.service import run_until_signalled


def main() -> None:
    from bpstream.services.alerting.service import run_alerting
    from bpstream.services.alerting.settings import AlertingSettings

    settings = AlertingSettings()
    configure_logging("alerting", settings.log_level, settings.log_json)

    async def run(stop: asyncio.Event) -> None:
        await run_alerting(settings, stop)

    profiled("alerting", lambda: run_until_signalled(run))


if __name__ == "__main__":
    main()
