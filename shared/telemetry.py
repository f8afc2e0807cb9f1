"""Prometheus metrics and health endpoints for every service.

``HealthServer`` is an async context manager serving, on one loopback port by default:
``/metrics`` (Prometheus text format), ``/healthz`` (liveness: the event loop answers) and ``/readyz``
(readiness: 200 only while the service's ``ready`` callable returns true).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from bpstream.shared.service import Component

log = logging.getLogger(__name__)


class HealthServer(Component):
    """A minimal HTTP/1.1 server for /metrics, /healthz and /readyz (port 0 disables it)."""

    def __init__(self, host: str, port: int, ready: Callable[[], bool],
                 registry: CollectorRegistry = REGISTRY) -> None:
        self.host, self.port, self.ready, self.registry = host, port, ready, registry
        self._server: asyncio.Server | None = None

    @property
    def bound_port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self.port < 0:
            return
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        log.info("health server listening", extra={"host": self.host, "port": self.bound_port})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else "/"
            if path.startswith("/metrics"):
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
            elif path.startswith("/healthz"):
                status, ctype, body = "200 OK", "text/plain", b"ok\n"
            elif path.startswith("/readyz"):
                ok = bool(self.ready())
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain", b"ready\n" if ok else b"not ready\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
