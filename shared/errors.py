"""The one exception root of bpstream, with a flag that says whether retrying can help.

Retry loops (``bpstream.shared.retry``) only retry errors whose ``retriable`` is true; everything else is
either a bug or bad input, which goes to a dead-letter topic with its ``reason``.
"""

from __future__ import annotations


class BpstreamError(Exception):
    """Root of every error bpstream raises on purpose."""

    retriable: bool = False
    #: A short, stable, machine-readable code (used as a metric label and in dead-letter records).
    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None, retriable: bool | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        if retriable is not None:
            self.retriable = retriable


class ConfigError(BpstreamError):
    """Settings or files that make a component unable to start."""

    reason = "config"


class DecodeError(BpstreamError):
    """Bytes that are not a valid message. ``reason`` says which rule they broke."""

    reason = "decode"


class EncodeError(BpstreamError):
    """A message that cannot be encoded because it breaks the contract (caller bug or bad upstream data)."""

    reason = "encode"


class TransientError(BpstreamError):
    """A failure of a dependency that may go away on its own (broker down, timeout, HTTP 5xx)."""

    retriable = True
    reason = "transient"


class ModelError(BpstreamError):
    """A model artefact that cannot be loaded or does not match the expected contract."""

    reason = "model"


class StoppedError(BpstreamError):
    """The service was asked to stop while an operation was still being retried; nothing was acknowledged, so
    the batch in hand stays uncommitted and is replayed."""

    reason = "stopped"
