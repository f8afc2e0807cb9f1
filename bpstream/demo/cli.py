"""``bpstream demo``: the whole system on a simulated clinic (the Quick start's main job)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add ``demo``."""
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
