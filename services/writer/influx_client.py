"""Async InfluxDB writer on ``influxdb-client`` (``InfluxDBClientAsync``), v2 compatibility API of InfluxDB 1.x.

Lines are encoded by our one encoder (``bpstream.shared.influx.line``; ``bpstream bench writer`` measured it
faster than the client's ``Point``) and sent by the client's ``WriteApiAsync`` to ``/api/v2/write`` with bucket
``database/retention-policy``, token ``username:password`` and precision ns.

Retriable failures (5xx, 429, 408, 404, timeouts, connection errors, auth not yet provisioned) are retried with
capped, jittered backoff (``bpstream.shared.retry``) until they succeed or the service is stopped. A 400, 413 or
422 means bad points: the batch is split in halves until each bad line stands alone, which is then counted and
skipped (the caller dead-letters it), so one bad point never blocks the rest. Because every point is identified by
measurement + tags + time, writing a line twice is harmless. InfluxDB's error bodies repeat the rejected line, i.e.
patient readings: they are never logged or returned, only the status and a short reason derived from them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, cast

import aiohttp
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException

from bpstream.shared import influx_api
from bpstream.shared.errors import BpstreamError, TransientError
from bpstream.shared.retry import retry_async
from bpstream.shared.settings import InfluxSettings

log = logging.getLogger(__name__)

_NS = cast(WritePrecision, WritePrecision.NS)  # the client declares the enum's values as plain str

#: Answers about the points themselves: the batch is split until the bad line stands alone and is refused.
#: Every other answer (5xx, 401/403 auth not yet provisioned, 404 no such API or database, 408, 429, ...) is
#: about the server or its set-up, not the points: retried, never acknowledged, so nothing is lost.
_BAD_POINT_STATUSES = frozenset({400, 413, 422})

#: Phrases of InfluxDB 1.x error bodies -> the reason reported instead of the body.
_BAD_POINT_REASONS = (
    ("field type conflict", "field_type_conflict"),
    ("unable to parse", "unparsable"),
    ("beyond retention policy", "beyond_retention"),
    ("max-values-per-tag", "max_values_per_tag"),
    ("max-series-per-database", "max_series"),
    ("invalid", "invalid"),
)


class BadPointsError(BpstreamError):
    """InfluxDB rejected the points themselves (HTTP 4xx): retrying the same lines cannot help."""

    reason = "bad_point"


@dataclass(slots=True)
class WriteResult:
    """How a ``write`` went: lines stored, and the lines InfluxDB refused (skipped) with a short reason each."""

    written: int = 0
    rejected: int = 0
    #: (line, reason) of every refused line, for the caller to dead-letter; reasons never quote InfluxDB.
    refused: list[tuple[str, str]] = field(default_factory=list)


def _body_text(exc: ApiException) -> str:
    body = exc.body
    if isinstance(body, bytes):
        return body.decode(errors="replace")
    return body if isinstance(body, str) else ""


def bad_point_reason(status: int, body: str) -> str:
    """A short reason for a refused write, from its status and body, without quoting the body."""
    if status == 413:
        return "too_large"
    lowered = body.lower()
    for phrase, reason in _BAD_POINT_REASONS:
        if phrase in lowered:
            return reason
    return f"http_{status}"


class InfluxWriter:
    """Writes line-protocol batches to one InfluxDB database through ``influxdb-client``."""

    def __init__(self, settings: InfluxSettings, *, retry_base_s: float = 0.2, retry_cap_s: float = 5.0,
                 stop: asyncio.Event | None = None) -> None:
        self.settings = settings
        self.retry_base_s, self.retry_cap_s = retry_base_s, retry_cap_s
        self.stop = stop
        self.bucket = influx_api.bucket(settings)
        self._client = influx_api.async_client(settings)
        self._write_api = self._client.write_api()
        #: False from the first failed attempt until a request succeeds again (the writer's /readyz).
        self.available = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]

    async def ensure_database(self) -> None:
        """``CREATE DATABASE`` (idempotent in InfluxDB 1.x), retried while the server is unreachable.

        A user without admin rights (the deployed writer) gets 403: the database is the operator's to create
        (the image's ``INFLUXDB_DB``), so that is logged and not retried.
        """
        statement = f"CREATE DATABASE {influx_api.quote_identifier(self.settings.database)}"
        try:
            await self._retrying(lambda: self._query(statement), what="create database", retry_forbidden=False)
        except BadPointsError as exc:
            log.warning("could not create the database; writing to it anyway",
                        extra={"database": self.settings.database, "reason": exc.reason})

    async def _query(self, statement: str) -> None:
        try:
            await influx_api.influxql(self._client, statement, epoch=None)
        except ApiException as exc:
            raise self._classify(exc, what="influx query") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientError(f"influx query: {type(exc).__name__}", reason="influx_unreachable") from None

    def _classify(self, exc: ApiException, *, what: str) -> BpstreamError:
        status = int(exc.status or 0)
        if status in _BAD_POINT_STATUSES:
            return BadPointsError(f"{what} answered {status}", reason=bad_point_reason(status, _body_text(exc)))
        return TransientError(f"{what} answered {status}", reason=f"influx_{status or 'unreachable'}")

    async def _post_write(self, lines: list[str]) -> None:
        try:
            await self._write_api.write(bucket=self.bucket, record="\n".join(lines), write_precision=_NS)
        except ApiException as exc:
            if exc.status == 404 and "database not found" in _body_text(exc):
                await self.ensure_database()
                raise TransientError("database was missing and has been created",
                                     reason="influx_database_missing") from None
            raise self._classify(exc, what="influx write") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientError(f"influx write: {type(exc).__name__}", reason="influx_unreachable") from None

    async def _retrying(self, operation: Callable[[], Awaitable[None]], *, what: str,
                        retry_forbidden: bool = True) -> None:
        """Run ``operation`` until it stops raising ``TransientError`` (``retry_async`` without an attempt
        limit; ``StoppedError`` once the service is stopping)."""

        def failed(exc: BpstreamError) -> None:
            self.available = False
            if not retry_forbidden and exc.reason == "influx_403":
                raise BadPointsError(str(exc), reason="forbidden") from None

        await retry_async(operation, attempts=None, base_s=self.retry_base_s, cap_s=self.retry_cap_s,
                          what=f"influx {what}", stop=self.stop, on_failure=failed)
        self.available = True

    async def write(self, lines: list[str]) -> WriteResult:
        """Store ``lines``; return once InfluxDB acknowledged every line that it does not reject as bad."""
        result = WriteResult()
        if lines:
            await self._write_split(lines, result)
        return result

    async def _write_split(self, lines: list[str], result: WriteResult) -> None:
        try:
            await self._retrying(lambda: self._post_write(lines), what="write")
            result.written += len(lines)
        except BadPointsError as exc:
            if len(lines) == 1:
                result.rejected += 1
                result.refused.append((lines[0], exc.reason))
                log.warning("influx rejected a point", extra={"reason": exc.reason, "detail": str(exc)})
                return
            middle = len(lines) // 2
            await self._write_split(lines[:middle], result)
            await self._write_split(lines[middle:], result)
