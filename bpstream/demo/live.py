"""The demo's live terminal view: latest pressure and quality per patient, active alerts, throughput, lag.

It reads the pipeline's own outputs (Kafka ``estimates`` and ``alerts``, from the end of the topics at start,
filtered to the demo's clinic) and the consumer lag of every group, and renders them with rich.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from bpstream.shared.errors import DecodeError
from bpstream.shared.kafka_tools import topic_partitions
from bpstream.shared.lag import LagProbe
from bpstream.shared.messages import Alert, Estimate, decode_alert, decode_estimate
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import ALERTS, ESTIMATES, topic_name


@dataclass(slots=True)
class PatientView:
    scenario: str
    latest: Estimate | None = None
    windows: int = 0
    unscored: int = 0
    active: dict[str, Alert] = field(default_factory=dict)


@dataclass(slots=True)
class LiveState:
    """What the view shows; updated by the Kafka reader and the lag probe."""

    clinic_id: str
    patients: dict[str, PatientView]
    started: float = field(default_factory=time.monotonic)
    estimates: int = 0
    alert_log: list[Alert] = field(default_factory=list)
    lags: dict[str, int] = field(default_factory=dict)
    raw: int = 0
    phase: str = "starting"
    rate_window: list[tuple[float, int]] = field(default_factory=list)

    def on_estimate(self, estimate: Estimate) -> None:
        patient = self.patients.get(estimate.device_id)
        if patient is None:
            return
        self.estimates += 1
        patient.windows += 1
        if estimate.quality_ok:
            patient.latest = estimate
        else:
            patient.unscored += 1
            if patient.latest is None or patient.latest.window_end_ns < estimate.window_end_ns:
                patient.latest = estimate

    def on_alert(self, alert: Alert) -> None:
        patient = self.patients.get(alert.device_id)
        if patient is None:
            return
        if alert in self.alert_log:
            return  # a replayed duplicate
        self.alert_log.append(alert)
        if alert.state == "raised":
            patient.active[alert.kind] = alert
        else:
            patient.active.pop(alert.kind, None)

    def throughput(self) -> float:
        now = time.monotonic()
        self.rate_window.append((now, self.estimates))
        self.rate_window = [(t, n) for t, n in self.rate_window if now - t <= 10.0]
        (t0, n0), (t1, n1) = self.rate_window[0], self.rate_window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def render(self) -> Group:
        table = Table(title=f"bpstream demo: clinic {self.clinic_id}", expand=True)
        for column in ("patient", "scenario", "SBP/DBP mmHg", "± SD", "quality", "inputs", "windows", "alerts"):
            table.add_column(column)
        for device, p in sorted(self.patients.items()):
            e = p.latest
            if e is None:
                pressure, sd, quality, inputs = "…", "", "", ""
            elif e.quality_ok:
                pressure = f"{e.sbp:5.0f}/{e.dbp:<5.0f}"
                sd = f"{e.sbp_sd:.0f}/{e.dbp_sd:.0f}"
                quality, inputs = f"ok (SQI {e.sqi:.2f})", e.inputs
            else:
                pressure, sd, quality, inputs = "—", "", f"[yellow]poor (SQI {e.sqi:.2f})[/]", "none"
            alerts = ", ".join(f"[bold red]{k}[/]" if a.severity == "critical" else f"[yellow]{k}[/]"
                               for k, a in p.active.items()) or "[green]none[/]"
            short = device.removeprefix(f"{self.clinic_id}-")
            table.add_row(short, p.scenario, pressure, sd, quality, inputs, f"{p.windows} ({p.unscored} poor)", alerts)
        lag = "  ".join(f"{g.removeprefix('bpstream-')}={n}" for g, n in sorted(self.lags.items())) or "…"
        status = Text.from_markup(
            f"[b]{self.phase}[/]   elapsed {time.monotonic() - self.started:5.0f} s   chunks forwarded {self.raw}   "
            f"estimates {self.estimates} ({self.throughput():.1f}/s)   consumer lag: {lag}")
        recent = "\n".join(
            f"{'RAISED ' if a.state == 'raised' else 'resolved'} {a.device_id.removeprefix(self.clinic_id + '-')} "
            f"{a.kind} ({a.severity}): {a.message}" for a in self.alert_log[-6:]) or "no alerts yet"
        return Group(table, Panel(status, title="pipeline"), Panel(recent, title="alert events"))


async def follow_outputs(settings: KafkaSettings, state: LiveState, stop: asyncio.Event) -> None:
    """Feed ``state`` with the estimates and alerts produced after this call started."""
    names = [topic_name(ESTIMATES, settings.topic_prefix), topic_name(ALERTS, settings.topic_prefix)]
    admin = AIOKafkaAdminClient(**settings.client_kwargs())
    await admin.start()
    try:
        partitions = await topic_partitions(admin, names)
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(**settings.client_kwargs(), enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                for r in records:
                    try:
                        if tp.topic == names[0]:
                            estimate = decode_estimate(r.value or b"")
                            if estimate.clinic_id == state.clinic_id:
                                state.on_estimate(estimate)
                        else:
                            alert = decode_alert(r.value or b"")
                            if alert.clinic_id == state.clinic_id:
                                state.on_alert(alert)
                    except DecodeError:
                        continue
    finally:
        await consumer.stop()


async def follow_lag(settings: KafkaSettings, state: LiveState, stop: asyncio.Event,
                     raw_count: object = None) -> None:
    """Sample consumer lag (and forwarded chunks) every two seconds."""
    async with LagProbe(settings) as probe:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                state.lags = await probe.lags()
                if callable(raw_count):
                    state.raw = await raw_count()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=2.0)
