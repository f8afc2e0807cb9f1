"""Real receivers for the notifier's tests: an HTTP server in a thread and an aiosmtpd SMTP server in a thread,
both on loopback ports that can be reserved before the server runs (to test a receiver that is down)."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class WebhookReceiver:
    """Answers every POST with 204 and keeps it; ``start``/``stop`` can be called repeatedly on one port."""

    port: int = field(default_factory=free_port)
    posts: list[Post] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.posts.append(Post(self.path, dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def keys(self, path: str | None = None) -> list[str]:
        with self._lock:
            return [p.headers["Idempotency-Key"] for p in self.posts if path is None or p.path == path]


class _Collect:
    def __init__(self, sink: SmtpReceiver) -> None:
        self.sink = sink

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
        with self.sink.lock:
            self.sink.messages.append((list(envelope.rcpt_tos), message_from_bytes(data)))
        return "250 OK"


@dataclass
class SmtpReceiver:
    """A real SMTP server (aiosmtpd) keeping every message it accepted, with its envelope recipients."""

    port: int = field(default_factory=free_port)
    messages: list[tuple[list[str], Message]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _controller: Controller | None = None

    def start(self) -> None:
        self._controller = Controller(_Collect(self), hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def keys(self, recipient: str | None = None) -> list[str]:
        with self.lock:
            # A long header arrives folded ("\r\n "): unfold it as RFC 5322 says.
            return [str(m["X-Bpstream-Idempotency-Key"]).replace("\r\n", "").replace("\n", "").strip()
                    for rcpt, m in self.messages
                    if recipient is None or recipient in rcpt]
