"""Fixtures shared by every test: the real local servers and per-test Kafka topics and InfluxDB databases.

Servers start only when a test asks for them (the ``servers`` fixture is lazy and session-scoped), so
``pytest -m unit`` never starts anything. If the servers cannot start, tests that need them fail with the
reason; nothing is skipped silently.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpstream.localservers import InstallError, ServerEndpoints, ServerError, ensure_up, influx_security, restart
from bpstream.localservers.core import _alive, _load_state
from bpstream.localservers.core import run_blocking as run_sync
from bpstream.shared import influx_api
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import ALL_TOPICS, topic_name

_TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under tests/unit are ``unit`` and under tests/integration ``integration`` unless marked.

    A test that is neither, or a ``unit`` test that asks for servers, stops the run: `make test` runs the two
    markers separately, so such a test would silently never run, or start servers in the fast stage.
    """
    misplaced = []
    for item in items:
        if not (item.get_closest_marker("unit") or item.get_closest_marker("integration")):
            path = Path(str(item.fspath)).resolve()
            if (_TESTS / "integration") in path.parents:
                item.add_marker(pytest.mark.integration)
            elif (_TESTS / "unit") in path.parents:
                item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("unit") and "servers" in getattr(item, "fixturenames", ()):
            misplaced.append(f"{item.nodeid} (a unit test that needs servers)")
        if not (item.get_closest_marker("unit") or item.get_closest_marker("integration")):
            misplaced.append(f"{item.nodeid} (neither unit nor integration: `make test` would never run it)")
    if misplaced:
        raise pytest.UsageError("misplaced tests:\n  " + "\n  ".join(misplaced))


@pytest.fixture(scope="session")
def servers(request: pytest.FixtureRequest) -> ServerEndpoints:
    """The running local Mosquitto, Kafka and InfluxDB (started, or reused, once per test session)."""
    try:
        return ensure_up()
    except (ServerError, InstallError) as exc:
        pytest.fail(f"local servers could not be started (`bpstream servers up`):\n{exc}", pytrace=False)


@pytest.fixture(scope="module")
def fresh_mosquitto_afterwards(servers: ServerEndpoints) -> Iterator[None]:
    """Restart the shared Mosquitto (cleanly: sessions are persisted) after a module that reloaded it with
    SIGHUP (``bpstream devices`` applies account changes that way). In full runs Debian's Mosquitto 2.0.11 died
    twice (a segfault in libc, in ``dmesg``) minutes after such reloads, taking the broker from every later test;
    the tests of the reload itself pass. Deployments use eclipse-mosquitto 2.0.20 (docs/SECURITY.md)."""
    yield
    restart("mosquitto")


@pytest.fixture(autouse=True)
def _mosquitto_alive(request: pytest.FixtureRequest) -> None:
    """Before a test that uses the servers: if the shared Mosquitto process has died, say so (a warning and
    ``reports/broker-crashes.log``) and start it again, so one broker crash fails at most the test it hit."""
    if "servers" not in request.fixturenames:
        return
    entry = _load_state().get("mosquitto")
    if entry is None or _alive(entry):
        return
    message = f"the local Mosquitto (pid {entry.get('pid')}) had died before {request.node.nodeid}; restarted"
    warnings.warn(message, stacklevel=1)
    log = Path("reports") / "broker-crashes.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {message}\n")
    restart("mosquitto")


@pytest.fixture
def topic_prefix() -> str:
    """A Kafka topic prefix unique to this test, e.g. ``t1a2b3c4d.``."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def kafka_settings(servers: ServerEndpoints, topic_prefix: str) -> KafkaSettings:
    """Kafka settings (SASL_SSL, the admin user) for the local broker with this test's topic prefix; every
    service's user is granted its ACLs under the prefix."""
    run_sync(lambda: servers.grant_kafka_prefix(topic_prefix))
    return servers.kafka_settings(topic_prefix)


@pytest.fixture
def kafka_topics(kafka_settings: KafkaSettings) -> Iterator[str]:
    """Create every topic of ``ALL_TOPICS`` under this test's prefix; return the prefix. Deleted afterwards."""
    from aiokafka.admin import AIOKafkaAdminClient

    from bpstream.shared.kafka import ensure_topics

    run_sync(lambda: ensure_topics(kafka_settings, ALL_TOPICS))
    yield kafka_settings.topic_prefix

    async def delete() -> None:
        admin = AIOKafkaAdminClient(**kafka_settings.client_kwargs())
        await admin.start()
        try:
            await admin.delete_topics([topic_name(t, kafka_settings.topic_prefix) for t in ALL_TOPICS])
        finally:
            await admin.close()

    run_sync(delete)


@pytest.fixture
def influx_db(servers: ServerEndpoints) -> Iterator[str]:
    """A fresh, uniquely named InfluxDB database (created by the admin, the writer granted WRITE and Grafana
    READ on it), dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    settings = servers.influx_settings(name)
    influx_security.grant_database_sync(settings, name)
    yield name
    with influx_api.sync_client(settings) as client:
        influx_api.influxql_sync(client, f"DROP DATABASE {influx_api.quote_identifier(name)}", epoch=None)


@pytest.fixture
def service_env(servers: ServerEndpoints, kafka_topics: str, influx_db: str) -> dict[str, str]:
    """``BPSTREAM_*`` variables for a tool under test (admin users): local servers, this test's topics and
    database. A service process takes ``servers.env(name)`` instead (its own users)."""
    return {
        **servers.env(),
        "BPSTREAM_KAFKA_TOPIC_PREFIX": kafka_topics,
        "BPSTREAM_INFLUX_DATABASE": influx_db,
    }


@pytest.fixture
def clinic() -> str:
    """A clinic id unique to this test, so a bridge under test sees only this test's devices."""
    return f"clinic-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def bridge_env(servers: ServerEndpoints, service_env: dict[str, str], clinic: str) -> dict[str, str]:
    """The environment of a bridge process serving only ``clinic``, with its own users, MQTT session and port
    (the bridge, gateway-batch and calibration tests start one)."""
    from bpstream.demo.pipeline import free_port

    tag = uuid.uuid4().hex[:8]
    return {**os.environ, **service_env, **servers.env("bridge"),  # the bridge's own users
            "BPSTREAM_BRIDGE_CLINIC": clinic,
            "BPSTREAM_BRIDGE_CLIENT_ID": f"test-bridge-{tag}",
            "BPSTREAM_BRIDGE_SHARE_GROUP": f"test-{tag}",
            "BPSTREAM_BRIDGE_SESSION_EXPIRY_S": "120",
            "BPSTREAM_BRIDGE_METRICS_PORT": str(free_port()),
            "BPSTREAM_BRIDGE_ALLOWED_SAMPLE_RATES": "[125.0, 250.0]"}
