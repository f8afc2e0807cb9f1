"""``bpstream alerts list|ack``: the open alert episodes and their acknowledgement (a clinician's tool)."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
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
