"""Every BPSTREAM_* variable the deployments set is one the services read, with a value they accept.

The compose file and the Kubernetes overlays configure the services only through the environment; a
misspelt or renamed variable would be silently ignored (the settings classes ignore unknown variables).
So each variable is matched against the service's settings class (services/<name>/settings.py, its
env_prefix and fields) and the shared connection settings (shared/settings.py), and the settings class
is then built from exactly that environment, as the service would at start.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from bpstream.shared.settings import InfluxSettings, KafkaSettings, MqttSettings, ServiceSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("bridge", "processor", "inference", "alerting", "writer", "notifier")
#: Settings prefix of a service whose prefix is not its name (BPSTREAM_NOTIFY_* for the notifier).
ENV_PREFIX = {"notifier": "NOTIFY"}
SHARED: tuple[type[BaseSettings], ...] = (KafkaSettings, MqttSettings, InfluxSettings)


def settings_class(service: str) -> type[ServiceSettings]:
    module = importlib.import_module(f"bpstream.services.{service}.settings")
    found = [value for value in vars(module).values() if isinstance(value, type)
             and issubclass(value, ServiceSettings) and value is not ServiceSettings]
    assert len(found) == 1, f"{service}: expected one settings class, found {found}"
    return found[0]


def env_names(cls: type[BaseSettings], skip: frozenset[str] = frozenset()) -> set[str]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    return {(prefix + name).upper() for name in cls.model_fields if name not in skip}


def known(service: str) -> set[str]:
    names = env_names(settings_class(service), frozenset({"kafka", "mqtt", "influx"}))
    for shared in SHARED:
        names |= env_names(shared)
    return names


def build(service: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ServiceSettings:
    for name in list(os.environ):
        if name.startswith("BPSTREAM_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return settings_class(service)()


def compose_environment() -> dict[str, dict[str, str]]:
    from test_deploy_compose import run_compose

    result = run_compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = json.loads(result.stdout)["services"]
    return {name: {k: v or "" for k, v in service.get("environment", {}).items()}
            for name, service in services.items()}


def k8s_environment(overlay: str) -> dict[str, dict[str, str]]:
    from test_deploy_k8s import container, render, workloads

    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in render(overlay) if d["kind"] == "ConfigMap"}
    found: dict[str, dict[str, str]] = {}
    for name, workload in workloads(overlay).items():
        main = container(workload)
        env: dict[str, str] = {}
        for source in main.get("envFrom", []):
            env.update(configmaps[source["configMapRef"]["name"]])
        for item in main.get("env", []):
            # Secrets are not rendered for production; a placeholder stands for the value.
            env[item["name"]] = item.get("value", "placeholder-from-secret")
        found[name] = env
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_compose_sets_only_variables_the_service_reads(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    environments = compose_environment()
    for container_name in (service, "inference-gpu") if service == "inference" else (service,):
        env = {k: v for k, v in environments[container_name].items() if k.startswith("BPSTREAM_")}
        assert set(env) - known(service) == set(), container_name
        settings = build(service, env, monkeypatch)
        assert settings.metrics_port == 9100
        assert settings.metrics_host == "0.0.0.0"


def test_compose_simulator_reads_the_shared_mqtt_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in compose_environment()["simulator"].items() if k.startswith("BPSTREAM_")}
    assert set(env) <= env_names(MqttSettings)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert MqttSettings().username == "bpstream-simulator"


@pytest.mark.parametrize("overlay", ["dev", "prod-gpu", "prod-hpa"])
def test_kubernetes_sets_only_variables_the_services_read(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    everything_known = set().union(*(known(service) for service in SERVICES))
    for service, env in k8s_environment(overlay).items():
        # The shared ConfigMap reaches every service; each key must be read by some service...
        assert set(env) - everything_known == set(), (overlay, service)
        # ...and the variables set on this container by name, by this service.
        own = {k for k in env if k.startswith(f"BPSTREAM_{ENV_PREFIX.get(service, service.upper())}_")}
        assert own <= known(service), (overlay, service)
        settings = build(service, env, monkeypatch)
        assert settings.metrics_port == 9100


def test_gpu_overlay_asks_inference_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    env = k8s_environment("prod-gpu")["inference"]
    settings: Any = build("inference", env, monkeypatch)
    assert settings.device == "cuda"
    assert str(settings.model_path) == "/models"
    assert settings.kafka.security_protocol == "SASL_SSL"



@pytest.mark.parametrize("overlay", ["dev", "prod-gpu", "prod-hpa"])
async def test_kubernetes_kafka_settings_start_aiokafka_and_faust_clients(overlay: str, monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """SASL_SSL from the overlays gives aiokafka its ssl_context (it refuses SASL_SSL without one)."""
    from aiokafka import AIOKafkaProducer

    from bpstream.localservers.pki import ensure_ca
    from bpstream.shared.faust_broker import broker_credentials

    ca = ensure_ca(tmp_path)
    for service, env in k8s_environment(overlay).items():
        settings = build(service, {**env, "BPSTREAM_KAFKA_SSL_CA_FILE": str(ca.cert)}, monkeypatch)
        assert settings.kafka.security_protocol == "SASL_SSL", (overlay, service)
        kwargs = settings.kafka.client_kwargs()
        AIOKafkaProducer(**kwargs)  # raises without ssl_context, or without SASL credentials
        credentials = broker_credentials(settings.kafka)
        assert credentials is not None and credentials.ssl_context is not None, (overlay, service)  # type: ignore[union-attr]
