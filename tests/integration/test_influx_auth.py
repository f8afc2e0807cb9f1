"""InfluxDB with authentication on, as deployed: the v2 compatibility API's token ``username:password``.

The default local server runs as deployed (HTTPS, auth on) with the users provisioning creates: an admin, a
writer with WRITE and Grafana's reader with READ on each test's database (the ``influx_db`` fixture grants them).
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from conftest import run_sync
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from pydantic import SecretStr

from bpstream.localservers import ServerEndpoints
from bpstream.services.writer.influx_client import InfluxWriter
from bpstream.shared import influx_api
from bpstream.shared.errors import StoppedError
from bpstream.shared.influx import line

pytestmark = pytest.mark.integration

T0 = 1_760_000_000_000_000_000


def test_writer_token_writes_and_reader_token_reads(servers: ServerEndpoints, influx_db: str) -> None:
    writer, reader = servers.influx_settings(influx_db, "writer"), servers.influx_settings(influx_db, "grafana")
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
        servers: ServerEndpoints, influx_db: str, caplog: pytest.LogCaptureFixture) -> None:
    wrong = servers.influx_settings(influx_db, "writer").model_copy(
        update={"password": SecretStr("not-the-password")})
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
    admin = servers.influx_settings(influx_db)
    assert run_sync(lambda: influx_api.query_rows(admin, 'SELECT * FROM "m"')) == []
    # the password appears in no log record
    assert not any("not-the-password" in f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
