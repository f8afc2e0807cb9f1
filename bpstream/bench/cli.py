"""``bpstream bench pipeline`` and ``bench writer``: tools that start the system or its parts to measure them
(the processor and bridge benches run as ``python -m bpstream.bench.processor`` / ``bpstream.bench.bridge``)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add ``bench pipeline`` and ``bench writer``."""
    @bench.command("pipeline")
    def bench_pipeline(
        devices: int = typer.Option(100, "--devices", min=1, help="Simulated devices streaming at once."),
        duration: float = typer.Option(60.0, "--duration", min=10.0, help="Seconds of real-time streaming."),
        inference_workers: int = typer.Option(1, "--inference-workers", min=1,
                                               help="Inference processes in the consumer group."),
        output: Path | None = typer.Option(None, "--output", help="Also write the results as JSON here."),
        profile: bool = typer.Option(False, "--profile", help="cProfile inference, alerting and the writer."),
        gateway_batch: int = typer.Option(0, "--gateway-batch", min=0, max=256,
                                          help="Gateways of N devices, each sending a second's chunks as one "
                                               "batch message (0: one message per chunk)."),
        stagger: bool = typer.Option(True, "--stagger/--no-stagger",
                                     help="Connections publish at their own phase within each second, as "
                                          "independent devices do (--no-stagger: all at once, the worst-case "
                                          "burst)."),
    ) -> None:
        """The whole system in real time: devices sustained, p50/p99 latency, consumer lag, messages lost."""
        from bpstream.demo.bench import BenchConfig, run_bench

        run_bench(BenchConfig(devices=devices, duration_s=duration, inference_workers=inference_workers,
                              output=output, profile=profile, gateway_batch=gateway_batch,
                              stagger=stagger))

    @bench.command("writer")
    def bench_writer(
        points: int = typer.Option(50_000, "--points", min=1000, help="Estimate points written per round."),
        batch: int = typer.Option(5000, "--batch", min=1, help="Points per InfluxDB request."),
        rounds: int = typer.Option(3, "--rounds", min=1, help="Rounds of each variant; the best is reported."),
        url: str | None = typer.Option(None, "--url", help=(
            "InfluxDB URL (default: the local server, started; otherwise BPSTREAM_INFLUX_* give an admin's "
            "credentials and CA).")),
    ) -> None:
        """The writer's InfluxDB path alone: encoding and writing, each against a same-process baseline."""
        from bpstream.bench.writer import main

        if url is None:  # the local server: its admin and its WRITE-only writer user
            from bpstream.localservers import ensure_up

            servers = ensure_up()
            main(servers.influx_settings(), servers.influx_settings(service="writer"), points, batch, rounds)
        else:  # credentials and CA from BPSTREAM_INFLUX_* (an admin: the bench creates a database)
            from bpstream.shared.settings import InfluxSettings

            admin = InfluxSettings(url=url)
            main(admin, admin, points, batch, rounds)
