"""The ``bpstream`` command: one entry point for the servers, the simulator, the model and every service.

Each area registers its own commands (``register(app, bench)`` in its ``cli`` module), so this file only
composes them. Heavy imports (torch, faust) happen inside the commands, so ``bpstream --help`` stays fast.
"""

from __future__ import annotations

import typer

from bpstream import alerts_cli, calibrate_cli
from bpstream.bench import cli as bench_cli
from bpstream.demo import cli as demo_cli
from bpstream.devices import cli as devices_cli
from bpstream.localservers import cli as servers_cli
from bpstream.services import cli as services_cli
from bpstream.simulators import cli as simulators_cli
from bpstream.training import cli as training_cli

app = typer.Typer(
    name="bpstream",
    help="Continuous cuffless blood-pressure monitoring: wearables -> MQTT -> Kafka -> ResNet-LSTM -> InfluxDB.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
bench = typer.Typer(help="Benchmarks that print ratios against a baseline run in the same process.",
                    no_args_is_help=True)
app.add_typer(bench, name="bench")

for area in (servers_cli, simulators_cli, training_cli, services_cli, calibrate_cli, alerts_cli, demo_cli,
             devices_cli, bench_cli):
    area.register(app, bench)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
