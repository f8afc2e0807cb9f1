"""InfluxDB access through ``influxdb-client``, shared by the writer, the demo, the tests and the Grafana checks.

The server is InfluxDB 1.x (the version in ``bpstream.localservers.install.INFLUXDB_VERSION``, also the image
deployed). Writes use its v2 compatibility API (``/api/v2/write``): bucket ``database/retention-policy`` and
token ``username:password``, sent as an ``Authorization: Token`` header, never in a URL.

InfluxDB 1.x's query language, and the one Grafana's datasource uses, is InfluxQL on ``/query``. The client's
typed query API speaks Flux only (which 1.x serves only with ``flux-enabled``), so :func:`influxql` sends
InfluxQL through the client's own HTTP stack: the same connection pool, auth header, timeout and errors
(``ApiException``) as its writes.
"""

from __future__ import annotations

from typing import Any, cast

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

from bpstream.shared.errors import BpstreamError
from bpstream.shared.settings import InfluxSettings


class InfluxQLError(BpstreamError):
    """The server ran an InfluxQL statement and answered with an error in its result."""

    reason = "influxql_error"


def token(settings: InfluxSettings) -> str | None:
    """``username:password`` (the v2 compatibility API's token for InfluxDB 1.x with auth), or None."""
    if not settings.username:
        return None
    password = settings.password.get_secret_value() if settings.password is not None else ""
    return f"{settings.username}:{password}"


def bucket(settings: InfluxSettings) -> str:
    """The v2 bucket of the configured database: ``database/retention-policy``, or ``database`` (default RP)."""
    if settings.retention_policy:
        return f"{settings.database}/{settings.retention_policy}"
    return settings.database


def tls_kwargs(settings: InfluxSettings) -> dict[str, Any]:
    """HTTPS verification for influxdb-client: the CA setting, verification on unless turned off."""
    return {"verify_ssl": settings.verify_ssl, "ssl_ca_cert": settings.ca_file}


def async_client(settings: InfluxSettings, *, timeout_s: float | None = None) -> InfluxDBClientAsync:
    """An asyncio ``influxdb-client`` for ``settings`` (use as ``async with``). Org is unused by 1.x: ``-``."""
    timeout_ms = int(1000 * (timeout_s if timeout_s is not None else settings.timeout_s))
    # token None sends no Authorization header (a server without auth); the client's own retries are off
    return InfluxDBClientAsync(url=settings.url, token=cast(str, token(settings)), org="-", timeout=timeout_ms,
                               **tls_kwargs(settings))


def sync_client(settings: InfluxSettings, *, timeout_s: float | None = None) -> InfluxDBClient:
    """The blocking ``influxdb-client`` for ``settings`` (use as ``with``): for tests and scripts."""
    timeout_ms = int(1000 * (timeout_s if timeout_s is not None else settings.timeout_s))
    return InfluxDBClient(url=settings.url, token=cast(str, token(settings)), org="-", timeout=timeout_ms,
                          **tls_kwargs(settings))


def _query_params(query: str, database: str | None, epoch: str | None) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = [("q", query)]
    if database:
        params.append(("db", database))
    if epoch:
        params.append(("epoch", epoch))
    return params


def _results(answer: object) -> list[dict[str, Any]]:
    results = cast(list[dict[str, Any]], cast(dict[str, Any], answer).get("results", []))
    for result in results:
        if "error" in result:
            raise InfluxQLError(f"InfluxQL error: {result['error']}")
    return results


def _call() -> dict[str, Any]:
    # fresh every call: the client merges its default headers (Authorization) into ``header_params`` in place,
    # so a shared dict would carry one client's credentials into the next client's requests
    return {"header_params": {"Accept": "application/json"}, "response_type": "object", "auth_settings": [],
            "_return_http_data_only": True}


async def influxql(client: InfluxDBClientAsync, query: str, *, database: str | None = None,
                   epoch: str | None = "ns") -> list[dict[str, Any]]:
    """Run InfluxQL statements on ``/query`` (POST) through ``client``; return each statement's result.

    Raises ``influxdb_client.rest.ApiException`` when the server answers with an HTTP error, and
    :class:`InfluxQLError` when a statement fails inside a 200 answer. ``epoch`` None: RFC 3339 times.
    """
    answer = await client.api_client.call_api(  # type: ignore[no-untyped-call]
        "/query", "POST", query_params=_query_params(query, database, epoch), **_call())
    return _results(answer)


def influxql_sync(client: InfluxDBClient, query: str, *, database: str | None = None,
                  epoch: str | None = "ns") -> list[dict[str, Any]]:
    """:func:`influxql` with the blocking client."""
    answer = client.api_client.call_api(  # type: ignore[no-untyped-call]
        "/query", "POST", query_params=_query_params(query, database, epoch), **_call())
    return _results(answer)


def rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of InfluxQL results as dicts (all series of all statements concatenated, tags merged in)."""
    out: list[dict[str, Any]] = []
    for result in results:
        for series in result.get("series", []):
            tags = series.get("tags") or {}
            columns = series["columns"]
            for values in series["values"]:
                out.append({**tags, **dict(zip(columns, values, strict=True))})
    return out


async def query_rows(settings: InfluxSettings, query: str, *, database: str | None = None,
                     timeout_s: float | None = None) -> list[dict[str, Any]]:
    """One-shot: open a client, run an InfluxQL query against ``database`` (default: the settings'), rows."""
    async with async_client(settings, timeout_s=timeout_s) as client:
        return rows(await influxql(client, query, database=database or settings.database))


async def execute(settings: InfluxSettings, statement: str, *, timeout_s: float | None = None) -> None:
    """One-shot: run an InfluxQL statement that returns nothing (CREATE/DROP DATABASE, ...)."""
    async with async_client(settings, timeout_s=timeout_s) as client:
        await influxql(client, statement, epoch=None)


async def server_version(settings: InfluxSettings) -> str:
    """The version the server reports on ``/ping`` (``X-Influxdb-Version``)."""
    async with async_client(settings) as client:
        return str(await client.version())


def quote_identifier(name: str) -> str:
    """An InfluxQL identifier in double quotes (database, measurement names)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
