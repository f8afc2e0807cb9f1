"""Device ids are unique per clinic only: alerting state, alert ids and Kafka keys are per (clinic, device)."""

from __future__ import annotations

import pytest

from bpstream.services.alerting.stage import AlertingState
from bpstream.shared.messages import Estimate
from bpstream.shared.topics import device_key

pytestmark = pytest.mark.unit

NS = 1_000_000_000
T0 = 1_760_000_000 * NS


def _est(clinic: str, i: int, sbp: float, dbp: float) -> Estimate:
    end = T0 + i * 2 * NS
    return Estimate(clinic_id=clinic, device_id="dev-1", window_start_ns=end - 8 * NS, window_end_ns=end, sbp=sbp,
                    dbp=dbp, sbp_sd=4.0, dbp_sd=3.0, anomaly_prob=0.5, sqi=0.9, quality_ok=True, inputs="ecg+ppg",
                    model_version="v", received_ns=end)


def test_two_clinics_devices_with_the_same_id_never_share_a_detector() -> None:
    state = AlertingState()
    alerts = []
    for i in range(30):  # interleaved, as one partition would deliver them
        alerts += state.apply([_est("clinic-a", i, 205.0, 125.0), _est("clinic-b", i, 118.0, 76.0)])
    assert set(state.detectors) == {"clinic-a/dev-1", "clinic-b/dev-1"}
    assert {a.clinic_id for a in alerts} == {"clinic-a"}
    assert all(a.alert_id.startswith("clinic-a/dev-1:") for a in alerts)
    assert state.detectors["clinic-b/dev-1"].state.clinic_id == "clinic-b"
    assert set(state.take_dirty()) == {"clinic-a/dev-1", "clinic-b/dev-1"}


def test_device_keys_differ_between_clinics() -> None:
    assert device_key("clinic-a", "dev-1") != device_key("clinic-b", "dev-1")
