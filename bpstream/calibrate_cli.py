"""``bpstream calibrate``: send a cuff reading for a patient's device, as a clinic's cuff does."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add ``calibrate``."""
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
        from bpstream.calibrate import cuff_message, parse_time, publish_cuff
        from bpstream.shared.settings import MqttSettings

        topic = publish_cuff(MqttSettings(), clinic, device,
                             cuff_message(sbp, dbp, parse_time(time_), cuff_id=cuff_id, confirmation=confirmation))
        typer.echo(f"published to {topic}")
