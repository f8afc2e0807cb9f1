"""The per-patient alert detector shared by evaluation and the live alerting service."""

from __future__ import annotations

import numpy as np
import pytest

from bpstream.shared.anomaly import AlertConfig, AlertDetector, Reading, bp_category
from bpstream.shared.errors import DecodeError
from bpstream.shared.messages import Alert, Estimate, decode_alert, encode_json

pytestmark = pytest.mark.unit
HOP_NS = 2_000_000_000


def feed(det: AlertDetector, sbp: np.ndarray, dbp: np.ndarray, quality: np.ndarray | None = None,
         start: int = 0) -> list[tuple[int, Alert]]:
    events: list[tuple[int, Alert]] = []
    for i, (s, d) in enumerate(zip(sbp, dbp, strict=True)):
        ok = True if quality is None else bool(quality[i])
        for e in det.update(Reading("clinic-1", "dev-1", (start + i + 1) * HOP_NS, float(s), float(d),
                                    quality_ok=ok)):
            events.append((start + i, e))
    return events


def noisy(level_s: list[tuple[int, float]], level_d: list[tuple[int, float]], seed: int = 0,
          sd: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = np.concatenate([np.full(n, v) for n, v in level_s]) + rng.normal(0, sd, sum(n for n, _ in level_s))
    d = np.concatenate([np.full(n, v) for n, v in level_d]) + rng.normal(0, sd / 2, sum(n for n, _ in level_d))
    return s, d


@pytest.mark.parametrize(("sbp", "dbp", "category"), [
    (115, 75, "normal"), (125, 78, "elevated"), (132, 70, "stage1"), (118, 85, "stage1"),
    (140, 70, "stage2"), (120, 90, "stage2"), (181, 100, "crisis"), (150, 121, "crisis"), (180, 120, "stage2"),
])
def test_acc_aha_categories(sbp: float, dbp: float, category: str) -> None:
    assert bp_category(sbp, dbp) == category


def test_crisis_episode_raises_once_and_resolves_once() -> None:
    s, d = noisy([(200, 122.0), (60, 192.0), (150, 122.0)], [(200, 78.0), (60, 105.0), (150, 78.0)])
    events = feed(AlertDetector(AlertConfig()), s, d)
    kinds = [(e.kind, e.state) for _, e in events]
    assert kinds == [("crisis", "raised"), ("crisis", "resolved")]
    (i_raise, raised), (i_resolve, resolved) = events
    assert 200 + 4 <= i_raise <= 200 + 10  # persistence: not before 5 windows, not much later
    assert resolved.alert_id == raised.alert_id
    assert raised.severity == "critical" and raised.baseline_sbp == pytest.approx(122, abs=3)
    assert i_resolve >= 260 + 10  # hysteresis: resolves only after the calm windows


def test_one_outlier_window_never_alerts() -> None:
    s, d = noisy([(300, 120.0)], [(300, 76.0)])
    s[150], d[150] = 230.0, 140.0
    s[151] = 225.0
    assert feed(AlertDetector(AlertConfig()), s, d) == []


def test_fluctuating_around_threshold_does_not_storm() -> None:
    # smoothed pressure oscillating around 180: at most one crisis episode
    t = np.arange(600)
    s = 178 + 8 * np.sin(2 * np.pi * t / 40)
    d = np.full(600, 95.0)
    events = feed(AlertDetector(AlertConfig()), s, d)
    crisis_raised = [e for _, e in events if e.kind == "crisis" and e.state == "raised"]
    assert len(crisis_raised) <= 1


def test_poor_quality_windows_are_ignored() -> None:
    s, d = noisy([(100, 120.0), (40, 200.0)], [(100, 75.0), (40, 110.0)])
    quality = np.ones(140, bool)
    quality[100:] = False  # the "crisis" comes only from windows flagged poor
    det = AlertDetector(AlertConfig())
    assert feed(det, s, d, quality) == []
    assert det.state.ignored_windows == 40


def test_baseline_is_robust_to_outliers_and_frozen_during_an_episode() -> None:
    s, d = noisy([(300, 118.0), (200, 150.0)], [(300, 74.0), (200, 96.0)])
    s[::17] += 60  # outliers
    det = AlertDetector(AlertConfig())
    feed(det, s[:300], d[:300])
    base = det.baseline
    assert base is not None and base[0] == pytest.approx(118, abs=3)
    events = feed(det, s[300:], d[300:], start=300)
    assert {e.kind for _, e in events} >= {"deviation", "stage2"}
    # the episode did not drag the baseline up
    assert det.baseline is not None and det.baseline[0] == pytest.approx(118, abs=3)


def test_replayed_estimates_raise_nothing_twice() -> None:
    s, d = noisy([(100, 120.0), (40, 195.0)], [(100, 75.0), (40, 110.0)])
    det = AlertDetector(AlertConfig())
    first = feed(det, s, d)
    assert [e.state for _, e in first] == ["raised"]
    assert feed(det, s, d) == []  # same window times again: ignored


def test_state_round_trips_through_bytes_and_continues_identically() -> None:
    s, d = noisy([(200, 120.0), (60, 195.0), (60, 120.0)], [(200, 75.0), (60, 110.0), (60, 75.0)])
    a = AlertDetector(AlertConfig())
    feed(a, s[:230], d[:230])
    b = AlertDetector.from_bytes(a.to_bytes(), AlertConfig())
    assert b.active == a.active == ("crisis",)
    rest_a = [(i, e.state, e.alert_id) for i, e in feed(a, s[230:], d[230:], start=230)]
    rest_b = [(i, e.state, e.alert_id) for i, e in feed(b, s[230:], d[230:], start=230)]
    assert rest_a == rest_b and rest_a[0][1] == "resolved"
    with pytest.raises(DecodeError):
        AlertDetector.from_bytes(b"not a state")


def test_events_are_alert_messages_and_estimates_are_accepted() -> None:
    det = AlertDetector(AlertConfig(persistence=2))
    msg = None
    kinds = []
    for i in range(3):
        est = Estimate(clinic_id="c1", device_id="d1", window_start_ns=i * HOP_NS, window_end_ns=(i + 4) * HOP_NS,
                       sbp=200.0, dbp=125.0, sbp_sd=4.0, dbp_sd=3.0, anomaly_prob=0.9, sqi=0.9, quality_ok=True,
                       inputs="ecg+ppg", model_version="v")
        for e in det.update(est):
            kinds.append(e.kind)
            msg = e if e.kind == "crisis" else msg
    # An Estimate without calibration is uncalibrated: the crisis also asks for a cuff reading.
    assert kinds == ["crisis", "cuff_confirmation"]
    assert isinstance(msg, Alert)
    assert bp_category(msg.sbp, msg.dbp) == "crisis"  # the category is derived, not carried
    back = decode_alert(encode_json(msg))
    assert back == msg
    assert back.kind == "crisis" and back.state == "raised" and back.device_id == "d1"
    assert back.sbp == pytest.approx(200.0) and 0.5 < back.confidence <= 1.0
    assert "crisis" in back.message


def test_hypotension_is_detected() -> None:
    s, d = noisy([(100, 115.0), (50, 78.0), (50, 115.0)], [(100, 72.0), (50, 45.0), (50, 72.0)])
    events = feed(AlertDetector(AlertConfig()), s, d)
    assert ("hypotension", "raised") in [(e.kind, e.state) for _, e in events]
    assert ("deviation", "raised") not in [(e.kind, e.state) for _, e in events]
