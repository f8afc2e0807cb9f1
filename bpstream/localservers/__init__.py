"""Local real servers (Mosquitto, Apache Kafka in KRaft mode, InfluxDB 1.x) for tests and the demo, secured
as deployed: connection settings with credentials come from ``ServerEndpoints`` (``kafka_settings``,
``influx_settings``, ``env``).

>>> from bpstream.localservers import ensure_up
>>> endpoints = ensure_up()          # doctest: +SKIP
>>> endpoints.kafka_bootstrap        # doctest: +SKIP
'127.0.0.1:39251'
"""

from bpstream.localservers.core import (
    SERVER_NAMES,
    ServerEndpoints,
    ServerError,
    ServerStatus,
    down,
    endpoints,
    ensure_up,
    ensure_up_report,
    restart,
    state_dir,
    status,
    stop,
)
from bpstream.localservers.install import KAFKA_VERSION, InstallError

__all__ = [
    "KAFKA_VERSION",
    "SERVER_NAMES",
    "InstallError",
    "ServerEndpoints",
    "ServerError",
    "ServerStatus",
    "down",
    "endpoints",
    "ensure_up",
    "ensure_up_report",
    "restart",
    "state_dir",
    "status",
    "stop",
]
