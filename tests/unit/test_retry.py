"""Retry policy (shared/retry.py): only retriable errors are retried, attempts are capped, backoff is bounded."""

from __future__ import annotations

import asyncio
import random

import pytest

from bpstream.shared.errors import BpstreamError, DecodeError, StoppedError, TransientError
from bpstream.shared.retry import backoff_delay, backoff_delays, retry_async

pytestmark = pytest.mark.unit


class _Flaky:
    """Fails with ``error`` the first ``failures`` calls, then returns the number of calls."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    async def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.calls


async def test_retriable_error_is_retried_until_success() -> None:
    operation = _Flaky(2, TransientError("broker down"))
    assert await retry_async(operation, attempts=5, base_s=0.001, cap_s=0.002) == 3


async def test_attempts_are_capped_and_the_last_error_is_raised() -> None:
    operation = _Flaky(100, TransientError("still down"))
    with pytest.raises(TransientError, match="still down"):
        await retry_async(operation, attempts=4, base_s=0.001, cap_s=0.002)
    assert operation.calls == 4


async def test_non_retriable_error_is_not_retried() -> None:
    operation = _Flaky(1, DecodeError("bad bytes", reason="bad_checksum"))
    with pytest.raises(DecodeError):
        await retry_async(operation, attempts=5, base_s=0.001)
    assert operation.calls == 1


async def test_retriable_flag_can_be_set_per_instance() -> None:
    operation = _Flaky(1, BpstreamError("timeout", retriable=True))
    assert await retry_async(operation, attempts=3, base_s=0.001) == 2
    final = _Flaky(1, TransientError("gone for good", retriable=False))
    with pytest.raises(TransientError):
        await retry_async(final, attempts=3, base_s=0.001)
    assert final.calls == 1


async def test_foreign_exceptions_propagate_at_once() -> None:
    operation = _Flaky(1, KeyError("bug"))
    with pytest.raises(KeyError):
        await retry_async(operation, attempts=3, base_s=0.001)
    assert operation.calls == 1


def test_backoff_delays_are_jittered_within_an_exponential_cap() -> None:
    delays = backoff_delays(8, base_s=0.1, cap_s=1.0, rng=random.Random(7))
    assert len(delays) == 8
    for k, delay in enumerate(delays):
        assert 0.0 <= delay <= min(1.0, 0.1 * 2**k)
    assert backoff_delays(8, 0.1, 1.0, random.Random(7)) == delays  # reproducible with a seeded generator


def test_errors_carry_reason_and_retriable() -> None:
    assert TransientError("x").retriable and TransientError("x").reason == "transient"
    assert not DecodeError("x").retriable
    error = DecodeError("x", reason="bad_version")
    assert error.reason == "bad_version" and isinstance(error, BpstreamError)


async def test_unbounded_retry_goes_on_until_success() -> None:
    operation = _Flaky(12, TransientError("down a while"))
    assert await retry_async(operation, attempts=None, base_s=0.0001, cap_s=0.0002) == 13


async def test_unbounded_retry_ends_with_stopped_once_stop_is_set() -> None:
    stop = asyncio.Event()
    seen: list[str] = []

    async def failing() -> None:
        if len(seen) == 3:
            stop.set()
        raise TransientError("down", reason="influx_503")

    with pytest.raises(StoppedError):
        await retry_async(failing, attempts=None, base_s=0.0001, cap_s=0.0002, stop=stop,
                          on_failure=lambda exc: seen.append(exc.reason))
    assert seen == ["influx_503"] * 4  # every failure was reported, the one after stop included


async def test_on_failure_can_turn_a_retriable_error_into_a_final_one() -> None:
    def forbid(exc: BpstreamError) -> None:
        raise DecodeError("not retried", reason="forbidden")

    operation = _Flaky(5, TransientError("403"))
    with pytest.raises(DecodeError):
        await retry_async(operation, attempts=None, base_s=0.0001, on_failure=forbid)
    assert operation.calls == 1


def test_backoff_delay_is_capped_for_any_attempt() -> None:
    rng = random.Random(3)
    assert all(0.0 <= backoff_delay(k, 0.2, 5.0, rng) <= min(5.0, 0.2 * 2**k) for k in range(200))
