"""Commands of the pipeline: one per service, the one-command demo and the pipeline benchmark.

Every service reads its settings from the environment (``BPSTREAM_*``), so the commands take no options;
``bpstream demo`` and ``bpstream bench pipeline`` start the whole system themselves.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

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
    """Add the service commands, ``demo`` and ``bench pipeline``."""
    for name, (module, help_text) in SERVICES.items():
        app.command(name, help=help_text + " Settings from BPSTREAM_* env; SIGTERM drains and exits.")(
            _service_command(module, help_text))

    @app.command("calibrate")
    def calibrate(
        clinic: str = typer.Option(..., "--clinic", help="Clinic id."),
        device: str = typer.Option(..., "--device", help="The patient's device id."),
        sbp: float = typer.Option(..., "--sbp", help="Cuff systolic pressure (mmHg)."),
        dbp: float = typer.Option(..., "--dbp", help="Cuff diastolic pressure (mmHg)."),
        time_: str | None = typer.Option(None, "--time",
                                         help="When the cuff measured: epoch seconds or ISO 8601 (default now)."),
        cuff_id: str = typer.Option("manual", "--cuff-id", help="Id of the cuff (or the clinician)."),
        confirmation: bool = typer.Option(False, "--confirmation/--no-confirmation",
                                          help="The reading confirms or refutes an alert."),
    ) -> None:
        """Send a cuff reading for a patient's device (MQTT, as a cuff does; BPSTREAM_MQTT_* settings).

        The bridge validates it and forwards it to the compacted ``cuff`` topic: inference recalibrates that
        device, alerting checks its alerts against it, the writer stores it (``bp_cuff``).
        """
        from bpstream.services.calibrate import cuff_message, parse_time, publish_cuff
        from bpstream.shared.settings import MqttSettings

        topic = publish_cuff(MqttSettings(), clinic, device,
                             cuff_message(sbp, dbp, parse_time(time_), cuff_id=cuff_id, confirmation=confirmation))
        typer.echo(f"published to {topic}")
    _register_alerts(app)

    @app.command("demo")
    def demo(
        patients: int = typer.Option(8, "--patients", min=2, help="Simulated patients (one crisis, one noisy)."),
        duration: float = typer.Option(120.0, "--duration", min=20.0, help="Simulated seconds of signal."),
        speed: float = typer.Option(2.0, "--speed", min=0.1, help="Simulation speed (1 = real time)."),
        report_dir: Path = typer.Option(Path("reports"), "--report-dir", help="Where the report is written."),
        seed: int = typer.Option(7, "--seed", help="Simulator seed."),
        live: bool = typer.Option(True, "--live/--no-live", help="Show the live terminal view."),
    ) -> None:
        """Run the whole system on a simulated clinic and write a report (the Quick start).

        Starts (or reuses) the local Mosquitto, Kafka and InfluxDB, creates the topics, starts every service,
        streams a simulated clinic, shows live pressures, quality, alerts and lag, then writes a Markdown
        report with plots of estimated vs true pressure and an alert timeline, and prints its path.
        """
        from bpstream.demo.run import DemoConfig, run_demo

        report = run_demo(DemoConfig(patients=patients, duration_s=duration, speed=speed,
                                     report_dir=report_dir, seed=seed, live=live))
        typer.echo(f"report: {report}")

    @bench.command("pipeline")
    def bench_pipeline(
        devices: int = typer.Option(100, "--devices", min=1, help="Simulated devices streaming at once."),
        duration: float = typer.Option(60.0, "--duration", min=10.0, help="Seconds of real-time streaming."),
        inference_workers: int = typer.Option(1, "--inference-workers", min=1,
                                               help="Inference processes in the consumer group."),
        output: Path | None = typer.Option(None, "--output", help="Also write the results as JSON here."),
        profile: bool = typer.Option(False, "--profile", help="cProfile inference, alerting and the writer."),
    ) -> None:
        """The whole system in real time: devices sustained, p50/p99 latency, consumer lag, messages lost."""
        from bpstream.demo.bench import BenchConfig, run_bench

        run_bench(BenchConfig(devices=devices, duration_s=duration, inference_workers=inference_workers,
                              output=output, profile=profile))

    @bench.command("writer")
    def bench_writer(
        points: int = typer.Option(50_000, "--points", min=1000, help="Estimate points written per round."),
        batch: int = typer.Option(5000, "--batch", min=1, help="Points per InfluxDB request."),
        rounds: int = typer.Option(3, "--rounds", min=1, help="Rounds of each variant; the best is reported."),
        url: str | None = typer.Option(None, "--url", help="InfluxDB URL (default: the local server, started)."),
    ) -> None:
        """The writer's InfluxDB path alone: encoding and writing, each against a same-process baseline."""
        from bpstream.services.writer.bench import main

        if url is None:
            from bpstream.localservers import ensure_up

            url = ensure_up().influx_url
        main(url, points, batch, rounds)

def _register_alerts(app: typer.Typer) -> None:
    """``bpstream alerts list|ack``: open alert episodes and their acknowledgement (Kafka from BPSTREAM_KAFKA_*)."""
    alerts = typer.Typer(help="Alert episodes: list the open ones, acknowledge one (stops its escalation).",
                         no_args_is_help=True)
    app.add_typer(alerts, name="alerts")

    @alerts.command("list")
    def list_episodes(
        all_: bool = typer.Option(False, "--all", help="Also resolved episodes."),
    ) -> None:
        """Open alert episodes: id, patient, kind, severity, since, acknowledgement, deliveries."""
        import asyncio
        from datetime import UTC, datetime

        from bpstream.services.notifier.episodes import episodes
        from bpstream.shared.settings import KafkaSettings

        views = asyncio.run(episodes(KafkaSettings()))
        shown = [v for v in views if all_ or v.open]
        if not shown:
            typer.echo("no open alert episodes" if not all_ else "no alert episodes")
            return
        for v in shown:
            a = v.alert
            since = datetime.fromtimestamp(a.started_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")
            ack = f"acked by {v.ack.by}" if v.ack else "UNACKNOWLEDGED"
            typer.echo(f"{a.alert_id}  {a.clinic_id}/{a.device_id}  {a.kind} {a.severity}  {a.state} since "
                       f"{since}Z  {ack}  delivered: {', '.join(v.delivered) or '-'}")

    @alerts.command("ack")
    def ack_episode(
        alert_id: str = typer.Argument(..., help="The episode's alert id (from `bpstream alerts list`)."),
        by: str = typer.Option("", "--by", help="Who acknowledges (default: $USER)."),
        note: str = typer.Option("", "--note", help="A short note stored with the acknowledgement."),
        force: bool = typer.Option(False, "--force", help="Acknowledge even an id the alerts topic lacks."),
    ) -> None:
        """Acknowledge an episode: the notifier stops escalating it."""
        import asyncio
        import getpass

        from bpstream.services.notifier.episodes import acknowledge, episodes
        from bpstream.shared.settings import KafkaSettings

        settings = KafkaSettings()
        if not force and alert_id not in {v.alert.alert_id for v in asyncio.run(episodes(settings))}:
            typer.echo(f"unknown alert id {alert_id!r} (see `bpstream alerts list --all`)", err=True)
            raise typer.Exit(1)
        ack = asyncio.run(acknowledge(settings, alert_id, by or getpass.getuser(), note))
        typer.echo(f"acknowledged {ack.alert_id} by {ack.by}")
