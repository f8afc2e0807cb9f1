"""Fixtures shared by the integration tests that start their own bridge (bridge, gateway batches, calibration)."""

from __future__ import annotations

import os
import uuid

import pytest

from bpstream.demo.pipeline import free_port
from bpstream.localservers import ServerEndpoints


@pytest.fixture
def clinic() -> str:
    """A clinic id unique to this test, so the bridge under test sees only this test's devices."""
    return f"clinic-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def bridge_env(servers: ServerEndpoints, service_env: dict[str, str], clinic: str) -> dict[str, str]:
    """The environment of a bridge process serving only ``clinic``, with its own users, MQTT session and port."""
    tag = uuid.uuid4().hex[:8]
    return {**os.environ, **service_env, **servers.env("bridge"),  # the bridge's own users
            "BPSTREAM_BRIDGE_CLINIC": clinic,
            "BPSTREAM_BRIDGE_CLIENT_ID": f"test-bridge-{tag}",
            "BPSTREAM_BRIDGE_SHARE_GROUP": f"test-{tag}",
            "BPSTREAM_BRIDGE_SESSION_EXPIRY_S": "120",
            "BPSTREAM_BRIDGE_METRICS_PORT": str(free_port()),
            "BPSTREAM_BRIDGE_ALLOWED_SAMPLE_RATES": "[125.0, 250.0]"}
