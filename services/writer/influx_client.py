"""Async client for InfluxDB's v1 write API: line protocol to ``/write`` with precision ns.

Retriable failures (5xx, timeouts, connection errors, auth not yet provisioned) are retried with capped,
jittered backoff until they succeed or the service is stopped. A 400 means bad points: the batch is split in
halves until each bad line stands alone, which is then counted and skipped, so one bad point never blocks the
rest. Because every point is identified by measurement + tags + time, writing a line twice is harmless.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import httpx

from bpstream.shared.errors import BpstreamError, TransientError
from bpstream.shared.settings import InfluxSettings

log = logging.getLogger(__name__)


class BadPointsError(BpstreamError):
    """InfluxDB rejected the points themselves (HTTP 400): retrying the same lines cannot help."""

    reason = "bad_point"


class StoppedError(BpstreamError):
    """The service was asked to stop while a write was still being retried; nothing was acknowledged."""

    reason = "stopped"


@dataclass(slots=True)
class WriteResult:
    """How a ``write`` went: lines stored and lines InfluxDB refused (skipped), with its error texts."""

    written: int = 0
    rejected: int = 0
    errors: list[str] | None = None


class InfluxWriter:
    """Writes line-protocol batches to one InfluxDB database, creating it if missing."""

    def __init__(self, settings: InfluxSettings, *, retry_base_s: float = 0.2, retry_cap_s: float = 5.0,
                 stop: asyncio.Event | None = None) -> None:
        self.settings = settings
        self.retry_base_s, self.retry_cap_s = retry_base_s, retry_cap_s
        self.stop = stop
        self._client = httpx.AsyncClient(base_url=settings.url.rstrip("/"), timeout=settings.timeout_s)

    def _auth_params(self) -> dict[str, str]:
        params: dict[str, str] = {}
        if self.settings.username:
            params["u"] = self.settings.username
        if self.settings.password is not None:
            params["p"] = self.settings.password.get_secret_value()
        return params

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._client.aclose()

    async def ensure_database(self) -> None:
        """``CREATE DATABASE`` (idempotent in InfluxDB 1.x), retried while the server is unreachable."""
        name = self.settings.database.replace('"', '\\"')
        await self._retrying(lambda: self._query(f'CREATE DATABASE "{name}"'), what="create database")

    async def _query(self, q: str) -> None:
        try:
            response = await self._client.post("/query", params={**self._auth_params(), "q": q})
        except httpx.HTTPError as exc:
            raise TransientError(f"influx query: {exc!r}", reason="influx_unreachable") from exc
        if response.status_code >= 500 or response.status_code in (401, 403):
            raise TransientError(f"influx query answered {response.status_code}", reason="influx_unavailable")
        if response.status_code != 200:
            raise BpstreamError(f"influx query answered {response.status_code}: {response.text[:200]}",
                                reason="influx_query")

    async def _post_write(self, lines: list[str]) -> None:
        params = {**self._auth_params(), "db": self.settings.database, "precision": "ns"}
        if self.settings.retention_policy:
            params["rp"] = self.settings.retention_policy
        try:
            response = await self._client.post("/write", params=params, content="\n".join(lines).encode())
        except httpx.HTTPError as exc:
            raise TransientError(f"influx write: {exc!r}", reason="influx_unreachable") from exc
        status = response.status_code
        if status == 204:
            return
        body = response.text[:500]
        if status == 404 and "database not found" in body:
            await self.ensure_database()
            raise TransientError("database was missing and has been created", reason="influx_database_missing")
        if status in (400, 413) or (400 < status < 500 and status not in (401, 403, 408, 429)):
            raise BadPointsError(f"influx write answered {status}: {body}", reason="bad_point"
                                 if status != 413 else "too_large")
        raise TransientError(f"influx write answered {status}", reason=f"influx_{status}")

    async def _retrying(self, operation: Callable[[], Awaitable[None]], *, what: str) -> None:
        """Run ``operation`` until it stops raising ``TransientError`` (capped, jittered backoff)."""
        attempt = 0
        while True:
            try:
                await operation()
                return
            except TransientError as exc:
                if self.stop is not None and self.stop.is_set():
                    raise StoppedError(f"stopped while retrying {what}") from exc
                # full jitter: uniform(0, min(cap, base * 2**attempt)), as in bpstream.shared.retry
                delay = random.uniform(0.0, min(self.retry_cap_s, self.retry_base_s * 2 ** min(attempt, 20)))
                log.warning("influx retry", extra={"what": what, "attempt": attempt + 1, "reason": exc.reason,
                                                   "delay_s": round(delay, 3)})
                attempt += 1
                await asyncio.sleep(delay)

    async def write(self, lines: list[str]) -> WriteResult:
        """Store ``lines``; return once InfluxDB acknowledged every line that it does not reject as bad."""
        result = WriteResult(errors=[])
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
                assert result.errors is not None
                result.errors.append(str(exc)[:300])
                log.warning("influx rejected a point", extra={"reason": exc.reason, "detail": str(exc)[:300]})
                return
            middle = len(lines) // 2
            await self._write_split(lines[:middle], result)
            await self._write_split(lines[middle:], result)
