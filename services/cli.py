"""Commands of the pipeline's deployables: one per service.

Every service reads its settings from the environment (``BPSTREAM_*``), so the commands take no options.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import typer

#: ``bpstream <name>`` -> the module whose ``main()`` runs that service.
SERVICES: dict[str, tuple[str, str]] = {
    "bridge": ("bpstream.services.bridge.main", "MQTT -> Kafka signals.raw (validates, dead-letters bad input)."),
    "processor": ("bpstream.services.processor.main",
                  "Faust: reassemble chunks, filter, score quality, emit model windows."),
    "inference": ("bpstream.services.inference.main",
                  "Kafka windows -> batched ResNet-LSTM (TorchScript/ONNX, CPU/GPU) -> estimates."),
    "alerting": ("bpstream.services.alerting.main", "Kafka estimates -> per-patient alert episodes -> alerts."),
    "writer": ("bpstream.services.writer.main",
               "Kafka estimates/alerts/quality/DLQ -> InfluxDB (batched, retried, idempotent)."),
    "notifier": ("bpstream.services.notifier.main",
                 "Kafka alerts -> signed webhook and e-mail, once per transition; escalates unacknowledged ones."),
}


def _service_command(module: str, help_text: str) -> Callable[[], None]:
    def command() -> None:
        importlib.import_module(module).main()

    command.__doc__ = help_text + " Settings come from BPSTREAM_* environment variables; SIGTERM drains."
    return command


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add one command per service."""
    for name, (module, help_text) in SERVICES.items():
        app.command(name, help=help_text + " Settings from BPSTREAM_* env; SIGTERM drains and exits.")(
            _service_command(module, help_text))
