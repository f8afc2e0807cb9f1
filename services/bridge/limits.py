"""The bridge's per-device limits (pure): a token bucket per ``(clinic, device)`` and a payload size bound.

A device sends one chunk per second; after a link outage it may send its backlog at once, and after a bridge
or Kafka outage the broker hands over what it queued, so the bucket holds a generous burst. A device that
floods beyond it is dead-lettered (``rate_limited``) without its payload, so a flood cannot fill Kafka.

>>> bucket = TokenBucket(rate_per_s=1.0, burst=2)
>>> [bucket.allow(("c", "d"), now=0.0) for _ in range(3)]
[True, True, False]
>>> bucket.allow(("c", "d"), now=1.0)
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from bpstream.services.bridge.stage import Rejection

RATE_LIMITED: Final = "rate_limited"
PAYLOAD_TOO_LARGE: Final = "payload_too_large"
_PRUNE_EVERY: Final = 10_000


@dataclass(slots=True)
class TokenBucket:
    """Per-key token buckets: ``burst`` tokens at most, refilled at ``rate_per_s``; one token per message."""

    rate_per_s: float
    burst: float
    _buckets: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    _calls: int = 0

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and self.burst >= 1):
            raise ValueError("rate_per_s must be > 0 and burst >= 1")

    def allow(self, key: tuple[str, str], now: float) -> bool:
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate_per_s)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        self._calls += 1
        if self._calls % _PRUNE_EVERY == 0:
            self.prune(now)
        return allowed

    def prune(self, now: float) -> None:
        """Forget buckets that would be full again by now (memory stays bounded by the active devices)."""
        refill_s = self.burst / self.rate_per_s
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill_s}

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True, slots=True)
class DeviceLimits:
    """What one device may send through the bridge (from the bridge's settings)."""

    max_payload_bytes: int
    rate_per_s: float | None
    burst: float


class LimitChecker:
    """Applies :class:`DeviceLimits` to one message: None when it may go on, else the :class:`Rejection`."""

    def __init__(self, limits: DeviceLimits) -> None:
        self.limits = limits
        self.bucket = TokenBucket(limits.rate_per_s, limits.burst) if limits.rate_per_s else None

    def check(self, device: tuple[str, str] | None, size: int, now: float) -> Rejection | None:
        if size > self.limits.max_payload_bytes:
            return Rejection(PAYLOAD_TOO_LARGE,
                             f"payload of {size} bytes exceeds the limit of {self.limits.max_payload_bytes}")
        if self.bucket is not None and device is not None and not self.bucket.allow(device, now):
            return Rejection(RATE_LIMITED, f"device exceeds {self.limits.rate_per_s:g} messages/s "
                                           f"(burst {self.limits.burst:g})")
        return None
