"""Grafana provisioning files (deploy/grafana): parsed and cross-checked offline.

The queries themselves run against a real InfluxDB in tests/integration/test_grafana_queries.py; here we
check what Grafana needs to load the files and route the alerts: the files are what the generator writes,
every reference (datasource, refIds, templates, receivers, template variables) resolves, every alert reaches
a contact point, and every ``$`` that Grafana would expand from its environment is a variable the
compose file gives the Grafana container.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
PROVISIONING = GRAFANA / "provisioning"


def load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    data = load(PROVISIONING / "alerting" / "rules.yaml")
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboards() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        dashboard = load(path)
        found[dashboard["uid"]] = dashboard
    return found


def test_committed_files_are_what_the_generator_writes() -> None:
    result = subprocess.run([sys.executable, str(GRAFANA / "generate.py"), "--check"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_every_provisioning_file_parses_with_api_version_1() -> None:
    files = sorted(PROVISIONING.rglob("*.yaml"))
    assert {f.relative_to(PROVISIONING).as_posix() for f in files} == {
        "datasources/influxdb.yaml", "dashboards/bpstream.yaml", "alerting/rules.yaml",
        "alerting/contact-points.yaml", "alerting/notification-policies.yaml", "alerting/templates.yaml"}
    for path in files:
        assert load(path)["apiVersion"] == 1, path


def test_datasource_is_influxql_with_credentials_from_the_environment() -> None:
    (source,) = load(PROVISIONING / "datasources" / "influxdb.yaml")["datasources"]
    assert source["type"] == "influxdb"
    assert source["jsonData"]["version"] == "InfluxQL"
    assert source["url"] == "${BPSTREAM_INFLUX_URL}"
    assert source["jsonData"]["dbName"] == "${BPSTREAM_INFLUX_DATABASE}"
    assert source["secureJsonData"]["password"] == "${BPSTREAM_INFLUX_READ_PASSWORD}"
    # HTTPS verified against the CA that compose mounts for Grafana
    assert source["jsonData"]["tlsAuthWithCACert"] is True and source["jsonData"]["tlsSkipVerify"] is False
    ca_file = source["secureJsonData"]["tlsCACert"].removeprefix("$__file{").removesuffix("}")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert any(str(m).endswith(f"ca.crt:{ca_file}:ro") for m in compose["services"]["grafana"]["volumes"])


def test_environment_references_are_given_to_grafana_by_compose() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana_env = set(compose["services"]["grafana"]["environment"])
    for path in sorted(PROVISIONING.rglob("*.yaml")):
        data = load(path)
        if path.name == "rules.yaml":
            # Grafana expands $VARS in rule titles and labels but not in models or annotations.
            texts = [json.dumps([r["title"], r["labels"]]) for r in rules()]
        else:
            texts = [path.read_text()]
        for text in texts:
            for match in re.finditer(r"\$(\{?)(?!__file\{)([A-Za-z_][A-Za-z0-9_]*)", text):  # $__file{}: a file
                assert match.group(1) == "{", f"{path.name}: bare ${match.group(2)} would be expanded"
                assert match.group(2) in grafana_env, f"{path.name}: {match.group(2)} not set for Grafana"
        assert data


def test_dashboard_provider_path_is_where_compose_mounts_the_dashboards() -> None:
    (provider,) = load(PROVISIONING / "dashboards" / "bpstream.yaml")["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_dashboards_reference_the_provisioned_datasource_and_their_variables() -> None:
    (source,) = load(PROVISIONING / "datasources" / "influxdb.yaml")["datasources"]
    found = dashboards()
    assert set(found) == {"bpstream-fleet", "bpstream-patient", "bpstream-pipeline"}
    for uid, dashboard in found.items():
        variables = {v["name"] for v in dashboard["templating"]["list"]}
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), uid
        for panel in dashboard["panels"]:
            assert panel["targets"], (uid, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == source["uid"]
                assert target["rawQuery"] is True
                query = target["query"]
                assert "$timeFilter" in query or "now()" in query, (uid, panel["title"])
                used = set(re.findall(r"\$([a-z][a-z_]*)\b", query)) - {"timeFilter"}
                assert used <= variables, (uid, panel["title"], used)
        for variable in dashboard["templating"]["list"]:
            assert variable["datasource"]["uid"] == source["uid"]


def test_patient_dashboard_filters_every_panel_on_the_device_variable() -> None:
    patient = dashboards()["bpstream-patient"]
    (device,) = [v for v in patient["templating"]["list"] if v["name"] == "device"]
    assert device["multi"] is False
    for panel in patient["panels"]:
        for target in panel["targets"]:
            assert '"device" =~ /^$device$/' in target["query"], panel["title"]


def test_alert_rules_are_well_formed() -> None:
    (source,) = load(PROVISIONING / "datasources" / "influxdb.yaml")["datasources"]
    all_rules = rules()
    assert {r["title"] for r in all_rules} == {
        "Hypertensive crisis", "Sustained stage 2 hypertension", "Device silent", "Calibration due",
        "Pipeline consumer lag too high", "Dead-letter rate", "Alert episode open (critical)",
        "Alert episode open (warning)", "Notification delivery failing"}
    assert len({r["uid"] for r in all_rules}) == len(all_rules)
    for rule in all_rules:
        refs = [item["refId"] for item in rule["data"]]
        assert len(refs) == len(set(refs)), rule["uid"]
        assert rule["condition"] in refs, rule["uid"]
        for item in rule["data"]:
            model = item["model"]
            assert model["refId"] == item["refId"]
            if item["datasourceUid"] == "__expr__":
                sources = re.findall(r"\$\{?([A-Z])\}?", model["expression"]) or [model["expression"]]
                assert set(sources) <= set(refs), (rule["uid"], model["expression"])
            else:
                assert item["datasourceUid"] == source["uid"]
                assert "$timeFilter" in model["query"]
                assert item["relativeTimeRange"]["from"] > item["relativeTimeRange"]["to"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["noDataState"] == "OK"
        assert rule["annotations"]["__dashboardUid__"] in dashboards()


def test_dashboards_show_mode_interval_calibration_age_and_withheld_windows() -> None:
    patient = {panel["title"]: panel for panel in dashboards()["bpstream-patient"]["panels"]}
    queries = {title: " ".join(t["query"] for t in panel["targets"]) for title, panel in patient.items()}
    assert 'last("mode")' in queries["Estimate mode"]
    assert 'last("calibration_age_s")' in queries["Calibration age"]
    assert all(f'"{bound}"' in queries["Estimate with its 90% interval"]
               for bound in ("sbp_lo", "sbp_hi", "dbp_lo", "dbp_hi"))
    assert '"withheld_flag" = 1' in queries["Withheld windows by reason"]
    assert '"withheld"' in queries["Withheld windows (latest)"]
    assert '"bp_cuff"' in queries["Cuff readings"]
    fleet = {panel["title"]: panel for panel in dashboards()["bpstream-fleet"]["panels"]}
    assert 'last("calibration_age_s")' in fleet["Calibration per patient"]["targets"][0]["query"]


def test_pressure_rules_judge_only_estimates_that_may_be_shown() -> None:
    by_title = {rule["title"]: rule for rule in rules()}
    for title in ("Hypertensive crisis", "Sustained stage 2 hypertension"):
        for item in by_title[title]["data"]:
            if item["datasourceUid"] != "__expr__":
                assert '"withheld_flag" = 0' in item["model"]["query"], title
    # stage 2 rests on calibrated estimates only (a crisis may be judged uncalibrated, as in the alerting)
    stage2 = [i["model"]["query"] for i in by_title["Sustained stage 2 hypertension"]["data"] if "query" in i["model"]]
    assert all('"calibrated" = 1' in q for q in stage2)
    due = [i["model"]["query"] for i in by_title["Calibration due"]["data"] if "query" in i["model"]]
    assert due and all("'calibration_due'" in q and '"bp_alert"' in q for q in due)


def _route(labels: dict[str, str], policy: dict[str, Any]) -> str:
    """The receiver Alertmanager picks: the first matching child route (none set continue), else the root."""
    for route in policy.get("routes", []):
        if all(labels.get(name) == value for name, op, value in route["object_matchers"] if op == "="):
            return _route(labels, route) if route.get("routes") else str(route["receiver"])
    return str(policy["receiver"])


def test_every_alert_reaches_the_right_contact_point() -> None:
    (policy,) = load(PROVISIONING / "alerting" / "notification-policies.yaml")["policies"]
    points = {p["name"] for p in load(PROVISIONING / "alerting" / "contact-points.yaml")["contactPoints"]}
    clinicians, operators = "bpstream-clinicians", "bpstream-operators"
    expected = {"Hypertensive crisis": clinicians, "Sustained stage 2 hypertension": clinicians,
                "Device silent": clinicians, "Calibration due": clinicians,
                "Pipeline consumer lag too high": operators,
                "Dead-letter rate": operators, "Alert episode open (critical)": clinicians,
                "Alert episode open (warning)": clinicians, "Notification delivery failing": operators}
    for rule in rules():
        receiver = _route(rule["labels"], policy)
        assert receiver in points
        assert receiver == expected[rule["title"]], rule["title"]
    # A crisis is notified per patient, at once.
    (crisis_route,) = [r for r in policy["routes"] if ["severity", "=", "critical"] in r["object_matchers"]]
    assert "device" in crisis_route["group_by"]
    assert crisis_route["group_wait"] == "0s"


def test_contact_points_use_templates_that_exist() -> None:
    (template,) = load(PROVISIONING / "alerting" / "templates.yaml")["templates"]
    defined = set(re.findall(r'define "([^"]+)"', template["template"]))
    assert "$" not in template["template"]  # would be expanded by Grafana's provisioning
    for point in load(PROVISIONING / "alerting" / "contact-points.yaml")["contactPoints"]:
        for receiver in point["receivers"]:
            settings = json.dumps(receiver["settings"]).replace('\\"', '"')
            used = set(re.findall(r'template "([^"]+)"', settings))
            assert used, receiver["uid"]
            assert used <= defined, receiver["uid"]


def test_kubernetes_configmaps_carry_every_provisioning_file_unchanged() -> None:
    import kubernetes_validate
    from test_deploy_k8s import KUBERNETES_VERSIONS, kustomize_command

    result = subprocess.run([*kustomize_command(), str(GRAFANA)], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    carried: dict[str, str] = {}
    for doc in yaml.safe_load_all(result.stdout):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
        assert doc["kind"] == "ConfigMap"
        assert {"grafana_dashboard", "grafana_datasource", "grafana_alert"} & set(doc["metadata"]["labels"])
        carried.update(doc["data"])
    files = [*(GRAFANA / "dashboards").glob("*.json"), *(PROVISIONING / "datasources").glob("*.yaml"),
             *(PROVISIONING / "alerting").glob("*.yaml")]
    assert carried == {path.name: path.read_text() for path in files}
