"""Kafka secured like a deployment: SASL_SSL (SCRAM-SHA-512) on loopback, one user per service, ACLs.

* Users: ``admin`` (tools, tests, provisioning; a super user) and one per service, passwords random, kept in
  ``state_dir()/kafka-users.json`` (mode 0600) and given to KRaft at format time (``--add-scram``).
* Listeners: ``CLIENT`` is SASL_SSL with the server certificate from the local CA (PEM key store); the only
  other listener is the controller's, internal to the broker, on loopback and mutual TLS (the broker's own
  certificate, principal ``User:CN=kafka``). There is no PLAINTEXT listener.
* ACLs (StandardAuthorizer, deny by default): each service may read, write, create and join only what
  :data:`SERVICE_ACLS` lists. Topic and group names carry a deployment prefix (tests: a random one per test),
  so the grants are made per prefix: :func:`grant_prefix` (the test fixtures and the demo harness call it
  through the admin for their prefix; a deployment runs it once for its own prefix, "" included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from bpstream.localservers.credentials import stored_passwords, write_private
from bpstream.shared.settings import KafkaSettings

if TYPE_CHECKING:
    from bpstream.localservers import pki

MECHANISM = "SCRAM-SHA-512"
ADMIN = "admin"
SERVICES: tuple[str, ...] = ("bridge", "processor", "inference", "alerting", "writer", "notifier")
BROKER_PRINCIPAL = "User:CN=kafka"

# Kafka protocol codes (org.apache.kafka.common.acl / resource).
_TOPIC, _GROUP = 2, 3
_LITERAL, _PREFIXED = 3, 4
_READ, _WRITE, _CREATE, _DESCRIBE, _DESCRIBE_CONFIGS = 3, 4, 5, 8, 10
_ALLOW = 3

READ = ("read",)
WRITE = ("write",)
DESCRIBE = ("describe",)
OWN = ("read", "write", "create")  # a service's private state topic, created by the service at start


@dataclass(frozen=True, slots=True)
class ServiceAcl:
    """What one service may do: topics (name without prefix -> rights), and consumer-group name prefixes."""

    topics: Mapping[str, Sequence[str]]
    groups: Sequence[str] = ()
    #: Topic name prefixes (without the deployment prefix) the service owns entirely (Faust's internal topics).
    topic_prefixes: Sequence[str] = ()
    #: Groups whose offsets the service only looks at (the writer's lag samples).
    monitored_groups: Sequence[str] = ()


#: The rights each service needs, from the topics it reads and writes (bpstream.shared.topics).
SERVICE_ACLS: Mapping[str, ServiceAcl] = {
    "bridge": ServiceAcl({"signals.raw": WRITE, "signals.dlq": WRITE, "cuff": WRITE}),
    "processor": ServiceAcl({"signals.raw": READ, "signals.dlq": WRITE, "windows": WRITE, "quality": WRITE},
                            groups=("bpstream-processor",), topic_prefixes=("bpstream-processor",)),
    "inference": ServiceAcl({"windows": READ, "cuff": READ, "estimates": WRITE, "signals.dlq": WRITE,
                             "calibration.state": OWN}, groups=("bpstream-inference",)),
    "alerting": ServiceAcl({"estimates": READ, "alerts": WRITE, "signals.dlq": WRITE, "cuff": READ,
                            "alerting.state": OWN},
                           groups=("bpstream-alerting",)),
    # the writer also samples every pipeline group's lag (offsets only: DESCRIBE)
    "writer": ServiceAcl({"estimates": READ, "alerts": READ, "quality": READ, "signals.dlq": ("read", "write"),
                          "cuff": READ,
                          "notifications": READ, "signals.raw": DESCRIBE, "windows": DESCRIBE},
                         groups=("bpstream-writer",),
                         monitored_groups=("bpstream-processor", "bpstream-inference", "bpstream-alerting")),
    "notifier": ServiceAcl({"alerts": READ, "alerts.acks": READ, "notify.state": OWN, "notifications": WRITE,
                            "signals.dlq": WRITE},
                           groups=("bpstream-notifier",)),
}

# A service creates the topics it uses when they are missing (ensure_topics at start), so read and write
# include CREATE of that one topic name.
_OPS = {"read": (_READ, _DESCRIBE, _DESCRIBE_CONFIGS, _CREATE), "write": (_WRITE, _DESCRIBE, _CREATE),
        "create": (_CREATE, _DESCRIBE), "describe": (_DESCRIBE,)}


def users(state: Path) -> dict[str, str]:
    """Every Kafka user and its password (created once, mode 0600, reused afterwards)."""
    return stored_passwords(state / "kafka-users.json", (ADMIN, *SERVICES))


def write_key_store(files: pki.TlsFiles, store: Path) -> None:
    """Kafka's PEM key store (``ssl.keystore.type=PEM``): the private key and the certificate, mode 0600."""
    write_private(store, files.key.read_text() + files.cert.read_text())


def server_tls(state: Path) -> pki.TlsFiles:
    """The broker's certificate from the local CA, and its PEM key store."""
    from bpstream.localservers import pki  # cryptography: local servers and tools only, not the images

    files = pki.issue(pki.ensure_ca(state / "pki"), "kafka")
    write_key_store(files, state / "pki" / "kafka-keystore.pem")
    return files


def server_properties(state: Path, port: int, controller_port: int) -> list[str]:
    """The listener, TLS, SASL and authorizer lines of ``server.properties``."""
    tls = server_tls(state)
    admin = users(state)[ADMIN]
    jaas = f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{ADMIN}" password="{admin}";'
    return [
        f"listeners=CLIENT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        f"advertised.listeners=CLIENT://127.0.0.1:{port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=CLIENT",
        "listener.security.protocol.map=CONTROLLER:SSL,CLIENT:SASL_SSL",
        f"sasl.enabled.mechanisms={MECHANISM}",
        f"sasl.mechanism.inter.broker.protocol={MECHANISM}",
        f"listener.name.client.scram-sha-512.sasl.jaas.config={jaas}",
        "ssl.keystore.type=PEM",
        f"ssl.keystore.location={state / 'pki' / 'kafka-keystore.pem'}",
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={tls.ca}",
        "listener.name.controller.ssl.client.auth=required",
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        f"super.users=User:{ADMIN};{BROKER_PRINCIPAL}",
        "allow.everyone.if.no.acl.found=false",
    ]


def format_args(state: Path) -> list[str]:
    """``StorageTool format`` arguments that store every user's SCRAM credentials in the metadata log."""
    out: list[str] = []
    for name, password in sorted(users(state).items()):
        out += ["--add-scram", f"{MECHANISM}=[name={name},password={password}]"]
    return out


def formatted_marker(state: Path) -> str:
    """What the log folder must have been formatted with: the user names (a new user needs a new format)."""
    return ",".join(sorted(users(state)))


def client_settings(state: Path, bootstrap: str, user: str = ADMIN, *, topic_prefix: str = "") -> KafkaSettings:
    """Settings for ``user`` (a service name or ``admin``) on the local broker."""
    return KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=topic_prefix, security_protocol="SASL_SSL",
                         sasl_mechanism=MECHANISM, sasl_username=user,
                         sasl_password=SecretStr(users(state)[user]),
                         ssl_ca_file=str(state / "pki" / "ca.crt"))


def client_env(state: Path, user: str | None = ADMIN) -> dict[str, str]:
    """``BPSTREAM_KAFKA_*`` variables with ``user``'s credentials (none for None) and the CA."""
    env = {
        "BPSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "BPSTREAM_KAFKA_SASL_MECHANISM": MECHANISM,
        "BPSTREAM_KAFKA_SSL_CA_FILE": str(state / "pki" / "ca.crt"),
    }
    if user:
        env |= {"BPSTREAM_KAFKA_SASL_USERNAME": user, "BPSTREAM_KAFKA_SASL_PASSWORD": users(state)[user]}
    return env


def acl_entries(prefix: str, service: str) -> list[tuple[int, str, int, int]]:
    """(resource type, name, pattern type, operation) of every ACL ``service`` gets under ``prefix``."""
    acl = SERVICE_ACLS[service]
    entries: list[tuple[int, str, int, int]] = []
    for topic, rights in acl.topics.items():
        for right in rights:
            entries += [(_TOPIC, f"{prefix}{topic}", _LITERAL, op) for op in _OPS[right]]
    for owned in acl.topic_prefixes:
        entries += [(_TOPIC, f"{prefix}{owned}", _PREFIXED, op) for op in (_READ, _WRITE, _CREATE, _DESCRIBE,
                                                                          _DESCRIBE_CONFIGS)]
    for group in acl.groups:
        entries += [(_GROUP, f"{prefix}{group}", _PREFIXED, op) for op in (_READ, _DESCRIBE)]
    for group in acl.monitored_groups:
        entries.append((_GROUP, f"{prefix}{group}", _LITERAL, _DESCRIBE))
    return list(dict.fromkeys(entries))


async def grant_prefix(admin: KafkaSettings, prefix: str, services: Sequence[str] = SERVICES) -> int:
    """Create every service's ACLs for topics and groups under ``prefix`` (idempotent); return how many."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.protocol.admin import CreateAclsRequest

    client = AIOKafkaAdminClient(**admin.client_kwargs())
    await client.start()
    count = 0
    try:
        for service in services:
            for rtype, name, pattern, op in acl_entries(prefix, service):
                response = await client._send_request(  # aiokafka has no public ACL API
                    CreateAclsRequest(rtype, name, pattern, f"User:{service}", "*", op, _ALLOW))
                for code, message in response.creation_responses:
                    if code:
                        raise RuntimeError(f"creating an ACL for {service} on {name} failed: {code} {message}")
                count += 1
    finally:
        await client.close()
    return count


_OP_NAMES = {_READ: "Read", _WRITE: "Write", _CREATE: "Create", _DESCRIBE: "Describe",
             _DESCRIBE_CONFIGS: "DescribeConfigs"}


def acl_grants(service: str) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """The ACLs of ``service`` grouped for ``kafka-acls.sh`` (deployments): (resource type ``topic``/
    ``group``, pattern ``literal``/``prefixed``, operations, names without the prefix), one call each."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for rtype, name, pattern, op in acl_entries("", service):
        grouped.setdefault(("topic" if rtype == _TOPIC else "group",
                            "literal" if pattern == _LITERAL else "prefixed", name), []).append(_OP_NAMES[op])
    calls: dict[tuple[str, str, tuple[str, ...]], list[str]] = {}
    for (rtype_name, pattern_name, name), ops in grouped.items():
        calls.setdefault((rtype_name, pattern_name, tuple(sorted(ops))), []).append(name)
    return [(r, p, ops, tuple(sorted(names))) for (r, p, ops), names in sorted(calls.items())]


def deployment_grant_lines() -> list[str]:
    """``grant SERVICE TYPE PATTERN OPS NAME...`` lines for the kafka-init scripts of the deployments."""
    return [f"grant {service} {rtype} {pattern} {','.join(ops)} {' '.join(names)}"
            for service in SERVICES for rtype, pattern, ops, names in acl_grants(service)]
