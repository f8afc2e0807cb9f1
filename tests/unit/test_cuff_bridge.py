"""Cuff readings at the bridge (pure): what is forwarded, what is dead-lettered and why; the writer's point."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bpstream.calibrate import cuff_message, parse_time
from bpstream.services.bridge.settings import BridgeSettings
from bpstream.services.bridge.stage import CuffLimits, Rejection, validate_cuff
from bpstream.services.writer.points import record_lines
from bpstream.shared.messages import CuffReading, encode_json
from bpstream.shared.topics import mqtt_cuff_topic

pytestmark = pytest.mark.unit

NOW_NS = 1_760_000_000 * 10**9
TOPIC = mqtt_cuff_topic("clinic-1", "dev-7")


def _payload(**overrides: Any) -> bytes:
    body: dict[str, Any] = {"sbp": 128.0, "dbp": 82.0, "time": NOW_NS / 1e9 - 30, "cuff_id": "omron-3"}
    body.update(overrides)
    return json.dumps(body).encode()


def test_valid_reading_is_normalised_with_device_from_the_topic() -> None:
    reading = validate_cuff(TOPIC, _payload(confirmation=True), NOW_NS, CuffLimits())
    assert reading == CuffReading(clinic_id="clinic-1", device_id="dev-7", sbp=128.0, dbp=82.0,
                                  time_ns=NOW_NS - 30 * 10**9, cuff_id="omron-3", confirmation=True,
                                  received_ns=NOW_NS)


def test_iso_time_with_zone_is_accepted_and_without_zone_refused() -> None:
    reading = validate_cuff(TOPIC, _payload(time="2025-10-09T08:53:00Z"), NOW_NS, CuffLimits())
    assert isinstance(reading, CuffReading) and reading.time_ns == 1_759_999_980 * 10**9
    naive = validate_cuff(TOPIC, _payload(time="2025-10-09T08:53:00"), NOW_NS, CuffLimits())
    assert isinstance(naive, Rejection) and naive.reason == "cuff_invalid"


@pytest.mark.parametrize(("payload", "reason"), [
    (_payload(sbp=400.0), "cuff_out_of_range"),
    (_payload(dbp=5.0), "cuff_out_of_range"),
    (_payload(sbp=80.0, dbp=80.0), "cuff_sbp_not_above_dbp"),
    (_payload(sbp=70.0, dbp=90.0), "cuff_sbp_not_above_dbp"),
    (_payload(time=NOW_NS / 1e9 + 301), "cuff_in_future"),
    (_payload(time=NOW_NS / 1e9 - 8 * 86400), "cuff_too_old"),
    (_payload(cuff_id="bad id/with slash"), "cuff_invalid"),
    (b'{"sbp": 120}', "cuff_invalid"),
    (b"\x00\x01 not json", "cuff_invalid"),
    (_payload(sbp="high"), "cuff_invalid"),
    (b"{" + b" " * 5000 + b"}", "cuff_invalid"),
])
def test_implausible_or_malformed_readings_are_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    verdict = validate_cuff(TOPIC, payload, NOW_NS, CuffLimits())
    assert isinstance(verdict, Rejection), verdict
    assert verdict.reason == reason
    assert "128" not in verdict.detail  # the detail names the rule, not the patient's reading


def test_bad_topic_is_rejected() -> None:
    for topic in ("bpstream/clinic-1/dev-7/signals", "bpstream/clinic 1/dev-7/cuff", "other/c/d/cuff"):
        verdict = validate_cuff(topic, _payload(), NOW_NS, CuffLimits())
        assert isinstance(verdict, Rejection) and verdict.reason == "bad_topic"


def test_limits_come_from_settings() -> None:
    settings = BridgeSettings(cuff_max_future_s=0.0, cuff_sbp_range=(60.0, 250.0))
    limits = settings.cuff_limits()
    assert limits.max_future_s == 0.0 and limits.sbp_range == (60.0, 250.0)
    verdict = validate_cuff(TOPIC, _payload(time=NOW_NS / 1e9 + 1), NOW_NS, limits)
    assert isinstance(verdict, Rejection) and verdict.reason == "cuff_in_future"


def test_calibrate_command_message_passes_the_bridge() -> None:
    message = cuff_message(141.0, 91.0, parse_time(str(NOW_NS / 1e9)), cuff_id="nurse-2", confirmation=True)
    reading = validate_cuff(TOPIC, json.dumps(message).encode(), NOW_NS, CuffLimits())
    assert isinstance(reading, CuffReading)
    assert (reading.sbp, reading.dbp, reading.time_ns, reading.confirmation) == (141.0, 91.0, NOW_NS, True)
    assert parse_time("2025-10-09T08:53:00Z") == "2025-10-09T08:53:00Z" and parse_time(None) is None


def test_writer_stores_a_reading_as_bp_cuff_at_its_measurement_time() -> None:
    reading = CuffReading(clinic_id="c1", device_id="d1", sbp=128.0, dbp=82.0, time_ns=NOW_NS, cuff_id="omron-3")
    lines, received = record_lines("t1.cuff", encode_json(reading), prefix="t1.", stored_ns=NOW_NS + 5)
    assert received is None
    assert lines == [f'bp_cuff,clinic=c1,device=d1 sbp=128.0,dbp=82.0,cuff_id="omron-3",confirmation=0i {NOW_NS}']
