"""InfluxDB with authentication on, as deployed: the v2 compatibility API's token ``username:password``.

A second InfluxDB (the same built binary, config from ``bpstream.localservers.servers``, auth on) runs for this
module only, with the users docker-compose creates: an admin, a writer with WRITE and a reader with READ on
the one database.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_sync
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from pydantic import SecretStr

from bpstream.localservers import servers as local_servers
from bpstream.localservers.install import ensure_influxd
from bpstream.services.writer.influx_client import InfluxWriter
from bpstream.shared import influx_api
from bpstream.shared.errors import StoppedError
from bpstream.shared.influx import line
from bpstream.shared.settings import InfluxSettings

pytestmark = pytest.mark.integration

DB = "bpstream"
T0 = 1_760_000_000_000_000_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _user(url: str, name: str, password: str) -> InfluxSettings:
    return InfluxSettings(url=url, database=DB, username=name, password=SecretStr(password))


@pytest.fixture(scope="module")
def auth_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root: Path = tmp_path_factory.mktemp("influx-auth")
    port = _free_port()
    launch = local_servers.prepare_influxdb(root, str(ensure_influxd()), port, _free_port(), auth=True)
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen(launch.argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                run_sync(lambda: influx_api.server_version(InfluxSettings(url=url)))
                break
            except Exception:
                assert process.poll() is None, (root / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "InfluxDB with auth did not answer /ping"
                time.sleep(0.25)
        # With auth on and no user yet, InfluxDB accepts exactly one statement unauthenticated: the first admin.
        run_sync(lambda: influx_api.execute(InfluxSettings(url=url),
                                            "CREATE USER admin WITH PASSWORD 'admin-pw' WITH ALL PRIVILEGES"))
        admin = _user(url, "admin", "admin-pw")
        for statement in (f"CREATE DATABASE {DB}", "CREATE USER writer WITH PASSWORD 'writer-pw'",
                          f"GRANT WRITE ON {DB} TO writer", "CREATE USER reader WITH PASSWORD 'reader-pw'",
                          f"GRANT READ ON {DB} TO reader"):
            run_sync(lambda statement=statement: influx_api.execute(admin, statement))  # type: ignore[misc]
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_writer_token_writes_and_reader_token_reads(auth_url: str) -> None:
    writer, reader = _user(auth_url, "writer", "writer-pw"), _user(auth_url, "reader", "reader-pw")
    point = line("bp_estimate", {"clinic": "c1", "device": "d1"}, {"sbp": 131.5, "quality_ok": 1}, T0)

    async def write_as_the_writer() -> None:
        async with InfluxWriter(writer) as influx:
            await influx.ensure_database()  # 403 for a non-admin: logged, not retried for ever
            result = await influx.write([point])
        assert (result.written, result.rejected) == (1, 0)

    run_sync(write_as_the_writer)
    rows = run_sync(lambda: influx_api.query_rows(reader, "SELECT sbp FROM bp_estimate"))
    assert [(r["time"], r["sbp"]) for r in rows] == [(T0, 131.5)]
    with (influx_api.sync_client(reader) as client, client.write_api(write_options=SYNCHRONOUS) as api,
          pytest.raises(ApiException) as refused):  # the reader may not write
        api.write(bucket=influx_api.bucket(reader), record=point, write_precision=WritePrecision.NS)
    assert refused.value.status == 403


def _influx_retry(record: logging.LogRecord) -> bool:
    """A retry of an InfluxDB request (the shared backoff logs it with ``what`` naming the operation)."""
    return record.getMessage() == "retrying" and str(getattr(record, "what", "")).startswith("influx ")


def test_a_wrong_password_is_401_and_the_writer_retries_without_acknowledging(
        auth_url: str, caplog: pytest.LogCaptureFixture) -> None:
    wrong = _user(auth_url, "writer", "not-the-password")
    with (influx_api.sync_client(wrong) as client, client.write_api(write_options=SYNCHRONOUS) as api,
          pytest.raises(ApiException) as denied):
        api.write(bucket=influx_api.bucket(wrong), record="m v=1 1", write_precision=WritePrecision.NS)
    assert denied.value.status == 401

    class Retried(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if _influx_retry(record):
                retried.set()

    async def write_with_the_wrong_password() -> None:
        stop = asyncio.Event()
        async with InfluxWriter(wrong, retry_base_s=0.01, retry_cap_s=0.05, stop=stop) as influx:
            task = asyncio.create_task(influx.write(["m v=1 2"]))
            await retried.wait()  # 401 is "not yet provisioned": retried, never skipped as a bad point
            stop.set()
            with pytest.raises(StoppedError):
                await task

    retried = asyncio.Event()
    handler = Retried()
    logging.getLogger("bpstream.shared.retry").addHandler(handler)

    caplog.set_level(logging.WARNING, logger="bpstream")
    try:
        run_sync(write_with_the_wrong_password)
    finally:
        logging.getLogger("bpstream.shared.retry").removeHandler(handler)
    assert {getattr(r, "reason", None) for r in caplog.records if _influx_retry(r)} == {"influx_401"}
    admin = _user(auth_url, "admin", "admin-pw")
    assert run_sync(lambda: influx_api.query_rows(admin, 'SELECT * FROM "m"')) == []
    # the password appears in no log record
    assert not any("not-the-password" in f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
