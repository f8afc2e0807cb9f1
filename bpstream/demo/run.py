"""``bpstream demo``: the whole system on a simulated clinic, with a live view and a report at the end.

Steps: start (or reuse) the local Mosquitto, Kafka and InfluxDB; create the topics; start bridge, processor,
inference, alerting and writer as subprocesses and wait until each is ready; stream a simulated clinic
(exactly one hypertensive crisis, one noisy sensor, the rest normotensive or hypertensive) over MQTT; show
the pipeline's live output; wait until every consumer group has drained; write the report from InfluxDB and
the simulator's ground truth; stop the services, and the servers too if this run started them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.live import Live

from bpstream.demo.live import LiveState, PatientView, follow_lag, follow_outputs
from bpstream.demo.pipeline import Pipeline, PipelineConfig, influx_rows
from bpstream.demo.report import write_report
from bpstream.shared.modelspec import WINDOW_SECONDS


@dataclass(slots=True, frozen=True)
class DemoConfig:
    patients: int = 8
    duration_s: float = 120.0
    speed: float = 2.0
    report_dir: Path = Path("reports")
    seed: int = 7
    live: bool = True
    topic_prefix: str = ""
    database: str = "bpstream"
    drain_timeout_s: float = 600.0


def run_demo(config: DemoConfig) -> Path:
    """Run the demo end to end and return the report's path."""
    return asyncio.run(_demo(config))


async def _demo(cfg: DemoConfig) -> Path:
    from bpstream import localservers
    from bpstream.simulators.fleet import FleetConfig, run_fleet
    from bpstream.simulators.scenarios import assign_scenarios

    console = Console()
    t_start = time.monotonic()
    console.print("[b]bpstream demo[/]: starting the local servers (first run downloads and installs them)…")
    endpoints, statuses = await asyncio.to_thread(localservers.ensure_up_report)
    started_servers = [s.name for s in statuses if not s.reused]
    run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    clinic = f"demo-{run_id[-6:]}"
    out_dir = cfg.report_dir / f"demo-{run_id}"
    pconf = PipelineConfig(mqtt_host=endpoints.mqtt_host, mqtt_port=endpoints.mqtt_port,
                           kafka_bootstrap=endpoints.kafka_bootstrap, influx_url=endpoints.influx_url,
                           topic_prefix=cfg.topic_prefix, database=cfg.database, log_dir=out_dir / "logs",
                           service_env={"bridge": {"BPSTREAM_BRIDGE_SHARE_GROUP": f"demo-{uuid.uuid4().hex[:8]}",
                                                   "BPSTREAM_BRIDGE_CLIENT_ID": f"bridge-{clinic}"}})
    fleet_cfg = FleetConfig(mqtt_host=endpoints.mqtt_host, mqtt_port=endpoints.mqtt_port, devices=cfg.patients,
                            duration_s=cfg.duration_s, speed=cfg.speed, clinic_id=clinic,
                            device_prefix=f"{clinic}-pt", scenario="clinic", seed=cfg.seed,
                            crisis_onset_s=min(30.0, cfg.duration_s / 4))
    names = assign_scenarios("clinic", cfg.patients, np.random.default_rng(cfg.seed))
    scenarios = dict(zip(fleet_cfg.device_ids(), names, strict=True))
    state = LiveState(clinic, {d: PatientView(s) for d, s in scenarios.items()})
    stop_view = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        async with Pipeline(pconf) as pipeline:
            console.print(f"servers: mqtt {endpoints.mqtt_port}, kafka {endpoints.kafka_bootstrap}, influx "
                          f"{endpoints.influx_url}; starting bridge, processor, inference, alerting, writer…")
            await pipeline.start()
            ours = (f"{clinic}-pt",)
            kafka = pconf.kafka()
            tasks.append(asyncio.create_task(follow_outputs(kafka, state, stop_view)))
            tasks.append(asyncio.create_task(follow_lag(kafka, state, stop_view, lambda: pipeline.forwarded(ours))))
            await asyncio.sleep(1.0)  # let the view's reader take its starting offsets
            state.phase = f"streaming {cfg.patients} patients for {cfg.duration_s:.0f} s at {cfg.speed:g}x"
            view = contextlib.nullcontext() if not cfg.live else Live(state.render(), console=console,
                                                                      refresh_per_second=2, transient=False)
            with view as live:
                async def refresh() -> None:
                    while not stop_view.is_set():
                        for name in pipeline.restart_dead():  # like a container restart policy
                            console.log(f"{name} exited; restarted it (log: {pconf.log_dir / name}.log)")
                        if live is not None:
                            live.update(state.render())
                        else:
                            console.print(f"{state.phase}: estimates {state.estimates}, lag {state.lags}")
                        await asyncio.sleep(0.5 if live is not None else 10)

                tasks.append(asyncio.create_task(refresh()))
                fleet = await run_fleet(fleet_cfg)
                state.phase = "stream finished; waiting for the pipeline to drain"
                await pipeline.wait_drained(min_raw=fleet.published, key_prefixes=ours,
                                            timeout_s=cfg.drain_timeout_s, restart_dead=True)
                await asyncio.sleep(2.5)  # the writer's last batch
                state.phase = "drained; writing the report"
                if live is not None:
                    live.update(state.render())
            stop_view.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            estimates = await influx_rows(pconf.influx_url, pconf.database,
                                          f"SELECT * FROM bp_estimate WHERE clinic = '{clinic}' GROUP BY device")
            alerts = await influx_rows(pconf.influx_url, pconf.database,
                                       f"SELECT * FROM bp_alert WHERE clinic = '{clinic}' GROUP BY device, kind, "
                                       "severity")
            versions = sorted({str(r.get("model_version")) for r in estimates if r.get("model_version")})
            t0_ns = min(t for device in fleet.truth.device_ids for (_s, t, _l) in fleet.truth.chunks(device))
            report = write_report(
                out_dir, clinic_id=clinic, scenarios=scenarios, estimates=estimates, alerts=alerts,
                truth=fleet.truth, t0_ns=t0_ns, duration_s=cfg.duration_s, window_ns=int(WINDOW_SECONDS * 1e9),
                facts={"patients": str(cfg.patients), "simulated duration": f"{cfg.duration_s:.0f} s at "
                       f"{cfg.speed:g}x real time", "chunks published": str(fleet.published),
                       "estimates stored": str(len(estimates)), "alert events stored": str(len(alerts)),
                       "model version": ", ".join(versions) or "n/a",
                       "wall time (incl. start-up)": f"{time.monotonic() - t_start:.0f} s",
                       "service logs": str(pconf.log_dir)})
            console.print("stopping the services…")
    finally:
        stop_view.set()
        for task in tasks:
            task.cancel()
        if started_servers:
            for name in started_servers:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(localservers.stop, name)
    return report
