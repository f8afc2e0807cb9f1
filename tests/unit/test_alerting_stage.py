"""Alerting's per-patient state around the shared AlertDetector: alerts, flushing and restoring state."""

from __future__ import annotations

import msgspec
import pytest

from bpstream.services.alerting.settings import AlertingSettings
from bpstream.services.alerting.stage import AlertingState
from bpstream.shared.messages import Estimate

pytestmark = pytest.mark.unit

HOP_NS = 2 * 10**9
T0 = 1_760_000_000_000_000_000


def _estimates(device: str, pressures: list[tuple[float, float]], start: int = 0) -> list[Estimate]:
    return [Estimate(clinic_id="c1", device_id=device, window_start_ns=T0 + (start + i) * HOP_NS - 8 * 10**9,
                     window_end_ns=T0 + (start + i) * HOP_NS, sbp=s, dbp=d, sbp_sd=5.0, dbp_sd=3.0,
                     anomaly_prob=0.0, sqi=0.9, quality_ok=True, inputs="ecg+ppg", model_version="v1")
            for i, (s, d) in enumerate(pressures)]


def test_crisis_raises_once_and_resolves_once_normal_patient_stays_quiet() -> None:
    state = AlertingState()
    crisis = _estimates("crisis-1", [(120.0, 78.0)] * 40 + [(195.0, 125.0)] * 30 + [(120.0, 78.0)] * 40)
    normal = _estimates("normal-1", [(118.0, 76.0)] * 110)
    alerts = state.apply(sorted(crisis + normal, key=lambda e: e.window_end_ns))
    crisis_alerts = [a for a in alerts if a.kind == "crisis"]
    assert [a.state for a in crisis_alerts] == ["raised", "resolved"]
    assert crisis_alerts[0].alert_id == crisis_alerts[1].alert_id
    assert crisis_alerts[0].severity == "critical"
    assert not [a for a in alerts if a.device_id == "normal-1"]


def test_restored_state_continues_an_episode_and_replays_raise_nothing_twice() -> None:
    """A restart mid-episode: state from the compacted topic + replay of uncommitted estimates."""
    stream = _estimates("p", [(120.0, 78.0)] * 40 + [(195.0, 125.0)] * 30 + [(120.0, 78.0)] * 40)
    reference = AlertingState().apply(stream)

    first = AlertingState()
    alerts = first.apply(stream[:50])  # raised around here
    saved = first.take_dirty()
    assert set(saved) == {"c1/p"} and not first.take_dirty()
    more = first.apply(stream[50:60])  # processed but not flushed before the crash

    restarted = AlertingState()
    assert restarted.merge(saved) == []
    replayed = restarted.apply(stream[50:])  # Kafka replays from the committed offset (after window 50)
    assert alerts + replayed == reference
    # Alerts the crashed instance sent before its commit come again identical (same id): idempotent downstream.
    assert all(a in replayed for a in more)
    assert [a.state for a in alerts + replayed if a.kind == "crisis"] == ["raised", "resolved"]


def test_merge_keeps_a_detector_that_is_ahead_and_reports_unreadable_state() -> None:
    state = AlertingState()
    state.apply(_estimates("p", [(120.0, 78.0)] * 10))
    old = AlertingState()
    old.apply(_estimates("p", [(120.0, 78.0)] * 5))
    assert state.merge({"c1/p": old.take_dirty()["c1/p"], "q": b"garbage"}) == ["q"]
    assert state.detectors["c1/p"].state.good_windows == 10


def test_detector_overrides_come_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BPSTREAM_ALERTING_DETECTOR", '{"persistence": 3, "crisis_sbp": 170}')
    config = AlertingSettings().alert_config()
    assert config.persistence == 3 and config.crisis_sbp == 170.0


def test_silent_devices_are_evicted_by_record_time_and_come_back_fresh() -> None:
    """A device whose newest window lies more than the silence limit behind the newest window seen (record
    time: no wall clock) loses its detector; the others keep theirs."""
    limit_ns = 60 * 10**9  # 30 hops
    state = AlertingState()
    state.apply(_estimates("quiet", [(120.0, 78.0)] * 10))  # windows 0..9, then silent
    state.apply(_estimates("busy", [(120.0, 78.0)] * 39))  # windows 0..38: 'quiet' 29 hops behind
    assert state.evict_silent(limit_ns) == []
    state.take_dirty()
    state.apply(_estimates("busy", [(120.0, 78.0)] * 2, start=39))  # window 40: 'quiet' 31 hops behind
    assert state.evict_silent(limit_ns) == ["c1/quiet"]
    assert set(state.detectors) == {"c1/busy"}
    assert set(state.take_dirty()) == {"c1/busy"}  # no state of the evicted device is saved again
    assert state.evict_silent(limit_ns) == []
    assert state.evict_silent(0) == []  # 0 disables eviction
    # The device returns: a fresh detector, no alert from the old one.
    assert state.apply(_estimates("quiet", [(120.0, 78.0)], start=41)) == []
    assert state.detectors["c1/quiet"].state.last_ns == T0 + 41 * HOP_NS


def test_a_restored_state_counts_for_the_record_clock_and_is_evicted_when_silent() -> None:
    old = AlertingState()
    old.apply(_estimates("gone", [(120.0, 78.0)] * 3))
    state = AlertingState()
    state.merge(old.take_dirty())
    assert state.newest_ns == T0 + 2 * HOP_NS
    state.apply(_estimates("new", [(120.0, 78.0)], start=100))
    assert state.evict_silent(60 * 10**9) == ["c1/gone"]


def test_a_device_whose_windows_are_all_ignored_is_not_silent() -> None:
    """Unscored or withheld windows leave the detector's clock where it was, but the device still streams:
    it must keep its detector (an evicted one would lose its episodes and be tombstoned again and again)."""
    limit_ns = 60 * 10**9
    state = AlertingState()
    state.apply(_estimates("noisy", [(120.0, 78.0)] * 3))  # three scored windows, then only unscored ones
    state.apply([msgspec.structs.replace(e, quality_ok=False)
                 for e in _estimates("noisy", [(120.0, 78.0)] * 60, start=3)])
    state.apply(_estimates("busy", [(120.0, 78.0)] * 63))
    assert state.detectors["c1/noisy"].state.last_ns == T0 + 2 * HOP_NS  # the detector ignored them
    assert state.evict_silent(limit_ns) == []
    state.apply(_estimates("busy", [(120.0, 78.0)] * 31, start=63))  # 'noisy' now silent for 31 hops
    assert state.evict_silent(limit_ns) == ["c1/noisy"]
