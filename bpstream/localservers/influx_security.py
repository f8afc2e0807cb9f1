"""InfluxDB secured like a deployment: HTTPS (certificate from the local CA) and authentication on.

Users (passwords random, kept in ``state_dir()/influx-users.json``, mode 0600):

* ``admin``: all privileges; created first (with auth on and no user yet, InfluxDB accepts exactly that one
  statement unauthenticated), then used to create the others, the databases and the grants;
* ``writer``: WRITE only, on each database it stores into (it can neither read nor create databases);
* ``grafana``: READ only, on the same databases.

:func:`grant_database` creates a database and grants the writer WRITE and Grafana READ on it (the test
fixtures and the demo harness call it through the admin for each database they use).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from bpstream.localservers.credentials import stored_passwords
from bpstream.shared.settings import InfluxSettings

if TYPE_CHECKING:
    from bpstream.localservers import pki

ADMIN = "admin"
WRITER = "writer"
GRAFANA = "grafana"
#: Which InfluxDB user each service process runs as (services not listed do not use InfluxDB).
SERVICE_USERS = {"writer": WRITER, "grafana": GRAFANA}


def users(state: Path) -> dict[str, str]:
    """Every InfluxDB user and its password (created once, mode 0600, reused afterwards)."""
    return stored_passwords(state / "influx-users.json", (ADMIN, WRITER, GRAFANA))


def server_tls(state: Path) -> pki.TlsFiles:
    """The server's certificate and key from the local CA."""
    from bpstream.localservers import pki  # cryptography: local servers and tools only, not the images

    return pki.issue(pki.ensure_ca(state / "pki"), "influxdb")


def client_settings(state: Path, url: str, user: str | None = ADMIN, *, database: str = "bpstream") -> InfluxSettings:
    """Settings for ``user`` (None: anonymous) on the local server, trusting the local CA."""

    password = SecretStr(users(state)[user]) if user else None
    return InfluxSettings(url=url, database=database, username=user, password=password,
                          ca_file=str(state / "pki" / "ca.crt"))


def client_env(state: Path, user: str | None = ADMIN) -> dict[str, str]:
    """``BPSTREAM_INFLUX_*`` variables with ``user``'s credentials (none for None) and the CA."""
    env = {"BPSTREAM_INFLUX_CA_FILE": str(state / "pki" / "ca.crt")}
    if user:
        env |= {"BPSTREAM_INFLUX_USERNAME": user, "BPSTREAM_INFLUX_PASSWORD": users(state)[user]}
    return env


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


async def provision(state: Path, url: str) -> None:
    """Create the admin (first, unauthenticated, only when the server has no user), then the other users."""
    from influxdb_client.rest import ApiException

    from bpstream.shared import influx_api

    passwords = users(state)
    admin = client_settings(state, url)
    try:
        existing = {row["user"] for row in await influx_api.query_rows(admin, "SHOW USERS", database="")}
    except ApiException as exc:  # 403 "create admin user first" on a fresh server
        if exc.status not in (401, 403):
            raise
        await influx_api.execute(client_settings(state, url, None),
                                 f"CREATE USER {ADMIN} WITH PASSWORD {_quote(passwords[ADMIN])} WITH ALL PRIVILEGES")
        existing = {ADMIN}
    for name in (WRITER, GRAFANA):
        if name not in existing:
            await influx_api.execute(admin, f"CREATE USER {name} WITH PASSWORD {_quote(passwords[name])}")


async def grant_database(admin: InfluxSettings, database: str) -> None:
    """``CREATE DATABASE`` (idempotent), the writer WRITE and Grafana READ on it."""
    from bpstream.shared import influx_api

    name = influx_api.quote_identifier(database)
    await influx_api.execute(admin, f"CREATE DATABASE {name}", timeout_s=30)
    await influx_api.execute(admin, f"GRANT WRITE ON {name} TO {WRITER}; GRANT READ ON {name} TO {GRAFANA}",
                             timeout_s=30)


def grant_database_sync(admin: InfluxSettings, database: str) -> None:
    """:func:`grant_database` with the blocking client (test fixtures)."""
    from bpstream.shared import influx_api

    name = influx_api.quote_identifier(database)
    with influx_api.sync_client(admin, timeout_s=30) as client:
        influx_api.influxql_sync(client, f"CREATE DATABASE {name}", epoch=None)
        influx_api.influxql_sync(client, f"GRANT WRITE ON {name} TO {WRITER}; GRANT READ ON {name} TO {GRAFANA}",
                                 epoch=None)
