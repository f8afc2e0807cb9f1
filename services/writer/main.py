"""Process entry point of the InfluxDB writer (``bpstream writer``)."""

from __future__ import annotations

import asyncio
import logging

from bpstream.shared.logging import configure_logging
from bpstream.shared.profiling import profiled
from bpstream.shared.service import run_until_signalled


def main() -> None:
    from bpstream.services.writer.service import run_writer
    from bpstream.services.writer.settings import WriterSettings

    settings = WriterSettings()
    configure_logging("writer", settings.log_level, settings.log_json)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per write request is noise

    async def run(stop: asyncio.Event) -> None:
        await run_writer(settings, stop)

    profiled("writer", lambda: run_until_signalled(run))


if __name__ == "__main__":
    main()
