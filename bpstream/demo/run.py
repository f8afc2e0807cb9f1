"""``bpstream demo``: the whole system on a simulated clinic, with a live view and a report at the end.

Steps: start (or reuse) the local Mosquitto, Kafka and InfluxDB; create the topics; start bridge, processor,
inference, alerting and writer as subprocesses and wait until each is ready; stream a simulated clinic
(exactly one hypertensive crisis, one noisy sensor, the rest normotensive or hypertensive) over MQTT, every
patient enrolled with a simulated cuff reading and re-calibrated on a schedule; show the pipeline's live
output; wait until every consumer group has drained; write the report from InfluxDB and the simulator's
ground truth; stop the services, and the servers too if this run started them.

With ``paired`` a second fleet streams the same patients (same seed, same start) under another clinic id and
is never enrolled, so the report compares alerting with and without cuff calibration on one run. An
accelerated run starts its device clocks in the past, so that no device time (and no cuff reading) runs
ahead of the wall clock (the bridge refuses cuff readings from the future).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.live import Live

from bpstream.demo.evaluation import alert_metrics
from bpstream.demo.live import LiveState, PatientView, follow_lag, follow_outputs
from bpstream.demo.pipeline import Pipeline, PipelineConfig, by_device, influx_rows
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
    scenario: str = "clinic"
    #: Enrol every patient with a simulated cuff reading at ``enrol_at_s`` and re-calibrate every
    #: ``recalibrate_every_s`` device seconds (None: enrolment only).
    enrol: bool = True
    enrol_at_s: float = 10.0
    recalibrate_every_s: float | None = 45.0
    #: Inference's CALIBRATION_WINDOW_S for this run: a 2-minute demo cannot wait for the default 60 s of
    #: windows after each cuff reading (a reading that arrives before the previous one's reference is formed
    #: replaces it, so re-calibrations must be further apart than this). None: the inference's default.
    calibration_window_s: float | None = 20.0
    #: Device second of the crisis onset; None: the demo's default (min(30 s, duration / 4)); < 0: random
    #: within the first 60 % of the run (per patient).
    crisis_onset_s: float | None = None
    #: Also stream an identical, never-enrolled copy of the clinic (calibrated vs uncalibrated on one run).
    paired: bool = False
    #: Inference's CALIBRATION_MAX_AGE_S for this run (None: its default, 24 h).
    calibration_max_age_s: float | None = None
    #: Per-patient PNG plots (off for long runs with many patients).
    plots: bool = True


def run_demo(config: DemoConfig) -> Path:
    """Run the demo end to end and return the report's path."""
    return asyncio.run(_demo(config))


async def _demo(cfg: DemoConfig) -> Path:
    from bpstream import localservers
    from bpstream.simulators.fleet import FleetConfig, mqtt_connection, run_fleet
    from bpstream.simulators.scenarios import assign_scenarios

    console = Console()
    t_start = time.monotonic()
    console.print("[b]bpstream demo[/]: starting the local servers (first run downloads and installs them)…")
    endpoints, statuses = await asyncio.to_thread(localservers.ensure_up_report)
    started_servers = [s.name for s in statuses if not s.reused]
    run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    clinic = f"demo-{run_id[-6:]}"
    out_dir = cfg.report_dir / f"demo-{run_id}"
    inference_env = {}
    if cfg.calibration_window_s is not None:
        inference_env["BPSTREAM_INFERENCE_CALIBRATION_WINDOW_S"] = str(cfg.calibration_window_s)
    if cfg.calibration_max_age_s is not None:
        inference_env["BPSTREAM_INFERENCE_CALIBRATION_MAX_AGE_S"] = str(cfg.calibration_max_age_s)
    pconf = PipelineConfig(servers=endpoints,
                           topic_prefix=cfg.topic_prefix, database=cfg.database, log_dir=out_dir / "logs",
                           service_env={"bridge": {"BPSTREAM_BRIDGE_SHARE_GROUP": f"demo-{uuid.uuid4().hex[:8]}",
                                                   "BPSTREAM_BRIDGE_CLIENT_ID": f"bridge-{clinic}"},
                                        "inference": inference_env})
    onset: float | None = min(30.0, cfg.duration_s / 4) if cfg.crisis_onset_s is None else cfg.crisis_onset_s
    if onset is not None and onset < 0:
        onset = None
    # Device clocks start in the past by what the run gains on the wall clock (plus a margin).
    lead_s = cfg.duration_s * max(0.0, 1.0 - 1.0 / cfg.speed) + 5.0
    start_ns = time.time_ns() - round(lead_s * 1e9)
    fleet_cfg = FleetConfig(**mqtt_connection(endpoints.mqtt_settings("simulator")), devices=cfg.patients,
                            duration_s=cfg.duration_s, speed=cfg.speed, clinic_id=clinic,
                            device_prefix=f"{clinic}-pt", scenario=cfg.scenario, seed=cfg.seed,
                            crisis_onset_s=onset, start_time_ns=start_ns, enrol=cfg.enrol,
                            enrol_at_s=cfg.enrol_at_s, recalibrate_every_s=cfg.recalibrate_every_s)
    twin_clinic = f"{clinic}-u"
    twin_cfg = dataclasses.replace(fleet_cfg, clinic_id=twin_clinic, device_prefix=f"{clinic}-un", enrol=False)
    names = assign_scenarios(cfg.scenario, cfg.patients, np.random.default_rng(
        np.random.SeedSequence(cfg.seed).spawn(4)[0]))
    scenarios = dict(zip(fleet_cfg.device_ids(), names, strict=True))
    state = LiveState(clinic, {d: PatientView(s) for d, s in scenarios.items()})
    stop_view = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        async with Pipeline(pconf) as pipeline:
            console.print(f"servers: mqtt {endpoints.mqtt_port}, kafka {endpoints.kafka_bootstrap}, influx "
                          f"{endpoints.influx_url}; starting bridge, processor, inference, alerting, writer…")
            await pipeline.start()
            ours = (f"{clinic}-pt", f"{clinic}-un") if cfg.paired else (f"{clinic}-pt",)
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
                fleets = await asyncio.gather(run_fleet(fleet_cfg), *([run_fleet(twin_cfg)] if cfg.paired else []))
                fleet = fleets[0]
                state.phase = "stream finished; waiting for the pipeline to drain"
                await pipeline.wait_drained(min_raw=sum(f.published for f in fleets), key_prefixes=ours,
                                            timeout_s=cfg.drain_timeout_s, restart_dead=True)
                await asyncio.sleep(2.5)  # the writer's last batch
                state.phase = "drained; writing the report"
                if live is not None:
                    live.update(state.render())
            stop_view.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            estimates = await influx_rows(pconf.influx(),
                                          f"SELECT * FROM bp_estimate WHERE clinic = '{clinic}' GROUP BY device")
            alerts = await influx_rows(pconf.influx(),
                                       f"SELECT * FROM bp_alert WHERE clinic = '{clinic}' GROUP BY device, kind, "
                                       "severity")
            versions = sorted({str(r.get("model_version")) for r in estimates if r.get("model_version")})
            t0_ns = min(t for device in fleet.truth.device_ids for (_s, t, _l) in fleet.truth.chunks(device))
            metrics = [alert_metrics("enrolled" if cfg.enrol else "not enrolled", fleet.truth, by_device(alerts),
                                     fleet.device_ids, cfg.duration_s)]
            if cfg.paired:
                twin_alerts = await influx_rows(
                    pconf.influx(),
                    f"SELECT * FROM bp_alert WHERE clinic = '{twin_clinic}' GROUP BY device, kind, severity")
                metrics.append(alert_metrics("never calibrated (paired copy)", fleets[1].truth,
                                             by_device(twin_alerts), fleets[1].device_ids, cfg.duration_s))
            report = write_report(
                out_dir, clinic_id=clinic, scenarios=scenarios, estimates=estimates, alerts=alerts,
                truth=fleet.truth, t0_ns=t0_ns, duration_s=cfg.duration_s, window_ns=int(WINDOW_SECONDS * 1e9),
                metrics=metrics, plots=cfg.plots,
                facts={"patients": str(cfg.patients), "scenario": cfg.scenario,
                       "simulated duration": f"{cfg.duration_s:.0f} s at {cfg.speed:g}x real time",
                       "cuff": (f"enrolment at {cfg.enrol_at_s:g} s, re-calibration every "
                                f"{cfg.recalibrate_every_s:g} s" if cfg.recalibrate_every_s else
                                f"enrolment at {cfg.enrol_at_s:g} s, no re-calibration") if cfg.enrol else
                       "no enrolment", "cuff readings published": str(fleet.cuff_readings),
                       "paired never-calibrated copy": f"clinic {twin_clinic}" if cfg.paired else "no",
                       "calibration window": f"{cfg.calibration_window_s:g} s" if cfg.calibration_window_s
                       else "inference default (60 s)",
                       "calibration max age": f"{cfg.calibration_max_age_s:g} s" if cfg.calibration_max_age_s
                       else "inference default (24 h)",
                       "chunks published": str(sum(f.published for f in fleets)),
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
