"""The bridge's per-device limits: token bucket and payload size (pure, no broker)."""

from __future__ import annotations

import pytest

from bpstream.services.bridge.limits import PAYLOAD_TOO_LARGE, RATE_LIMITED, DeviceLimits, LimitChecker, TokenBucket
from bpstream.services.bridge.settings import BridgeSettings
from bpstream.services.bridge.stage import device_of


def test_bucket_allows_the_burst_then_the_rate_per_device() -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=5)
    a, b = ("c", "a"), ("c", "b")
    assert [bucket.allow(a, 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.allow(b, 0.0)  # another device has its own bucket
    assert bucket.allow(("other", "a"), 0.0)  # and so has the same id in another clinic
    assert [bucket.allow(a, 1.0) for _ in range(3)] == [True, True, False]  # 2 tokens per second
    assert [bucket.allow(a, 100.0) for _ in range(6)] == [True] * 5 + [False]  # refilled to the burst only


def test_a_steady_device_within_the_rate_is_never_limited() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=1)
    assert all(bucket.allow(("c", "d"), float(t)) for t in range(1000))


def test_pruning_forgets_only_full_buckets() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=10)
    bucket.allow(("c", "old"), 0.0)
    bucket.allow(("c", "new"), 95.0)
    bucket.prune(100.0)
    assert len(bucket) == 1


def test_bad_bucket_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        TokenBucket(rate_per_s=0.0, burst=5)


def test_checker_reasons() -> None:
    checker = LimitChecker(DeviceLimits(max_payload_bytes=100, rate_per_s=1.0, burst=1))
    too_big = checker.check(("c", "d"), 101, 0.0)
    assert too_big is not None and too_big.reason == PAYLOAD_TOO_LARGE and "101" in too_big.detail
    assert checker.check(("c", "d"), 100, 0.0) is None
    limited = checker.check(("c", "d"), 10, 0.0)
    assert limited is not None and limited.reason == RATE_LIMITED
    unlimited = LimitChecker(DeviceLimits(max_payload_bytes=100, rate_per_s=None, burst=1))
    assert all(unlimited.check(("c", "d"), 10, 0.0) is None for _ in range(100))


def test_topics_name_their_device() -> None:
    assert device_of("bpstream/c1/d1/signals") == ("c1", "d1")
    assert device_of("bpstream/c1/d1/cuff") == ("c1", "d1")
    assert device_of("elsewhere/c1/d1/signals") is None
    assert device_of("bpstream/c1/signals") is None


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = BridgeSettings().device_limits()
    assert defaults.max_payload_bytes == 64 * 1024 and defaults.rate_per_s == 10.0 and defaults.burst == 1200.0
    monkeypatch.setenv("BPSTREAM_BRIDGE_RATE_LIMIT_PER_S", "2.5")
    monkeypatch.setenv("BPSTREAM_BRIDGE_MAX_PAYLOAD_BYTES", "4096")
    limits = BridgeSettings().device_limits()
    assert (limits.rate_per_s, limits.max_payload_bytes) == (2.5, 4096)
