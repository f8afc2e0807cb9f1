"""The Kubernetes manifests (deploy/k8s): every overlay rendered with kustomize and validated offline.

Rendering uses a real kustomize (`kustomize build`, or the one built into `kubectl kustomize`); every
core resource is validated with kubernetes-validate --strict against the Kubernetes OpenAPI schema of
the versions below, and KEDA resources against deploy/schemas/keda-v1alpha1.json (a structural schema
written for bpstream, since KEDA's CRD is not available offline). On top of schema validity the tests
check what an operator relies on: probes, limits, hardening, disruption budgets, network policies,
GPU scheduling, and scaling tied to the partition count of the consumed topic.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from bpstream.shared.topics import ALL_TOPICS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod-gpu", "prod-hpa")
KUBERNETES_VERSIONS = ("1.31.0", "1.33.0")
PARTITIONS = {topic.name: topic.partitions for topic in ALL_TOPICS}
#: The Kafka consumer group of each autoscaled deployment and the topic it consumes.
CONSUMES = {"processor": ("bpstream-processor", "signals.raw"),
            "inference": ("bpstream-inference", "windows")}
SERVICES = ("bridge", "processor", "inference", "alerting", "writer", "notifier")
#: Settings prefix of a service whose prefix is not its name (BPSTREAM_NOTIFY_* for the notifier).
ENV_PREFIX = {"notifier": "NOTIFY"}


def kustomize_command() -> list[str]:
    beside_python = Path(sys.executable).parent / "kustomize"  # where bootstrap's `go install` puts it
    if binary := shutil.which("kustomize") or (str(beside_python) if beside_python.is_file() else None):
        return [binary, "build"]
    if binary := shutil.which("kubectl"):
        return [binary, "kustomize"]
    raise AssertionError("neither kustomize nor kubectl is installed: run scripts/bootstrap.sh "
                         "(GOBIN=$PWD/.venv/bin go install sigs.k8s.io/kustomize/kustomize/v5@v5.5.0)")


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run([*kustomize_command(), str(K8S / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def by_kind(overlay: str, kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in render(overlay) if doc["kind"] == kind}


def workloads(overlay: str) -> dict[str, dict[str, Any]]:
    """Deployments and StatefulSets (the bridge is a StatefulSet for stable MQTT client ids)."""
    return {**by_kind(overlay, "Deployment"), **by_kind(overlay, "StatefulSet")}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment).get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_core_manifest_is_valid_in_strict_mode(overlay: str, version: str) -> None:
    checked = 0
    for doc in render(overlay):
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = f"{overlay} {doc['kind']}/{doc['metadata']['name']}"
            raise AssertionError(f"{where}: {error.message}") from error
        checked += 1
    assert checked >= 25


def test_strict_validation_catches_a_misspelled_field() -> None:
    deployment = json.loads(json.dumps(by_kind("dev", "Deployment")["writer"]))
    container(deployment)["readinesProbe"] = container(deployment).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def keda_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((ROOT / "deploy" / "schemas" / "keda-v1alpha1.json").read_text())
    return schema


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_resources_match_their_schema(overlay: str) -> None:
    for doc in render(overlay):
        if doc["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(doc, keda_schema())


def test_keda_schema_rejects_an_unknown_field() -> None:
    scaled = json.loads(json.dumps(by_kind("prod-gpu", "ScaledObject")["inference"]))
    scaled["spec"]["maxReplicas"] = 6
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, keda_schema())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_have_probes_limits_and_hardening(overlay: str) -> None:
    deployments = workloads(overlay)
    assert set(deployments) == set(SERVICES)
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        main = container(deployment)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert main[probe]["httpGet"]["path"] == "/healthz", (name, probe)
        assert {"cpu", "memory"} <= set(main["resources"]["requests"]), name
        assert {"cpu", "memory"} <= set(main["resources"]["limits"]), name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        security = main["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        for init in pod.get("initContainers", []):
            assert init["securityContext"] == security, (name, init["name"])
            assert {"cpu", "memory"} <= set(init["resources"]["limits"]), (name, init["name"])
        # The read-only root needs a writable /tmp.
        assert any(m["mountPath"] == "/tmp" for m in main["volumeMounts"]), name
        # The metrics port the probes use is the one the service is told to serve on.
        assert env_of(deployment)[f"BPSTREAM_{ENV_PREFIX.get(name, name.upper())}_METRICS_PORT"] == "9100", name
        assert main["ports"][0]["containerPort"] == 9100, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_comes_from_configmaps_and_secrets_that_exist(overlay: str) -> None:
    configmaps = by_kind(overlay, "ConfigMap")
    secrets = by_kind(overlay, "Secret")
    for name, deployment in workloads(overlay).items():
        for source in container(deployment)["envFrom"]:
            assert source["configMapRef"]["name"] in configmaps, name
        for value in env_of(deployment).values():
            if isinstance(value, dict) and "secretKeyRef" in value:
                ref = value["secretKeyRef"]
                if overlay == "dev":
                    assert ref["name"] in secrets, name
                    assert ref["key"] in secrets[ref["name"]]["data"] or ref.get("optional"), (name, ref)
    if overlay != "dev":
        assert secrets == {}, "production credentials must not be rendered from the repository"
    # No credential in a ConfigMap.
    for configmap in configmaps.values():
        assert not any("PASSWORD" in key for key in configmap.get("data", {}))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_disruption_budget_and_network_policies(overlay: str) -> None:
    budgets = by_kind(overlay, "PodDisruptionBudget")
    for name, deployment in workloads(overlay).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets.values()
                    if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matching) == 1, name
    policies = by_kind(overlay, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {}
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny
    assert "egress" not in deny
    egress_ports = {(p["name"] if "name" in p else p["metadata"]["name"]):
                    {port["port"] for rule in p["spec"].get("egress", []) for port in rule["ports"]}
                    for p in policies.values()}
    assert egress_ports["allow-kafka-egress"] == {9092, 9093}
    assert egress_ports["allow-influxdb-egress-writer"] == {8086}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_enforces_restricted_pod_security(overlay: str) -> None:
    namespaces = by_kind(overlay, "Namespace")
    assert len(namespaces) == 1
    (namespace,) = namespaces.values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in render(overlay):
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace["metadata"]["name"], doc["metadata"]["name"]


def test_keda_max_replicas_equal_the_partitions_of_the_consumed_topic() -> None:
    scaled = by_kind("prod-gpu", "ScaledObject")
    assert set(scaled) == set(CONSUMES)
    for name, (group, topic) in CONSUMES.items():
        spec = scaled[name]["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        (trigger,) = spec["triggers"]
        assert trigger["metadata"]["consumerGroup"] == group
        assert trigger["metadata"]["topic"] == topic
        assert trigger["metadata"]["allowIdleConsumers"] == "false"
        assert spec["maxReplicaCount"] == PARTITIONS[topic], name
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        # The scaler reads the brokers from the same variable the service does.
        env_from = container(by_kind("prod-gpu", "Deployment")[name])["envFrom"]
        configmap_name = env_from[0]["configMapRef"]["name"]
        configmap = by_kind("prod-gpu", "ConfigMap")[configmap_name]["data"]
        assert trigger["metadata"]["bootstrapServersFromEnv"] in configmap


def test_hpa_alternative_scales_on_the_same_lag_with_the_same_bounds() -> None:
    hpas = by_kind("prod-hpa", "HorizontalPodAutoscaler")
    assert by_kind("prod-hpa", "ScaledObject") == {}
    for name, (group, topic) in CONSUMES.items():
        spec = hpas[name]["spec"]
        assert spec["maxReplicas"] == PARTITIONS[topic], name
        (metric,) = spec["metrics"]
        selector = metric["external"]["metric"]["selector"]["matchLabels"]
        assert selector == {"consumergroup": group, "topic": topic}


def test_groups_and_topics_are_the_ones_the_pipeline_uses() -> None:
    # The writer measures lag per group from this table; the scalers must name the same group and topic.
    from bpstream.shared.lag import PIPELINE_GROUPS

    for group, topic in CONSUMES.values():
        assert topic in {t.name for t in PIPELINE_GROUPS[group]}


def test_gpu_overlay_schedules_inference_on_gpus_and_others_stay_on_cpu() -> None:
    gpu = by_kind("prod-gpu", "Deployment")["inference"]
    main = container(gpu)
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert main["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert main["image"].endswith("-cuda")
    assert env_of(gpu)["BPSTREAM_INFERENCE_DEVICE"] == "cuda"
    pod = gpu["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    for overlay in ("dev", "prod-hpa"):
        cpu = by_kind(overlay, "Deployment")["inference"]
        assert "nvidia.com/gpu" not in container(cpu)["resources"]["limits"]
        assert env_of(cpu)["BPSTREAM_INFERENCE_DEVICE"] == "cpu"
        assert not container(cpu)["image"].endswith("-cuda")
    for name, deployment in workloads("prod-gpu").items():
        if name != "inference":
            assert "nvidia.com/gpu" not in container(deployment)["resources"]["limits"], name


def test_inference_serves_the_models_volume_seeded_from_the_image() -> None:
    for overlay in OVERLAYS:
        inference = by_kind(overlay, "Deployment")["inference"]
        pod = inference["spec"]["template"]["spec"]
        mount = {m["name"]: m for m in container(inference)["volumeMounts"]}["models"]
        assert mount["readOnly"] is True
        assert env_of(inference)["BPSTREAM_INFERENCE_MODEL_PATH"] == mount["mountPath"]
        (seed,) = pod["initContainers"]
        assert seed["image"] == container(inference)["image"]
        assert "cp -Rn " in seed["command"][-1]  # -n: never overwrites a version already in the volume
        claim = {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"]["claimName"]
        assert claim in by_kind(overlay, "PersistentVolumeClaim")


def test_bridges_keep_stable_names_for_their_mqtt_sessions() -> None:
    for overlay in OVERLAYS:
        bridge = by_kind(overlay, "StatefulSet")["bridge"]
        assert by_kind(overlay, "Service")[bridge["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
        assert by_kind(overlay, "HorizontalPodAutoscaler")["bridge"]["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"


def test_production_talks_tls_to_kafka_and_mqtt() -> None:
    for overlay in ("prod-gpu", "prod-hpa"):
        data = by_kind(overlay, "ConfigMap")["bpstream-config"]["data"]
        assert data["BPSTREAM_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert data["BPSTREAM_MQTT_TLS"] == "true"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_has_its_own_kafka_user_and_trusts_the_ca(overlay: str) -> None:
    configmap = by_kind(overlay, "ConfigMap")["bpstream-config"]["data"]
    assert (configmap["BPSTREAM_KAFKA_SECURITY_PROTOCOL"], configmap["BPSTREAM_KAFKA_SASL_MECHANISM"]) == \
        ("SASL_SSL", "SCRAM-SHA-512")
    assert configmap["BPSTREAM_INFLUX_URL"].startswith("https://")
    for name, deployment in workloads(overlay).items():
        env = env_of(deployment)
        for field, key in (("USERNAME", "username"), ("PASSWORD", "password")):
            ref = env[f"BPSTREAM_KAFKA_SASL_{field}"]["secretKeyRef"]
            assert ref["key"] == f"kafka-{name}-{key}" and not ref.get("optional"), (overlay, name)
        mounts = {m["mountPath"]: m for m in container(deployment)["volumeMounts"]}
        ca_dir = configmap["BPSTREAM_KAFKA_SSL_CA_FILE"].rsplit("/", 1)[0]
        assert mounts[ca_dir]["readOnly"] is True, (overlay, name)
        assert configmap["BPSTREAM_INFLUX_CA_FILE"] == configmap["BPSTREAM_KAFKA_SSL_CA_FILE"]
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes[mounts[ca_dir]["name"]]["configMap"]["name"] == "bpstream-ca", (overlay, name)


def test_production_replicates_every_topic_three_times() -> None:
    for overlay in ("prod-gpu", "prod-hpa"):
        assert by_kind(overlay, "ConfigMap")["bpstream-config"]["data"]["BPSTREAM_KAFKA_REPLICATION_FACTOR"] == "3"
    assert by_kind("dev", "ConfigMap")["bpstream-config"]["data"]["BPSTREAM_KAFKA_REPLICATION_FACTOR"] == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_bridges_reach_mqtt_over_tls_only_with_the_broker_ca(overlay: str) -> None:
    data = by_kind(overlay, "ConfigMap")["bpstream-config"]["data"]
    assert (data["BPSTREAM_MQTT_TLS"], data["BPSTREAM_MQTT_PORT"]) == ("true", "8883")
    bridge = by_kind(overlay, "StatefulSet")["bridge"]
    mounts = {m["name"]: m["mountPath"] for m in container(bridge)["volumeMounts"]}
    volumes = {v["name"]: v for v in bridge["spec"]["template"]["spec"]["volumes"]}
    assert data["BPSTREAM_MQTT_CA_FILE"] == f"{mounts['mqtt-ca']}/ca.crt"
    assert volumes["mqtt-ca"]["secret"]["secretName"] == "bpstream-mqtt-ca"
    policy = by_kind(overlay, "NetworkPolicy")["allow-mqtt-egress-bridge"]
    assert [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]] == [8883]  # no plaintext
