"""Process entry point of the notifier (``bpstream notifier``)."""

from __future__ import annotations

import asyncio

from bpstream.shared.logging import configure_logging
from bpstream.shared.service import run_until_signalled


def main() -> None:
    from bpstream.services.notifier.service import run_notifier
    from bpstream.services.notifier.settings import NotifierSettings

    settings = NotifierSettings()
    configure_logging("notifier", settings.log_level, settings.log_json)

    async def run(stop: asyncio.Event) -> None:
        await run_notifier(settings, stop)

    run_until_signalled(run)


if __name__ == "__main__":
    main()
