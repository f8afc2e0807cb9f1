"""Settings of the notifier (``BPSTREAM_NOTIFY_*``; Kafka from ``BPSTREAM_KAFKA_*``).

Secrets (the webhook signing secret, the SMTP password) are ``SecretStr``: logged masked, never put in a URL.
A URL with credentials in it (``https://user:pass@host``) is refused at start, so none can reach a log.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from bpstream.shared.settings import ServiceSettings


def _addresses(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


class NotifierSettings(ServiceSettings):
    """Receivers, retries and escalation. A channel without a target (no URL, no host) is off."""

    model_config = SettingsConfigDict(env_prefix="BPSTREAM_NOTIFY_", frozen=True, extra="ignore")

    group_id: str = "bpstream-notifier"
    batch_max_size: int = Field(default=100, ge=1)
    batch_max_wait_ms: int = Field(default=200, ge=0)

    #: Webhook receiving every transition (JSON POST); empty = off.
    webhook_url: str = ""
    #: HMAC-SHA256 key of the ``X-Bpstream-Signature`` header; required when a webhook is configured.
    webhook_secret: SecretStr = SecretStr("")
    webhook_timeout_s: float = Field(default=10.0, gt=0)

    #: SMTP relay; empty host = e-mail off.
    smtp_host: str = ""
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_user: str = ""
    smtp_password: SecretStr = SecretStr("")
    #: Upgrade the connection with STARTTLS before logging in (required by most relays; off for a local relay).
    smtp_starttls: bool = True
    smtp_from: str = "bpstream@localhost"
    #: Recipients, comma-separated.
    smtp_to: str = ""
    smtp_timeout_s: float = Field(default=10.0, gt=0)

    #: Where an unacknowledged episode of an escalating severity is re-sent (webhook and/or e-mail addresses).
    escalation_webhook_url: str = ""
    escalation_email_to: str = ""
    #: Seconds after the raise was first handled before an unacknowledged episode is escalated.
    escalate_after_s: float = Field(default=600.0, gt=0)
    #: Severities that escalate, comma-separated.
    escalate_severities: str = "critical"

    #: One delivery round: this many attempts with full-jitter backoff (``bpstream.shared.retry``), capped.
    retry_attempts: int = Field(default=6, ge=1)
    retry_base_s: float = Field(default=0.5, gt=0)
    retry_cap_s: float = Field(default=30.0, gt=0)
    #: After a round is used up by retriable errors, the delivery waits this long and starts a new round
    #: (the alert's offset stays uncommitted: nothing is given up while the receiver is merely down).
    round_pause_s: float = Field(default=5.0, gt=0)
    #: How often escalations and acknowledgements are checked while no alert arrives.
    tick_s: float = Field(default=1.0, gt=0)

    @field_validator("webhook_url", "escalation_webhook_url")
    @classmethod
    def _no_credentials_in_url(cls, value: str) -> str:
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http(s) URL")
            if parts.username or parts.password:
                raise ValueError("must not carry credentials (sign with BPSTREAM_NOTIFY_WEBHOOK_SECRET)")
        return value

    def recipients(self) -> tuple[str, ...]:
        return _addresses(self.smtp_to)

    def escalation_recipients(self) -> tuple[str, ...]:
        return _addresses(self.escalation_email_to)

    def escalating(self) -> frozenset[str]:
        return frozenset(_addresses(self.escalate_severities))

    def channels(self) -> tuple[str, ...]:
        """Channels every transition goes to."""
        out = []
        if self.webhook_url:
            out.append("webhook")
        if self.smtp_host and self.recipients():
            out.append("email")
        return tuple(out)

    def escalation_channels(self) -> tuple[str, ...]:
        out = []
        if self.escalation_webhook_url:
            out.append("escalation-webhook")
        if self.smtp_host and self.escalation_recipients():
            out.append("escalation-email")
        return tuple(out)
