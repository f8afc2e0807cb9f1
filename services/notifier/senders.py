"""The notifier's two ways out: a signed JSON webhook (httpx) and e-mail over SMTP (stdlib, in a thread).

Each ``send`` either returns (the receiver accepted) or raises a ``BpstreamError`` whose ``retriable`` says
whether trying again can help: connection errors, timeouts, HTTP 5xx/408/429 and SMTP 4xx are retriable;
other HTTP 4xx and SMTP 5xx (a bad address, a refused signature) are not. Credentials never appear in an error.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import time
from collections.abc import Sequence
from email.message import EmailMessage

import httpx

from bpstream.services.notifier.stage import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from bpstream.shared.errors import BpstreamError
from bpstream.shared.service import Component


class DeliveryFailed(BpstreamError):
    """Raised by a sender with the HTTP status or SMTP code it saw (0 = none)."""

    def __init__(self, message: str, *, reason: str, retriable: bool, status: int = 0) -> None:
        super().__init__(message, reason=reason, retriable=retriable)
        self.status = status


_RETRIABLE_HTTP = {408, 425, 429}


class WebhookSender(Component):
    """POSTs JSON with ``Idempotency-Key``, ``X-Bpstream-Timestamp`` and ``X-Bpstream-Signature`` headers."""

    def __init__(self, secret: bytes, timeout_s: float) -> None:
        self.secret = secret
        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self._client.aclose()

    async def send(self, url: str, body: bytes, key: str) -> int:
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: key,
                   TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: signature(self.secret, timestamp, body)}
        try:
            response = await self._client.post(url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise DeliveryFailed(f"webhook timeout: {type(exc).__name__}", reason="timeout", retriable=True) from exc
        except httpx.HTTPError as exc:  # connection refused, reset, DNS: the receiver may come back
            raise DeliveryFailed(f"webhook unreachable: {type(exc).__name__}", reason="unreachable",
                                 retriable=True) from exc
        status = response.status_code
        if 200 <= status < 300:
            return status
        retriable = status >= 500 or status in _RETRIABLE_HTTP
        raise DeliveryFailed(f"webhook answered HTTP {status}", reason=f"http_{status}", retriable=retriable,
                             status=status)


class SmtpSender(Component):
    """One SMTP session per e-mail (alerts are rare); STARTTLS and login when configured."""

    def __init__(self, host: str, port: int, user: str, password: str, starttls: bool, timeout_s: float) -> None:
        self.host, self.port, self.user, self._password = host, port, user, password
        self.starttls, self.timeout_s = starttls, timeout_s

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def _send_blocking(self, message: EmailMessage, recipients: Sequence[str]) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout_s) as smtp:
            smtp.ehlo()
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if self.user:
                smtp.login(self.user, self._password)
            refused = smtp.send_message(message, to_addrs=list(recipients))
            if refused:  # some recipients refused: reported like a full refusal
                raise smtplib.SMTPRecipientsRefused(refused)

    async def send(self, message: EmailMessage, recipients: Sequence[str]) -> int:
        try:
            await asyncio.to_thread(self._send_blocking, message, recipients)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = sorted({code for code, _ in exc.recipients.values()})
            retriable = all(400 <= c < 500 for c in codes)
            raise DeliveryFailed(f"smtp refused recipients (codes {codes})", reason="smtp_recipients",
                                 retriable=retriable, status=codes[0] if codes else 0) from None
        except smtplib.SMTPResponseException as exc:
            code = int(exc.smtp_code)
            raise DeliveryFailed(f"smtp answered {code}", reason=f"smtp_{code}", retriable=400 <= code < 500,
                                 status=code) from None
        except smtplib.SMTPServerDisconnected as exc:
            raise DeliveryFailed(f"smtp disconnected: {type(exc).__name__}", reason="unreachable",
                                 retriable=True) from None
        except smtplib.SMTPException as exc:  # e.g. STARTTLS or AUTH not offered: a configuration error
            raise DeliveryFailed(f"smtp error: {type(exc).__name__}", reason="smtp", retriable=False) from None
        except OSError as exc:  # refused, reset, timeout, TLS: the relay may come back or be fixed
            raise DeliveryFailed(f"smtp unreachable: {type(exc).__name__}", reason="unreachable",
                                 retriable=True) from None
        return 250
