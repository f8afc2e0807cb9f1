"""Every Grafana panel, template-variable and alert-rule query, run against the real InfluxDB.

Grafana cannot run here, so this test does what Grafana does with the provisioned files: it expands the
macros the way Grafana's InfluxDB datasource does (``$timeFilter`` as ``time > <from>ms and time < <to>ms``,
``$__interval``/``$__interval_ms`` from the time range and the panel's data points, template variables
as escaped regex alternatives), sends the InfluxQL to the real server, turns each result column into one
series labelled by its tags (Grafana's InfluxQL frames), and evaluates alert rules with Grafana's
server-side expressions (reduce with dropNN, math, threshold). The data is a clinic written with the
documented schema through ``bpstream.shared.influx.line``: a hypertensive-crisis patient, normotensive
patients, a stage-2 patient, a device that stops sending, a device sending only unscorable windows, a
one-window spike, dead letters and a lagging consumer group.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from influxdb_client import WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS

from bpstream.localservers import ServerEndpoints, influx_security
from bpstream.shared import influx_api
from bpstream.shared.influx import line

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
RULES = yaml.safe_load((GRAFANA / "provisioning" / "alerting" / "rules.yaml").read_text())
DATASOURCE = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "influxdb.yaml").read_text())
#: jsonData.timeInterval of the datasource: the smallest $__interval Grafana uses for its panels.
MIN_INTERVAL_MS = 2000
#: Grafana sets a panel's maxDataPoints to its width in pixels; a typical full-width panel.
PANEL_DATA_POINTS = 1200

MINUTE_NS = 60 * 1_000_000_000
CLINIC, OTHER_CLINIC = "north-clinic", "south-clinic"
CRISIS, STAGE2, SILENT, POOR, SPIKE = "crisis-01", "stage2-01", "silent-01", "poorq-01", "spike-01"
NORMAL = ("normal-01", "normal-02", "normal-03")


# ------------------------------------------------------------------------------------------ Grafana emulation
def round_interval(ms: float) -> int:
    """Grafana's rounding of a computed interval to a readable one (kbn.roundInterval)."""
    steps = [(15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000), (3500, 2000),
             (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000), (90000, 60000),
             (210000, 120000), (450000, 300000), (750000, 600000), (1050000, 900000), (1500000, 1200000),
             (2700000, 1800000), (5400000, 3600000), (9000000, 7200000), (16200000, 10800000)]
    for limit, rounded in steps:
        if ms < limit:
            return rounded
    return 21600000


def interval_text(ms: int) -> str:
    for unit, size in (("h", 3600000), ("m", 60000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def regex_value(values: list[str]) -> str:
    """A template variable in a regex (``=~ /^$device$/``): escaped, several values as ``(a|b)``."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}/])", r"\\\1", value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def expand(query: str, start_ms: int, end_ms: int, variables: dict[str, list[str]],
           interval_ms: int) -> str:
    text = query.replace("$timeFilter", f"time > {start_ms}ms and time < {end_ms}ms")
    text = text.replace("$__interval_ms", str(interval_ms)).replace("$__interval", interval_text(interval_ms))
    for name, values in variables.items():
        text = re.sub(r"\$\{" + name + r"\}|\$" + name + r"\b", lambda _m, v=values: regex_value(v), text)
    assert not re.search(r"\$[A-Za-z_{]", text), f"unexpanded macro in {text}"
    return text


@dataclass(frozen=True)
class Series:
    """One Grafana data frame: a value column of one InfluxDB series, labelled by the series' tags."""

    labels: tuple[tuple[str, str], ...]
    column: str
    points: tuple[tuple[int, Any], ...]


class Influx:
    """The test clinic's database, written as the writer does (its WRITE-only user) and queried through
    influxdb-client as Grafana's datasource sees it (the READ-only ``grafana`` user)."""

    def __init__(self, servers: ServerEndpoints, database: str) -> None:
        self.writer = servers.influx_settings(database, "writer")
        self.settings = servers.influx_settings(database, "grafana")
        self.client = influx_api.sync_client(self.settings, timeout_s=30)
        self.database = database

    def write(self, lines: list[str]) -> None:
        with influx_api.sync_client(self.writer, timeout_s=30) as client, \
                client.write_api(write_options=SYNCHRONOUS) as api:
            api.write(bucket=influx_api.bucket(self.writer), record="\n".join(lines),
                      write_precision=WritePrecision.NS)

    def query(self, influxql: str) -> list[Series]:
        try:
            (result,) = influx_api.influxql_sync(self.client, influxql, database=self.database, epoch="ms")
        except influx_api.InfluxQLError as exc:
            raise AssertionError(f"{influxql}: {exc}") from None
        frames = []
        for series in result.get("series", []):
            labels = tuple(sorted(series.get("tags", {}).items()))
            columns = series["columns"]
            for index, column in enumerate(columns):
                if column == "time" and columns[0] == "time":
                    continue
                frames.append(Series(labels, column, tuple((row[0], row[index]) for row in series["values"])))
        return frames


def reduce(series: Series, reducer: str) -> float:
    """Grafana's reduce expression in dropNN mode: non-numbers are dropped first."""
    values = [float(v) for _, v in series.points
              if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
    if reducer == "count":
        return float(len(values))
    if not values:
        return math.nan
    functions: dict[str, Callable[[list[float]], float]] = {
        "last": lambda v: v[-1], "mean": lambda v: sum(v) / len(v), "max": max, "min": min, "sum": sum}
    return functions[reducer](values)


Numbers = dict[tuple[tuple[str, str], ...], float]


def evaluate_math(expression: str, refs: dict[str, Numbers]) -> Numbers:
    """Grafana math on number sets: operands joined on equal labels, comparisons give 1 or 0."""
    python = expression.replace("||", " or ").replace("&&", " and ")
    python = re.sub(r"\$\{?([A-Za-z][A-Za-z0-9]*)\}?", r"ref_\1", python)
    tree = ast.parse(python, mode="eval")
    names = sorted({node.id for node in ast.walk(tree) if isinstance(node, ast.Name)})
    keys = set.intersection(*(set(refs[name.removeprefix("ref_")]) for name in names)) if names else set()
    comparisons = {ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt, ast.LtE: operator.le,
                   ast.Eq: operator.eq, ast.NotEq: operator.ne}

    def value(node: ast.AST, key: tuple[tuple[str, str], ...]) -> float:
        if isinstance(node, ast.Name):
            return refs[node.id.removeprefix("ref_")][key]
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BoolOp):
            results = [value(v, key) != 0 for v in node.values]
            return float(any(results) if isinstance(node.op, ast.Or) else all(results))
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            left, right = value(node.left, key), value(node.comparators[0], key)
            return float(comparisons[type(node.ops[0])](left, right))
        raise AssertionError(f"unsupported math expression {expression!r}")

    return {key: value(tree.body, key) for key in keys}


def evaluate_rule(rule: dict[str, Any], influx: Influx, now_ms: int) -> dict[str, bool]:
    """Alert instances of one rule at ``now_ms``: {device or series label: firing}."""
    refs: dict[str, Numbers] = {}
    series_of: dict[str, list[Series]] = {}
    for item in rule["data"]:
        model = item["model"]
        if item["datasourceUid"] != "__expr__":
            assert item["datasourceUid"] == DATASOURCE["datasources"][0]["uid"]
            span = item["relativeTimeRange"]
            start, end = now_ms - span["from"] * 1000, now_ms - span["to"] * 1000
            interval = max(model["intervalMs"], round_interval((end - start) / model["maxDataPoints"]))
            series_of[item["refId"]] = influx.query(expand(model["query"], start, end, {}, interval))
        elif model["type"] == "reduce":
            frames = series_of[model["expression"]]
            assert len({f.labels for f in frames}) == len(frames), "one value column per query"
            refs[item["refId"]] = {f.labels: reduce(f, model["reducer"]) for f in frames}
        elif model["type"] == "math":
            refs[item["refId"]] = evaluate_math(model["expression"], refs)
        elif model["type"] == "threshold":
            (condition,) = model["conditions"]
            evaluator = condition["evaluator"]
            compare = {"gt": operator.gt, "lt": operator.lt}[evaluator["type"]]
            refs[item["refId"]] = {key: float(not math.isnan(v) and compare(v, evaluator["params"][0]))
                                   for key, v in refs[model["expression"]].items()}
        else:
            raise AssertionError(f"unsupported expression type {model['type']}")
    instances = refs[rule["condition"]]
    return {_instance_name(key): value != 0 and not math.isnan(value) for key, value in instances.items()}


def _instance_name(labels: tuple[tuple[str, str], ...]) -> str:
    found = dict(labels)
    for key in ("device", "service", "stage"):
        if key in found:
            return found[key]
    return ",".join(map("=".join, labels))


def rule(uid: str) -> dict[str, Any]:
    for group in RULES["groups"]:
        for candidate in group["rules"]:
            if candidate["uid"] == uid:
                found: dict[str, Any] = candidate
                return found
    raise AssertionError(f"no rule {uid}")


# ------------------------------------------------------------------------------------------ the clinic's data
def _estimates(device: str, clinic: str, start_ns: int, end_ns: int, sbp: float, dbp: float, *,
               scored: bool = True, every_s: int = 10, cuff_ns: int | None = None,
               stale_from_ns: int | None = None) -> Iterator[str]:
    """Estimates as the writer stores them: calibrated from ``cuff_ns`` (else uncalibrated, wide interval),
    withheld for a stale calibration from ``stale_from_ns`` (and for signal quality when not scored)."""
    for t in range(start_ns, end_ns, every_s * 1_000_000_000):
        calibrated = cuff_ns is not None and t >= cuff_ns
        half = 18.0 if calibrated else 49.0
        withheld = None if scored else "signal_quality"
        if scored and stale_from_ns is not None and t >= stale_from_ns:
            withheld = "calibration_stale"
        fields: dict[str, float | int | str | None] = {
            "sbp": sbp if scored else None, "dbp": dbp if scored else None,
            "sbp_sd": 4.5 if scored else None, "dbp_sd": 3.0 if scored else None,
            "anomaly_prob": 0.1 if scored else None, "sqi": 0.92 if scored else 0.2,
            "quality_ok": 1 if scored else 0, "latency_ms": 180.0, "stored_latency_ms": 260.0,
            "model_version": "resnet-lstm-test", "raw_sbp": sbp - 3.0 if scored else None,
            "raw_dbp": dbp - 2.0 if scored else None, "mode": "calibrated" if calibrated else "uncalibrated",
            "calibrated": 1 if calibrated else 0,
            "calibration_age_s": (t - cuff_ns) / 1e9 if calibrated and cuff_ns is not None else None,
            "sbp_lo": sbp - half if scored else None, "sbp_hi": sbp + half if scored else None,
            "dbp_lo": dbp - half / 2 if scored else None, "dbp_hi": dbp + half / 2 if scored else None,
            "withheld": withheld, "withheld_flag": 0 if withheld is None else 1}
        yield line("bp_estimate", {"clinic": clinic, "device": device}, fields, t)
        yield line("signal_quality", {"clinic": clinic, "device": device},
                   {"sqi_ecg": 0.9 if scored else 0.1, "sqi_ppg": 0.95 if scored else 0.3,
                    "quality_ok": 1 if scored else 0, "inputs": "ecg+ppg", "heart_rate_bpm": 72.0,
                    "problems": None if scored else "flat_ppg"}, t)


def _cuff(device: str, clinic: str, at_ns: int, sbp: float, dbp: float) -> str:
    return line("bp_cuff", {"clinic": clinic, "device": device},
                {"sbp": sbp, "dbp": dbp, "cuff_id": "ward-cuff", "confirmation": 0}, at_ns)


@pytest.fixture(scope="module")
def clinic(servers: Any) -> Iterator[tuple[Influx, int]]:
    """A database filled with 40 minutes of the clinic, ending now; yields it with "now" in ms."""
    database = f"test_grafana_{int(time.time() * 1000)}"
    admin = servers.influx_settings(database)
    influx_security.grant_database_sync(admin, database)  # the admin creates it, grants writer and Grafana
    influx = Influx(servers, database)
    now_ns = time.time_ns()
    start = now_ns - 40 * MINUTE_NS
    points: list[str] = []
    cuff = start - MINUTE_NS  # every patient but one was enrolled with a cuff reading before the data starts
    points += _estimates(CRISIS, CLINIC, start, now_ns, 196.0, 126.0, cuff_ns=cuff)
    points += _estimates(STAGE2, CLINIC, start, now_ns, 152.0, 96.0, cuff_ns=cuff)
    # The silent device's calibration went stale 20 minutes ago (withheld, calibration due), then it stopped.
    points += _estimates(SILENT, CLINIC, start, now_ns - 10 * MINUTE_NS, 118.0, 76.0, cuff_ns=cuff,
                         stale_from_ns=now_ns - 20 * MINUTE_NS)
    points += _estimates(POOR, CLINIC, start, now_ns, 0.0, 0.0, scored=False)
    points += _estimates(NORMAL[0], CLINIC, start, now_ns, 117.0, 75.0, cuff_ns=cuff)
    # Never enrolled: uncalibrated all along.
    points += _estimates(NORMAL[1], OTHER_CLINIC, start, now_ns, 124.0, 79.0)
    # Borderline but below stage 2 all along.
    points += _estimates(NORMAL[2], OTHER_CLINIC, start, now_ns, 138.0, 88.0, cuff_ns=cuff)
    points += [_cuff(d, CLINIC, cuff, 150.0, 95.0) for d in (CRISIS, STAGE2, SILENT, NORMAL[0])]
    points.append(_cuff(NORMAL[2], OTHER_CLINIC, cuff, 138.0, 88.0))
    # A normotensive patient with one implausible window 20 minutes ago (an artefact, not a crisis).
    points += _estimates(SPIKE, CLINIC, start, now_ns, 121.0, 78.0, cuff_ns=cuff)
    points.append(line("bp_estimate", {"clinic": CLINIC, "device": SPIKE},
                       {"sbp": 205.0, "dbp": 131.0, "sqi": 0.9, "quality_ok": 1, "calibrated": 1,
                        "mode": "calibrated", "withheld_flag": 0},
                       now_ns - 20 * MINUTE_NS + 1))
    points.append(line("signal_gap", {"clinic": CLINIC, "device": SILENT},
                       {"missing_chunks": 12, "seq_from": 4000, "seq_to": 4011,
                        "end_ns": now_ns - 14 * MINUTE_NS},
                       now_ns - 15 * MINUTE_NS))
    points.append(line("stream_event", {"clinic": CLINIC, "device": SILENT, "kind": "stream_reset"},
                       {"count": 1, "seq_first": 0, "seq_last": 3, "detail": "device restarted"},
                       now_ns - 13 * MINUTE_NS))
    episodes = (("crisis", "raised", 30), ("stage2", "raised", 31), ("stage2", "resolved", 5))
    for kind, state, minutes in episodes:
        device = CRISIS if kind == "crisis" else STAGE2
        points.append(line("bp_alert", {"clinic": CLINIC, "device": device, "kind": kind,
                                        "severity": "critical" if kind == "crisis" else "warning"},
                           {"state": state, "active": 1 if state == "raised" else 0,
                            "sbp": 196.0, "dbp": 126.0,
                            "n_windows": 5, "confidence": 0.9, "alert_id": f"{device}-{kind}",
                            "message": f"{kind} {state}"}, now_ns - minutes * MINUTE_NS))
    # The notifier told the crisis patient's webhook at once; the e-mail relay refused 4 times (retried).
    notification = {"clinic": CLINIC, "device": CRISIS, "transition": "raised", "severity": "critical"}
    points.append(line("bp_notification", {**notification, "channel": "webhook", "outcome": "delivered"},
                       {"count": 1, "attempt": 1, "alert_id": f"{CRISIS}-crisis", "kind": "crisis",
                        "status": 204}, now_ns - 30 * MINUTE_NS + 1))
    for i in range(4):
        points.append(line("bp_notification", {**notification, "channel": "email", "outcome": "retry"},
                           {"count": 1, "attempt": i + 1, "alert_id": f"{CRISIS}-crisis", "kind": "crisis",
                            "reason": "unreachable", "status": 0}, now_ns - (i + 1) * 60_000_000_000))
    # calibration due: raised for the silent device when its calibration went stale (still due); raised and
    # resolved (re-calibrated) for the stage-2 patient.
    for device, state, minutes in ((SILENT, "raised", 20), (STAGE2, "raised", 35), (STAGE2, "resolved", 25)):
        points.append(line("bp_alert", {"clinic": CLINIC, "device": device, "kind": "calibration_due",
                                        "severity": "info"},
                           {"state": state, "active": 1 if state == "raised" else 0, "sbp": 118.0, "dbp": 76.0,
                            "alert_id": f"{device}-calibration_due", "message": f"calibration due {state}"},
                           now_ns - minutes * MINUTE_NS))
    # 15 malformed payloads at the bridge in the last 5 minutes, 2 at the processor.
    for i in range(15):
        points.append(line("dead_letter", {"stage": "bridge", "reason": "bad_payload"},
                           {"count": 1, "source": "mqtt"}, now_ns - (i + 1) * 17_000_000_000))
    for i in range(2):
        points.append(line("dead_letter", {"stage": "processor", "reason": "bad_sample_rate"},
                           {"count": 1, "source": "signals.raw"}, now_ns - (i + 1) * 60_000_000_000))
    # Inference falls 25000 messages behind for the last 10 minutes; the other groups keep up.
    for t in range(now_ns - 30 * MINUTE_NS, now_ns, 5_000_000_000):
        behind = 25_000 if t > now_ns - 10 * MINUTE_NS else 40
        groups = (("bpstream-processor", 12), ("bpstream-inference", behind), ("bpstream-alerting", 3))
        for group, lag in groups:
            points.append(line("pipeline", {"service": group, "instance": "writer-0"},
                               {"consumer_lag": lag}, t))
        points.append(line("pipeline", {"service": "bpstream-writer", "instance": "writer-0"},
                           {"consumer_lag": 5, "lag_ms": 240.0, "processed": 1000, "rate_per_s": 35.0}, t))
    for offset in range(0, len(points), 5000):
        influx.write(points[offset:offset + 5000])
    yield influx, now_ns // 1_000_000
    influx.client.close()
    with influx_api.sync_client(admin) as client:
        influx_api.influxql_sync(client, f'DROP DATABASE "{database}"', epoch=None)


# ------------------------------------------------------------------------------------------ dashboards
def _dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in DASHBOARDS]


def _variables(dashboard: dict[str, Any], influx: Influx, now_ms: int,
               chosen: dict[str, str]) -> dict[str, list[str]]:
    """Resolve template variables in order, as Grafana does: run each one's query, then pick a value."""
    resolved: dict[str, list[str]] = {}
    for variable in dashboard["templating"]["list"]:
        query = expand(variable["query"], now_ms - 3600_000, now_ms, resolved, MIN_INTERVAL_MS)
        frames = influx.query(query)
        values = sorted({str(v) for f in frames if f.column == "value" for _, v in f.points})
        assert values, f"variable {variable['name']} has no values"
        if variable["name"] in chosen:
            assert chosen[variable["name"]] in values, (variable["name"], values)
            resolved[variable["name"]] = [chosen[variable["name"]]]
        else:  # "All"
            assert variable["includeAll"], variable["name"]
            resolved[variable["name"]] = values
    return resolved


def _panel_results(dashboard: dict[str, Any], influx: Influx, now_ms: int,
                   chosen: dict[str, str]) -> dict[str, list[Series]]:
    variables = _variables(dashboard, influx, now_ms, chosen)
    start = now_ms - 3600_000
    interval = max(MIN_INTERVAL_MS, round_interval((now_ms - start) / PANEL_DATA_POINTS))
    results: dict[str, list[Series]] = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE["datasources"][0]["uid"]
            results[f"{panel['title']}/{target['refId']}"] = influx.query(
                expand(target["query"], start, now_ms, variables, interval))
    return results


def _single(frames: list[Series], column: str | None = None) -> Any:
    values = [v for f in frames if column in (None, f.column) for _, v in f.points if v is not None]
    assert len(values) == 1, values
    return values[0]


def test_every_dashboard_is_covered() -> None:
    assert {path.name for path in DASHBOARDS} == {"fleet-overview.json", "patient-detail.json",
                                                  "pipeline-health.json"}


def test_every_panel_query_runs_and_returns_data(clinic: tuple[Influx, int]) -> None:
    influx, now_ms = clinic
    for dashboard in _dashboards():
        # The crisis patient has alerts, the silent one gaps and stream events: between them every panel.
        empty: set[str] | None = None
        for device in (CRISIS, SILENT):
            results = _panel_results(dashboard, influx, now_ms, {"device": device})
            assert results
            empty_now = {name for name, frames in results.items()
                         if not any(v is not None for f in frames for _, v in f.points)}
            empty = empty_now if empty is None else empty & empty_now
        assert empty == set(), f"{dashboard['uid']}: no data in {sorted(empty or ())}"


def test_fleet_overview_shows_the_clinic(clinic: tuple[Influx, int]) -> None:
    influx, now_ms = clinic
    (fleet,) = [d for d in _dashboards() if d["uid"] == "bpstream-fleet"]
    everyone = _panel_results(fleet, influx, now_ms, {})
    # All devices but the silent one sent in the last five minutes, in both clinics.
    assert _single(everyone["Devices reporting (last 5 min)/A"]) == 7
    # the crisis, and the silent device's calibration due (the stage-2 patient's was resolved)
    assert _single(everyone["Active alerts/A"]) == 2
    assert _single(everyone["Dead letters/A"]) == 17
    latest = {dict(f.labels)["device"]: f.points[-1][1]
              for f in everyone["Latest reading per patient/A"] if f.column == "SBP"}
    assert latest[CRISIS] == 196.0
    assert latest[NORMAL[1]] == 124.0
    # Choosing one clinic filters every panel to it.
    north = _panel_results(fleet, influx, now_ms, {"clinic": CLINIC})
    assert _single(north["Devices reporting (last 5 min)/A"]) == 5
    shown = {dict(f.labels)["device"] for f in north["Systolic pressure by patient/A"]}
    assert shown == {CRISIS, STAGE2, SILENT, NORMAL[0], SPIKE}


def test_patient_detail_follows_the_device_variable(clinic: tuple[Influx, int]) -> None:
    influx, now_ms = clinic
    (patient,) = [d for d in _dashboards() if d["uid"] == "bpstream-patient"]
    crisis = _panel_results(patient, influx, now_ms, {"device": CRISIS})
    assert _single(crisis["Latest SBP / DBP/A"], "SBP") == 196.0
    assert _single(crisis["Latest SBP / DBP/A"], "DBP") == 126.0
    assert _single(crisis["Model version/A"]) == "resnet-lstm-test"
    alerts = crisis["Alerts/A"]
    assert {dict(f.labels)["kind"] for f in alerts} == {"crisis"}
    band = {f.column: f.points[-1][1] for f in crisis["Blood pressure trend/B"]}
    assert band["SBP low"] == pytest.approx(196.0 - 9.0)
    assert band["SBP high"] == pytest.approx(196.0 + 9.0)
    silent = _panel_results(patient, influx, now_ms, {"device": SILENT})
    gaps = [v for f in silent["Gaps and stream events/A"] for _, v in f.points if v]
    assert gaps == [12]
    events = {dict(f.labels)["kind"] for f in silent["Gaps and stream events/B"]}
    assert events == {"stream_reset"}
    # A device whose windows are all unscorable shows quality but no pressure.
    poor = _panel_results(patient, influx, now_ms, {"device": POOR})
    assert poor["Latest SBP / DBP/A"] == []
    scored = [v for f in poor["Signal quality/A"] if f.column == "scored share"
              for _, v in f.points if v is not None]
    assert scored
    assert max(scored) == 0


def test_calibration_panels_show_mode_interval_age_cuff_and_withheld_windows(clinic: tuple[Influx, int]) -> None:
    influx, now_ms = clinic
    (patient,) = [d for d in _dashboards() if d["uid"] == "bpstream-patient"]
    crisis = _panel_results(patient, influx, now_ms, {"device": CRISIS})
    assert _single(crisis["Estimate mode/A"]) == "calibrated"
    age = _single(crisis["Calibration age/A"])
    assert 40 * 60 < age < 42 * 60  # enrolled one minute before the 40 minutes of data
    band = {f.column: f.points[-1][1] for f in crisis["Estimate with its 90% interval/B"]}
    assert band == {"SBP 90% low": 196.0 - 18.0, "SBP 90% high": 196.0 + 18.0, "DBP 90% low": 126.0 - 9.0,
                    "DBP 90% high": 126.0 + 9.0}
    assert {v for f in crisis["Estimate with its 90% interval/C"] for _, v in f.points if v is not None} == {1.0}
    assert _single(crisis["Cuff readings/A"], "readings") == 1
    assert _single(crisis["Cuff readings/A"], "cuff SBP") == 150.0
    assert not [v for f in crisis["Withheld windows by reason/A"] for _, v in f.points if v]
    assert crisis["Withheld windows (latest)/A"] == []
    # The stale device: its last 10 minutes of windows were withheld (one per 10 s), and they are not shown.
    silent = _panel_results(patient, influx, now_ms, {"device": SILENT})
    assert sum(v for f in silent["Withheld windows by reason/A"] for _, v in f.points if v) == 60
    reasons = {v for f in silent["Withheld windows (latest)/A"] if f.column == "reason" for _, v in f.points}
    assert reasons == {"calibration_stale"}
    shown_times = [t for f in silent["Estimate with its 90% interval/A"] for t, v in f.points if v is not None]
    assert max(shown_times) < now_ms - 20 * 60_000 + 10_000
    # A never-enrolled patient: uncalibrated, no calibration age, the wide interval.
    never = _panel_results(patient, influx, now_ms, {"device": NORMAL[1]})
    assert _single(never["Estimate mode/A"]) == "uncalibrated"
    assert never["Calibration age/A"] == []
    band = {f.column: f.points[-1][1] for f in never["Estimate with its 90% interval/B"]}
    assert band["SBP 90% high"] - band["SBP 90% low"] == 98.0
    (fleet,) = [d for d in _dashboards() if d["uid"] == "bpstream-fleet"]
    table = _panel_results(fleet, influx, now_ms, {})["Calibration per patient/A"]
    modes = {dict(f.labels)["device"]: f.points[-1][1] for f in table if f.column == "mode"}
    assert modes[NORMAL[1]] == "uncalibrated" and modes[CRISIS] == "calibrated"
    withheld = {dict(f.labels)["device"]: f.points[-1][1] for f in table if f.column == "withheld windows"}
    assert withheld[SILENT] == 60 and withheld[CRISIS] == 0


def test_pipeline_health_shows_lag_throughput_and_dead_letters(clinic: tuple[Influx, int]) -> None:
    influx, now_ms = clinic
    (pipeline,) = [d for d in _dashboards() if d["uid"] == "bpstream-pipeline"]
    results = _panel_results(pipeline, influx, now_ms, {})
    lag = {dict(f.labels)["service"]: max(v for _, v in f.points if v is not None)
           for f in results["Consumer lag by group/A"]}
    assert lag["bpstream-inference"] == 25_000
    assert lag["bpstream-processor"] == 12
    by_reason = {(dict(f.labels)["stage"], dict(f.labels)["reason"]): f.points[0][1]
                 for f in results["Dead letters by stage and reason/A"]}
    assert by_reason == {("bridge", "bad_payload"): 15, ("processor", "bad_sample_rate"): 2}
    # 7 sending devices x one window per 10 s: 0.7 windows/s on average (the silent one stopped earlier).
    rates = [v for f in results["Estimates per second/A"] for t, v in f.points
             if now_ms - 9 * 60_000 <= t < now_ms - 60_000]
    assert sum(rates) / len(rates) == pytest.approx(0.7, abs=0.02)


# ------------------------------------------------------------------------------------------ alert rules
def test_every_rule_query_runs(clinic: tuple[Influx, int]) -> None:
    influx, now_ms = clinic
    for group in RULES["groups"]:
        for candidate in group["rules"]:
            evaluate_rule(candidate, influx, now_ms)


def test_crisis_rule_fires_for_the_crisis_patient_only(clinic: tuple[Influx, int]) -> None:
    influx, now_ms = clinic
    instances = evaluate_rule(rule("bpstream-hypertensive-crisis"), influx, now_ms)
    assert {device for device, firing in instances.items() if firing} == {CRISIS}
    # Normotensive, borderline, stage 2 and the one-window spike are evaluated and stay normal.
    for device in (*NORMAL, STAGE2, SPIKE):
        assert instances[device] is False, device
    assert POOR not in instances  # nothing scored, nothing to judge


def test_open_episode_rules_fire_for_the_open_critical_episode_only(clinic: tuple[Influx, int]) -> None:
    influx, now_ms = clinic
    critical = evaluate_rule(rule("bpstream-alert-episode-critical"), influx, now_ms)
    assert [name for name, firing in critical.items() if firing] == [CRISIS]
    # The stage 2 episode was raised and then resolved: evaluated, not firing.
    warning = evaluate_rule(rule("bpstream-alert-episode-warning"), influx, now_ms)
    assert warning == {STAGE2: False}


def test_notification_failure_rule_fires_for_the_failing_channel_only(clinic: tuple[Influx, int]) -> None:
    influx, now_ms = clinic
    instances = evaluate_rule(rule("bpstream-notification-failing"), influx, now_ms)
    assert {name for name, firing in instances.items() if firing} == {"channel=email"}
    assert "channel=webhook" not in instances  # delivered attempts are not failures


def test_sustained_stage2_rule_fires_for_stage2_and_crisis_patients(clinic: tuple[Influx, int]) -> None:
    influx, now_ms = clinic
    instances = evaluate_rule(rule("bpstream-sustained-stage2"), influx, now_ms)
    assert {device for device, firing in instances.items() if firing} == {CRISIS, STAGE2}
    assert instances[NORMAL[2]] is False  # 138/88 is below stage 2
    assert NORMAL[1] not in instances  # never calibrated: stage 2 is not judged on uncalibrated estimates


def test_calibration_due_rule_fires_for_the_stale_patient_and_not_for_a_fresh_one(
        clinic: tuple[Influx, int]) -> None:
    influx, now_ms = clinic
    instances = evaluate_rule(rule("bpstream-calibration-due"), influx, now_ms)
    # stale (due raised, no new calibration) fires; re-calibrated (due raised then resolved) does not
    assert instances == {SILENT: True, STAGE2: False}
    # Before its calibration went stale the silent device was not due; the stage-2 patient was, then.
    earlier = evaluate_rule(rule("bpstream-calibration-due"), influx, now_ms - 30 * 60_000)
    assert earlier == {STAGE2: True}


def test_silent_device_rule_fires_when_a_device_stops(clinic: tuple[Influx, int]) -> None:
    influx, now_ms = clinic
    instances = evaluate_rule(rule("bpstream-device-silent"), influx, now_ms)
    assert {device for device, firing in instances.items() if firing} == {SILENT}
    # A device whose windows cannot be scored is still sending: not silent.
    assert instances[POOR] is False
    # Ten minutes earlier the same device was still sending: the rule did not fire then.
    earlier = evaluate_rule(rule("bpstream-device-silent"), influx, now_ms - 11 * 60_000)
    assert earlier[SILENT] is False


def test_pipeline_lag_rule_fires_for_the_lagging_group_only(clinic: tuple[Influx, int]) -> None:
    influx, now_ms = clinic
    instances = evaluate_rule(rule("bpstream-pipeline-lag"), influx, now_ms)
    assert {name for name, firing in instances.items() if firing} == {"bpstream-inference"}
    assert instances["bpstream-processor"] is False
    # Before the backlog built up nothing fired.
    earlier = evaluate_rule(rule("bpstream-pipeline-lag"), influx, now_ms - 15 * 60_000)
    assert not any(earlier.values())


def test_dead_letter_rule_fires_for_the_stage_over_the_rate(clinic: tuple[Influx, int]) -> None:
    influx, now_ms = clinic
    instances = evaluate_rule(rule("bpstream-dead-letter-rate"), influx, now_ms)
    assert instances == {"bridge": True, "processor": False}
    # Half an hour later the burst has left the 10-minute window: no data, so no alert (noDataState OK).
    assert evaluate_rule(rule("bpstream-dead-letter-rate"), influx, now_ms + 30 * 60_000) == {}


def test_no_rule_fires_on_an_empty_database(servers: Any, influx_db: str) -> None:
    influx = Influx(servers, influx_db)
    now_ms = int(time.time() * 1000)
    for group in RULES["groups"]:
        for candidate in group["rules"]:
            assert evaluate_rule(candidate, influx, now_ms) == {}, candidate["uid"]
            assert candidate["noDataState"] == "OK"
