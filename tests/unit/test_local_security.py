"""The local servers' security set-up without running them: credentials files, Kafka's config and format
command, and the per-service ACL table checked against the topics and groups the services use."""

from __future__ import annotations

import importlib
import stat
from pathlib import Path

import pytest

from bpstream.localservers import influx_security, kafka_security, servers
from bpstream.shared import topics

pytestmark = pytest.mark.unit


def test_generated_credentials_are_private_random_and_stable(tmp_path: Path) -> None:
    kafka, influx = kafka_security.users(tmp_path), influx_security.users(tmp_path)
    assert set(kafka) == {"admin", *kafka_security.SERVICES}
    assert set(influx) == {"admin", "writer", "grafana"}
    assert len(set(kafka.values())) == len(kafka) and all(len(p) >= 32 for p in kafka.values())
    for name in ("kafka-users.json", "influx-users.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert kafka_security.users(tmp_path) == kafka and influx_security.users(tmp_path) == influx  # reused


def test_kafka_has_no_plaintext_listener_and_formats_with_every_scram_user(tmp_path: Path) -> None:
    state, root = tmp_path / "state", tmp_path / "kafka"
    (root / "data").mkdir(parents=True)
    (root / "data" / "meta.properties").write_text("formatted before SCRAM users existed\n")
    launch, format_cmd = servers.prepare_kafka(
        root, "java", "/libs", 19092, 19093, security=kafka_security.server_properties(state, 19092, 19093),
        format_args=kafka_security.format_args(state), formatted_as=kafka_security.formatted_marker(state))
    # the old log folder is wiped and formatted again, with the users
    assert not (root / "data" / "meta.properties").exists() and format_cmd is not None
    scram = [format_cmd[i + 1] for i, arg in enumerate(format_cmd) if arg == "--add-scram"]
    assert sorted(s.split("name=")[1].split(",")[0] for s in scram) == sorted(["admin", *kafka_security.SERVICES])
    props = (root / "server.properties").read_text()
    assert stat.S_IMODE((root / "server.properties").stat().st_mode) == 0o600  # it holds the admin's password
    protocol_map = next(line for line in props.splitlines() if line.startswith("listener.security.protocol.map="))
    assert "PLAINTEXT" not in protocol_map
    assert "listener.name.controller.ssl.client.auth=required" in props
    assert "allow.everyone.if.no.acl.found=false" in props
    assert all("127.0.0.1:" in line for line in props.splitlines() if line.startswith("listeners="))
    assert launch.ports == {"port": 19092, "controller_port": 19093}
    # formatted with the same users: kept
    (root / "data" / "meta.properties").write_text("formatted\n")
    _, again = servers.prepare_kafka(root, "java", "/libs", 19092, 19093, security=[],
                                     formatted_as=kafka_security.formatted_marker(state))
    assert again is None and (root / "data" / "meta.properties").exists()


def test_each_services_acls_name_only_topics_and_groups_the_services_use() -> None:
    declared = {value.name for value in vars(topics).values() if isinstance(value, topics.KafkaTopic)}
    for service, acl in kafka_security.SERVICE_ACLS.items():
        assert set(acl.topics) <= declared, service
        assert "signals.dlq" in acl.topics and "write" in acl.topics["signals.dlq"], service  # every stage DLQs
        module = importlib.import_module(f"bpstream.services.{service}.settings")
        settings = next(v for v in vars(module).values() if isinstance(v, type) and v.__name__.endswith("Settings")
                        and v.__module__ == module.__name__)
        own_group = settings.model_fields.get("group_id") or settings.model_fields.get("app_id")
        if own_group is not None:
            assert own_group.default in acl.groups, service
    entries = set(kafka_security.acl_entries("p.", "bridge"))
    assert (2, "p.signals.raw", 3, 4) in entries  # literal WRITE on its own topic, under the prefix
    assert not any(name == "p.signals.raw" and op == 3 for _t, name, _p, op in entries)  # no READ of it
    assert not any(name.endswith("estimates") for _t, name, _p, _o in entries)


def test_each_process_gets_its_own_users_and_tools_the_admin(tmp_path: Path) -> None:
    from bpstream.localservers import ServerEndpoints

    servers = ServerEndpoints("127.0.0.1", 1883, "127.0.0.1:9092", "https://127.0.0.1:8086", secrets_dir=str(tmp_path))
    passwords = kafka_security.users(tmp_path)
    for service in kafka_security.SERVICES:
        env = servers.env(service)
        assert env["BPSTREAM_KAFKA_SASL_USERNAME"] == service
        assert env["BPSTREAM_KAFKA_SASL_PASSWORD"] == passwords[service]
        assert env["BPSTREAM_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert env["BPSTREAM_KAFKA_SSL_CA_FILE"] == env["BPSTREAM_INFLUX_CA_FILE"] == servers.ca_file
        # only the writer stores into InfluxDB
        assert env.get("BPSTREAM_INFLUX_USERNAME") == ("writer" if service == "writer" else None)
    assert servers.env()["BPSTREAM_KAFKA_SASL_USERNAME"] == "admin"
    assert servers.env()["BPSTREAM_INFLUX_USERNAME"] == "admin"
    assert "BPSTREAM_KAFKA_SASL_USERNAME" not in servers.env("simulator")  # not a Kafka client: no user
    assert servers.influx_settings("db", "grafana").username == "grafana"
    with pytest.raises(ValueError, match="no Kafka user"):
        servers.kafka_settings("p.", "simulator")
    # credentials never in a URL
    assert "@" not in servers.influx_settings("db", "writer").url
