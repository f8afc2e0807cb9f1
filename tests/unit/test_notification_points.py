"""The writer stores every notifier delivery attempt as a ``bp_notification`` point (one per attempt)."""

from __future__ import annotations

import pytest

from bpstream.services.writer.points import WRITTEN_TOPICS, record_lines
from bpstream.shared.errors import DecodeError
from bpstream.shared.notifications import NotificationAttempt, encode
from bpstream.shared.topics import NOTIFICATIONS

pytestmark = pytest.mark.unit


def test_an_attempt_becomes_one_bp_notification_point_without_readings() -> None:
    attempt = NotificationAttempt(alert_id="d1:crisis:1", clinic_id="c1", device_id="d1", kind="crisis",
                                  severity="critical", transition="raised", channel="webhook",
                                  idempotency_key="d1:crisis:1:raised", attempt=2, outcome="retry", at_ns=123,
                                  target="hooks.example.org", reason="http_503", status=503)
    assert NOTIFICATIONS in WRITTEN_TOPICS
    (point,), received = record_lines("t.notifications", encode(attempt), prefix="t.", stored_ns=999)
    assert received is None
    assert point.startswith("bp_notification,")
    assert "channel=webhook" in point and "outcome=retry" in point and "transition=raised" in point
    assert "status=503i" in point and "attempt=2i" in point and point.endswith(" 123")
    assert "sbp" not in point and "dbp" not in point


def test_a_bad_attempt_record_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        record_lines("notifications", b"{}", prefix="", stored_ns=1)
