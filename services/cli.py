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

    @app.command("demo")
    def demo(
        patients: int = typer.Option(8, "--patients", min=2, help="Simulated patients (one crisis, one noisy)."),
        duration: float = typer.Option(120.0, "--duration", min=20.0, help="Simulated seconds of signal."),
        speed: float = typer.Option(2.0, "--speed", min=0.1, help="Simulation speed (1 = real time)."),
        report_dir: Path = typer.Option(Path("reports"), "--report-dir", help="Where the report is written."),
        seed: int = typer.Option(7, "--seed", help="Simulator seed."),
        live: bool = typer.Option(True, "--live/--no-live", help="Show the live terminal view."),
        scenario: str = typer.Option("clinic", "--scenario",
                                     help="Scenario or mix of the patients (clinic, mixed, evaluation, ...)."),
        enrol: bool = typer.Option(True, "--enrol/--no-enrol", help="Enrol every patient with a cuff reading."),
        enrol_at: float = typer.Option(10.0, "--enrol-at", min=1.0, help="Device second of the enrolment."),
        recalibrate_every: float = typer.Option(45.0, "--recalibrate-every", min=0.0,
                                                help="Re-calibrate every this many device seconds (0: never)."),
        calibration_window: float = typer.Option(20.0, "--calibration-window", min=1.0,
                                                 help="Inference's CALIBRATION_WINDOW_S for this run (s)."),
        crisis_onset: float = typer.Option(None, "--crisis-onset",
                                           help="Crisis onset (device s); negative: random per patient."),
        paired: bool = typer.Option(False, "--paired/--no-paired",
                                    help="Also stream a never-enrolled copy of the same patients."),
        calibration_max_age: float = typer.Option(None, "--calibration-max-age", min=1.0,
                                                  help="Inference's CALIBRATION_MAX_AGE_S for this run."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="One PNG per patient in the report."),
    ) -> None:
        """Run the whole system on a simulated clinic and write a report (the Quick start).

        Starts (or reuses) the local Mosquitto, Kafka and InfluxDB, creates the topics, starts every service,
        streams a simulated clinic, shows live pressures, quality, alerts and lag, then writes a Markdown
        report with plots of estimated vs true pressure and an alert timeline, and prints its path.
        """
        from bpstream.demo.run import DemoConfig, run_demo

        report = run_demo(DemoConfig(patients=patients, duration_s=duration, speed=speed,
                                     report_dir=report_dir, seed=seed, live=live, scenario=scenario, enrol=enrol,
                                     enrol_at_s=enrol_at, recalibrate_every_s=recalibrate_every or None,
                                     crisis_onset_s=crisis_onset, paired=paired,
                                     calibration_max_age_s=calibration_max_age, plots=plots,
                                     calibration_window_s=calibration_window))
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
