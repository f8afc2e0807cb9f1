"""The demo's report: estimated vs true pressure per patient (PNG plots), an alert timeline, and a Markdown
summary with per-patient error, quality and alerts. Built from what the pipeline stored in InfluxDB and the
simulator's ground truth, so it shows the system's real output, not an in-process shortcut."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bpstream.demo.evaluation import AlertMetrics, Scorecard, scorecard
from bpstream.simulators.fleet import FleetTruth

NS = 1_000_000_000


@dataclass(slots=True)
class PatientSummary:
    device: str
    scenario: str
    windows: int
    scored: int
    sbp_mae: float
    dbp_mae: float
    alerts: list[str]


def truth_for(truth: FleetTruth, device: str, rows: list[dict[str, Any]], window_ns: int) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """Mean true SBP/DBP over each estimate's window."""
    sbp, dbp = [], []
    for row in rows:
        end = int(row["time"])
        s, d = truth.between(device, end - window_ns, end)
        sbp.append(s)
        dbp.append(d)
    return np.asarray(sbp, dtype=float), np.asarray(dbp, dtype=float)


def _value(row: dict[str, Any], key: str) -> float:
    value = row.get(key)
    return float(value) if value is not None else math.nan


def summarise(device: str, scenario: str, rows: list[dict[str, Any]], truth: FleetTruth, window_ns: int,
              alerts: list[dict[str, Any]]) -> PatientSummary:
    rows = sorted(rows, key=lambda r: int(r["time"]))
    true_sbp, true_dbp = truth_for(truth, device, rows, window_ns)
    est_sbp = np.array([_value(r, "sbp") for r in rows])
    est_dbp = np.array([_value(r, "dbp") for r in rows])
    ok = np.isfinite(est_sbp) & np.isfinite(true_sbp)
    sbp_mae = float(np.mean(np.abs(est_sbp[ok] - true_sbp[ok]))) if ok.any() else math.nan
    dbp_mae = float(np.mean(np.abs(est_dbp[ok] - true_dbp[ok]))) if ok.any() else math.nan
    described = [f"{a['kind']} {a['state']}" + (" (cuff)" if a.get("basis") == "cuff" else "")
                 for a in sorted(alerts, key=lambda a: int(a["time"]))]
    return PatientSummary(device, scenario, len(rows), int(np.isfinite(est_sbp).sum()), sbp_mae, dbp_mae,
                          described)


def plot_patient(path: Path, device: str, scenario: str, rows: list[dict[str, Any]], truth: FleetTruth,
                 alerts: list[dict[str, Any]], t0_ns: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: int(r["time"]))
    t = np.array([(int(r["time"]) - t0_ns) / NS for r in rows])
    fig, ax = plt.subplots(figsize=(9, 3.2))
    beat_t, beat_sbp, beat_dbp = truth.beats(device)
    if len(beat_t):
        bt = (beat_t - t0_ns) / NS
        ax.plot(bt, beat_sbp, color="tab:red", alpha=0.25, lw=0.8, label="true SBP (beats)")
        ax.plot(bt, beat_dbp, color="tab:blue", alpha=0.25, lw=0.8, label="true DBP (beats)")
    for key, sd_key, color in (("sbp", "sbp_sd", "tab:red"), ("dbp", "dbp_sd", "tab:blue")):
        est = np.array([_value(r, key) for r in rows])
        sd = np.array([_value(r, sd_key) for r in rows])
        if len(t):
            ax.plot(t, est, color=color, lw=1.8, label=f"estimated {key.upper()}")
            ax.fill_between(t, est - sd, est + sd, color=color, alpha=0.12, lw=0)
    poor = [(int(r["time"]) - t0_ns) / NS for r in rows if not r.get("quality_ok")]
    if poor:
        ax.scatter(poor, [40] * len(poor), marker="|", color="tab:orange", label="poor quality (not scored)")
    for a in alerts:
        x = (int(a["time"]) - t0_ns) / NS
        ax.axvline(x, color="black" if a.get("state") == "raised" else "grey", ls="--", lw=1)
        ax.annotate(f"{a.get('kind')} {a.get('state')}", (x, 200), fontsize=7, rotation=90, va="top")
    top = max([215.0, *(float(v) + 10 for v in beat_sbp[-2000:])]) if len(beat_t) else 215.0
    ax.set_ylim(30, top)
    ax.set_xlabel("device time since start (s)")
    ax.set_ylabel("mmHg")
    ax.set_title(f"{device} ({scenario})")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_alert_timeline(path: Path, devices: list[str], alerts: list[dict[str, Any]], t0_ns: int,
                        t_end_s: float, labels: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(devices) + 1.2))
    colours = {"critical": "tab:red", "warning": "tab:orange"}
    episodes: dict[str, dict[str, Any]] = {}
    for a in sorted(alerts, key=lambda a: int(a["time"])):
        episodes.setdefault(str(a["alert_id"]), {"device": a["device"], "kind": a["kind"],
                                                 "severity": a["severity"]})[str(a["state"])] = int(a["time"])
    lanes = {"crisis": 0.22, "hypotension": 0.22, "stage2": -0.22, "deviation": 0.0}
    for ep in episodes.values():
        y = (devices.index(ep["device"]) if ep["device"] in devices else -1) + lanes.get(str(ep["kind"]), 0.0)
        start = (ep.get("raised", t0_ns) - t0_ns) / NS
        end = (ep["resolved"] - t0_ns) / NS if "resolved" in ep else t_end_s
        ax.barh(y, end - start, left=start, height=0.4, color=colours.get(ep["severity"], "tab:grey"), alpha=0.8)
        ax.text(start, y, f" {ep['kind']}", va="center", fontsize=8)
    ax.set_yticks(range(len(devices)), labels or devices)
    ax.set_xlim(0, max(t_end_s, 1))
    ax.set_xlabel("device time since start (s)")
    ax.set_title("alert episodes (red = critical, orange = warning; a bar to the end = still active)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"


def scorecard_lines(cards: list[Scorecard]) -> list[str]:
    """The per-patient calibration and alert table, with the issue's bar stated under it."""
    lines = ["| patient | scenario | true category (typical / peak) | alerted category | alerts above truth | "
             "cuff readings | calibrated windows | SBP MAE calibrated | SBP MAE uncalibrated (same windows / all) | "
             "DBP MAE cal / uncal | 90% interval coverage cal / uncal | withheld (reasons) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in cards:
        withheld = ", ".join(f"{k} {v}" for k, v in sorted(c.withheld.items())) or "0"
        lines.append(
            f"| {c.device} | {c.scenario} | {c.typical_category or 'n/a'} / {c.peak_category or 'n/a'} | "
            f"{c.alerted_category or 'none'} | {c.alerts_above_truth} | {c.cuff_readings} | "
            f"{c.calibrated}/{c.scored} | {_fmt(c.sbp_mae_calibrated)} | "
            f"{_fmt(c.sbp_mae_uncal_same)} / {_fmt(c.sbp_mae_uncalibrated)} | "
            f"{_fmt(c.dbp_mae_calibrated)} / {_fmt(c.dbp_mae_uncal_same)} | "
            f"{_pct(c.coverage_calibrated)} / {_pct(c.coverage_uncalibrated)} | {withheld} |")
    above = sum(c.alerts_above_truth for c in cards)
    crisis = [c for c in cards if c.crisis_onset_ns is not None]
    alerted = [c for c in crisis if c.crisis_alert_ns is not None]
    lines += ["", f"**Alerts above the patient's true category: {above}** (the bar: 0). **Patients whose true "
              f"pressure reached crisis: {len(crisis)}, with a crisis alert: {len(alerted)}**"
              + "".join(f"; {c.device} after {(c.crisis_alert_ns - c.crisis_onset_ns) / NS:.0f} s"
                        for c in alerted if c.crisis_alert_ns is not None and c.crisis_onset_ns is not None) + ".",
              "", "True category: ACC/AHA category of the mean true pressure of each 8 s window (typical = median "
              "window, peak = highest window). An alert is *above truth* when no true window in its evidence "
              "(its first window to its event, or the cuff's 10 s measurement) reached the category it claims. "
              "MAE on calibrated windows compares the shown estimate with the model's calibration-free output on "
              "the same windows; coverage: true SBP inside the served 90% interval (calibrated: windows not "
              "withheld). `(cuff)` marks alerts raised on a cuff reading."]
    return lines


def metrics_lines(metrics: list[AlertMetrics]) -> list[str]:
    lines = ["| arm | patients | patient-hours | stage-2 alerts | false stage-2 alerts | false stage-2 per "
             "patient-hour | crisis alerts | false crisis alerts | false crisis per patient-day | crisis patients | "
             "detected | crisis sensitivity | median latency (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in metrics:
        lines.append(f"| {m.arm} | {m.patients} | {m.patient_hours:.2f} | {m.stage_alerts} | {m.false_stage_alerts} | "
                     f"{_fmt(m.false_stage_per_patient_hour, 3)} | {m.crisis_alerts} | {m.false_crisis_alerts} | "
                     f"{_fmt(m.false_crisis_per_patient_day, 2)} | {m.crisis_patients} | {m.crisis_detected} | "
                     f"{_fmt(m.crisis_sensitivity, 2)} | {_fmt(m.crisis_latency_s_median, 0)} |")
    lines += ["", "Targets (issue 12): crisis sensitivity >= 0.95 with <= 0.1 false crisis alerts per patient-day. "
              "A false alert is one above the true category over its evidence (definitions above)."]
    return lines


def write_report(out_dir: Path, *, clinic_id: str, scenarios: Mapping[str, str], estimates: list[dict[str, Any]],
                 alerts: list[dict[str, Any]], truth: FleetTruth, t0_ns: int, duration_s: float, window_ns: int,
                 facts: Mapping[str, str], metrics: list[AlertMetrics] | None = None,
                 plots: bool = True) -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir``; return the Markdown file's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    devices = sorted(scenarios)
    est_by: dict[str, list[dict[str, Any]]] = {d: [] for d in devices}
    for row in estimates:
        est_by.setdefault(str(row["device"]), []).append(row)
    alerts_by: dict[str, list[dict[str, Any]]] = {d: [] for d in devices}
    for row in alerts:
        alerts_by.setdefault(str(row["device"]), []).append(row)
    summaries = [summarise(d, scenarios[d], est_by[d], truth, window_ns, alerts_by[d]) for d in devices]
    cards = [scorecard(d, scenarios[d], est_by[d], alerts_by[d], truth) for d in devices]
    if plots:
        for d in devices:
            plot_patient(out_dir / f"{d}.png", d, scenarios[d], est_by[d], truth, alerts_by[d], t0_ns)
    plot_alert_timeline(out_dir / "alerts.png", devices, alerts, t0_ns, duration_s,
                        labels=[f"{d} ({scenarios[d]})" for d in devices])

    def fmt(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.1f}"

    lines = [f"# bpstream demo report: clinic `{clinic_id}`", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += ["", "Estimates and alerts below are read back from InfluxDB (what Grafana would show); the true "
              "pressure is the simulator's ground truth (mean over each 8 s window's beats). Windows too poor to "
              "score are stored with quality only, not silently estimated.", "",
              "| patient | scenario | windows | scored | SBP MAE | DBP MAE | alerts |",
              "|---|---|---:|---:|---:|---:|---|"]
    for s in summaries:
        lines.append(f"| {s.device} | {s.scenario} | {s.windows} | {s.scored} | {fmt(s.sbp_mae)} | "
                     f"{fmt(s.dbp_mae)} | {', '.join(s.alerts) or 'none'} |")
    lines += ["", "MAE in mmHg, per patient over this run, of the estimate as served (calibrated once the patient's "
              "enrolment calibration is in use; the model's validated error is in its model card).", "",
              "## Calibration, intervals and alerts per patient", ""]
    lines += scorecard_lines(cards)
    if metrics:
        lines += ["", "## Alert performance", ""]
        lines += metrics_lines(metrics)
    lines += ["", "## Alert timeline", "", "![alert timeline](alerts.png)", ""]
    if alerts:
        lines += ["| device time (s) | patient | kind | severity | state | message |", "|---:|---|---|---|---|---|"]
        for a in sorted(alerts, key=lambda a: int(a["time"])):
            lines.append(f"| {(int(a['time']) - t0_ns) / NS:.0f} | {a['device']} | {a['kind']} | {a['severity']} | "
                         f"{a['state']} | {a.get('message', '')} |")
    if plots:
        lines += ["", "## Estimated vs true pressure per patient", ""]
        for d in devices:
            lines += [f"### {d} ({scenarios[d]})", "", f"![{d}]({d}.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    summary = {"facts": dict(facts), "patients": [asdict(c) for c in cards],
               "metrics": [m.as_dict() for m in metrics or []]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return path
