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
