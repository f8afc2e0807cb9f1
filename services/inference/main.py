"""Process entry point of the inference service (``bpstream inference``)."""

from __future__ import annotations

import asyncio

from bpstream.shared.logging import configure_logging
from bpstream.shared.profiling import profiled
from bpstream.shared.service import run_until_signalled


def main() -> None:
    from bpstream.services.inference.service import run_inference
    from bpstream.services.inference.settings import InferenceSettings

    settings = InferenceSettings()
    configure_logging("inference", settings.log_level, settings.log_json)

    async def run(stop: asyncio.Event) -> None:
        await run_inference(settings, stop)

    profiled("inference", lambda: run_until_signalled(run))


if __name__ == "__main__":
    main()
