"""``bpstream simulate ...`` (fleet, replay, dataset, calibrate, scenarios) and ``bpstream bench simulator``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import typer

from bpstream.shared.errors import BpstreamError

if TYPE_CHECKING:
    from bpstream.shared.settings import MqttSettings

simulate = typer.Typer(help="The wearable simulator: MQTT fleets, replays of recordings, training datasets.",
                       no_args_is_help=True)


def _broker(url: str | None) -> MqttSettings:
    """``mqtts://[user:pass@]host[:port]`` (or mqtt:// with TLS off); without a URL, the BPSTREAM_MQTT_* settings
    (TLS, CA file, account)."""
    from pydantic import SecretStr

    from bpstream.shared.settings import MqttSettings

    settings = MqttSettings()
    if not url:
        return settings
    parsed = urlparse(url if "://" in url else f"mqtts://{url}")
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parsed.hostname:
        raise typer.BadParameter(f"broker URL must look like mqtts://host:port, got {url!r}")
    tls = parsed.scheme in ("mqtts", "ssl")
    password = SecretStr(parsed.password) if parsed.password else settings.password
    return settings.model_copy(update={"host": parsed.hostname, "port": parsed.port or (8883 if tls else 1883),
                                       "username": parsed.username or settings.username, "password": password,
                                       "tls": tls})


def _fail(exc: BpstreamError) -> None:
    typer.secho(f"error ({exc.reason}): {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@simulate.command("fleet")
def fleet_cmd(
    devices: int = typer.Option(10, help="Number of devices."),
    broker: str = typer.Option(None, help="mqtts://[user:pass@]host:port (default: the BPSTREAM_MQTT_* settings)."),
    speed: float = typer.Option(1.0, help="Chunks of 1 s published every 1/speed s."),
    duration: float = typer.Option(120.0, help="Device seconds to simulate."),
    scenario: str = typer.Option("mixed", help="Scenario or mix (see `bpstream simulate scenarios`)."),
    seed: int = typer.Option(0),
    clinic: str = typer.Option("clinic-1"),
    prefix: str = typer.Option("dev", help="Device id prefix."),
    loss_rate: float = typer.Option(0.0), duplicate_rate: float = typer.Option(0.0),
    reorder_rate: float = typer.Option(0.0), clock_drift_ppm: float = typer.Option(0.0),
    reconnect_every: float = typer.Option(None, help="Drop every connection about this often (device s)."),
    burst_every: float = typer.Option(None, help="Stall the link about this often (device s)..."),
    burst_len: float = typer.Option(5.0, help="...for this long, then send the backlog at once."),
    crisis_onset: float = typer.Option(30.0, help="Device second at which crisis/hypotension episodes start."),
    connections: int = typer.Option(None, help="MQTT connections (default: per device up to 100 devices)."),
    gateway_batch: int = typer.Option(0, min=0, max=256,
                                      help="Each connection acts as a clinic gateway and sends its chunks of a "
                                           "second as batches of at most N (0: one message per chunk)."),
    truth: Path = typer.Option(None, help="Write ground truth (JSON lines) here."),
    enrol: bool = typer.Option(True, "--enrol/--no-enrol",
                               help="Enrol each patient with a simulated cuff reading on its cuff topic."),
    enrol_at: float = typer.Option(10.0, help="Device second of the enrolment reading."),
    recalibrate_every: float = typer.Option(None, help="Re-calibrate every this many device seconds."),
    cuff_sd: float = typer.Option(5.0, help="SD of the simulated cuff's error (mmHg)."),
) -> None:
    """Publish a simulated fleet over MQTT v5, QoS 1 (and its cuff readings: enrolment, re-calibration)."""
    from bpstream.simulators.fleet import FleetConfig, mqtt_connection, run_fleet

    connection = mqtt_connection(_broker(broker))
    try:
        cfg = FleetConfig(**connection, devices=devices, duration_s=duration, speed=speed, clinic_id=clinic,
                          device_prefix=prefix, scenario=scenario, seed=seed, loss_rate=loss_rate,
                          duplicate_rate=duplicate_rate, reorder_rate=reorder_rate, clock_drift_ppm=clock_drift_ppm,
                          reconnect_every_s=reconnect_every, burst_every_s=burst_every, burst_len_s=burst_len,
                          crisis_onset_s=crisis_onset, connections=connections, truth_path=truth,
                          enrol=enrol, enrol_at_s=enrol_at, recalibrate_every_s=recalibrate_every,
                          cuff_sd_mmhg=cuff_sd, gateway_batch=gateway_batch)
        report = asyncio.run(run_fleet(cfg))
    except BpstreamError as exc:
        _fail(exc)
        return
    counts: dict[str, int] = {}
    for name in report.scenarios.values():
        counts[name] = counts.get(name, 0) + 1
    typer.echo(json.dumps({
        "devices": len(report.device_ids), "chunks_per_device": report.chunks_per_device,
        "published": report.published, "publishes_incl_duplicates": report.publishes,
        "lost_by_design": sum(len(v) for v in report.lost_by_design.values()),
        "duplicates": sum(len(v) for v in report.duplicates.values()),
        "reordered": sum(len(v) for v in report.reordered.values()), "reconnects": report.reconnects,
        "unacked": report.unacked, "wall_s": round(report.wall_s, 2), "max_lag_s": round(report.max_lag_s, 3),
        "cuff_readings": report.cuff_readings, "scenarios": counts}, indent=1))


@simulate.command("replay")
def replay_cmd(
    data: Path = typer.Option(..., help="MIMIC windows folder (CSV) or a simulator dataset folder."),
    broker: str = typer.Option(None, help="mqtts://[user:pass@]host:port (default: the BPSTREAM_MQTT_* settings)."),
    speed: float = typer.Option(1.0),
    clinic: str = typer.Option("replay"),
    prefix: str = typer.Option("rec"),
    limit: int = typer.Option(None, help="Replay only the first N records."),
    truth: Path = typer.Option(None, help="Write the recorded reference (JSON lines) here."),
) -> None:
    """Publish recordings as devices so the live pipeline can be compared with the recorded reference."""
    from bpstream.shared.mqtt import ssl_context
    from bpstream.simulators.replay import load_sources, replay

    settings = _broker(broker)
    try:
        sources = load_sources(data, prefix, limit)
        report = asyncio.run(replay(sources, settings.host, settings.port, clinic_id=clinic, speed=speed,
                                    truth_path=truth, username=settings.username,
                                    password=settings.password.get_secret_value() if settings.password else None,
                                    tls=ssl_context(settings)))
    except BpstreamError as exc:
        _fail(exc)
        return
    typer.echo(json.dumps({"devices": len(report.device_ids), "published": report.published,
                           "skipped_gap_chunks": sum(len(v) for v in report.skipped_gaps.values()),
                           "wall_s": round(report.wall_s, 2)}, indent=1))


@simulate.command("dataset")
def dataset_cmd(
    subjects: int = typer.Option(60), minutes: float = typer.Option(10.0), seed: int = typer.Option(0),
    out: Path = typer.Option(..., help="Output folder (manifest.json + one .npz per subject)."),
    scenario: str = typer.Option("training", help="Scenario or mix for the subjects."),
) -> None:
    """Write a training dataset with signals, beat-level ground truth and per-sample labels."""
    import time

    from bpstream.simulators.dataset import simulate_cohort, write_dataset

    t = time.perf_counter()
    try:
        ds = simulate_cohort(subjects, minutes, seed, scenario)
    except BpstreamError as exc:
        _fail(exc)
        return
    gen_s = time.perf_counter() - t
    write_dataset(ds, out)
    typer.echo(f"wrote {len(ds.records)} subjects x {minutes:g} min to {out} "
               f"(generated in {gen_s:.1f} s, total {time.perf_counter() - t:.1f} s)")


@simulate.command("calibrate")
def calibrate_cmd(
    data: Path = typer.Option(None, help="MIMIC windows folder (default ../shared/data/mimic3-windows)."),
    out: Path = typer.Option(Path("docs"), help="Writes SIMULATOR_CALIBRATION.md and figures/ here."),
    subjects: int = typer.Option(40), seed: int = typer.Option(0),
) -> None:
    """Compare simulated and real signals (HR, PAT vs SBP, PPG shape, ECG amplitude, noise): table + PNG."""
    from bpstream.simulators.calibrate import run_calibration

    try:
        table = run_calibration(data, out, subjects=subjects, seed=seed)
    except BpstreamError as exc:
        _fail(exc)
        return
    typer.echo(table)


@simulate.command("scenarios")
def scenarios_cmd() -> None:
    """List scenarios and mixes."""
    from bpstream.simulators.scenarios import MIXES, SCENARIOS

    for spec in SCENARIOS.values():
        limits = f"SBP {spec.sbp_limits[0]:.0f}-{spec.sbp_limits[1]:.0f}"
        typer.echo(f"{spec.name:17s} {limits}  cuff {spec.calibration:9s}  {spec.description}")
    for name, mix in MIXES.items():
        typer.echo(f"{name:17s} mix of {', '.join(mix)}")
    typer.echo("clinic            demo mix: one crisis device, one noisy sensor, the rest normal or hypertensive")


def bench_simulator(
    devices: str = typer.Option("100,1000,5000", help="Device counts for the generation benchmark."),
    seconds: int = typer.Option(10, help="Device seconds per measurement."),
    broker: str = typer.Option(None, help="Also publish to this broker (default: the local Mosquitto)."),
    publish_devices: str = typer.Option("100,1000,2000", help="Device counts for the publishing benchmark."),
    realtime_devices: str = typer.Option("", help="Also run these fleet sizes at speed 1 and report the lag."),
    no_publish: bool = typer.Option(False, help="Only measure generation."),
) -> None:
    """Devices generated (and published) in real time per core."""
    from bpstream.simulators.bench import run_bench

    mqtt = None
    if not no_publish:
        if broker:
            mqtt = _broker(broker)
        else:
            from bpstream.localservers import ensure_up

            mqtt = ensure_up().mqtt_settings("simulator")
    run_bench([int(x) for x in devices.split(",")], seconds, mqtt,
              [int(x) for x in publish_devices.split(",")], [int(x) for x in realtime_devices.split(",") if x])


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to the ``bpstream`` app and its ``bench`` group."""
    app.add_typer(simulate, name="simulate")
    bench.command("simulator")(bench_simulator)
