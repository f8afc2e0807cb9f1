"""The notifier's pure parts: signatures, idempotency keys, which transitions notify, replay and restart
without repeats, escalation timing on an injected clock, acknowledgements, settings hygiene."""

from __future__ import annotations

import json

import msgspec
import pytest
from pydantic import ValidationError

from bpstream.services.notifier.settings import NotifierSettings
from bpstream.services.notifier.stage import (
    UNACKNOWLEDGED,
    Delivery,
    NotifierState,
    Routing,
    email_message,
    encode_episode,
    idempotency_key,
    message_id,
    notifies,
    signature,
    target_name,
    verify_signature,
    webhook_body,
)
from bpstream.shared.messages import Alert, decode_alert, encode_json
from bpstream.shared.notifications import AlertAck, NotificationAttempt, decode_ack, decode_attempt, encode

pytestmark = pytest.mark.unit
S = 10**9
ROUTING = Routing(channels=("webhook", "email"), escalation_channels=("escalation-webhook",),
                  escalate_after_ns=600 * S)


def _alert(state: str = "raised", *, kind: str = "crisis", severity: str = "critical",
           alert_id: str = "d1:crisis:1") -> Alert:
    return Alert(alert_id=alert_id, clinic_id="c1", device_id="d1", kind=kind, severity=severity, state=state,
                 started_ns=1, event_ns=2, sbp=190.0, dbp=125.0, n_windows=5, confidence=0.9, message="crisis")


def _observe(state: NotifierState, alert: Alert, now_ns: int = 0, partition: int = 0) -> list[Delivery]:
    return state.observe(alert, encode_json(alert), partition, now_ns)


def test_signature_verifies_and_detects_tampering() -> None:
    body = b'{"a": 1}'
    sig = signature(b"secret", 1700000000, body)
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify_signature(b"secret", 1700000000, body, sig)
    assert not verify_signature(b"other", 1700000000, body, sig)
    assert not verify_signature(b"secret", 1700000001, body, sig)
    assert not verify_signature(b"secret", 1700000000, body + b" ", sig)


def test_idempotency_key_is_per_episode_and_transition_and_shared_by_channels() -> None:
    assert idempotency_key("d1:crisis:1", "raised") != idempotency_key("d1:crisis:1", "resolved")
    assert idempotency_key("d1:crisis:1", "raised") != idempotency_key("d1:crisis:2", "raised")
    raised = _observe(NotifierState(ROUTING), _alert())
    assert {d.key for d in raised} == {"d1:crisis:1:raised"} and {d.channel for d in raised} == {"webhook", "email"}
    assert message_id("k", "email") == message_id("k", "email") != message_id("k", "escalation-email")


@pytest.mark.parametrize(("state", "expected"), [("raised", True), ("escalated", True), ("resolved", True),
                                                 ("updated", False), ("", False)])
def test_which_transitions_notify(state: str, expected: bool) -> None:
    assert notifies(_alert(state)) is expected
    assert bool(_observe(NotifierState(ROUTING), _alert(state))) is expected


def test_a_replayed_transition_notifies_nobody_once_recorded() -> None:
    state = NotifierState(ROUTING)
    first = _observe(state, _alert())
    for d in first:
        state.record(d, delivered=True, at_ns=5)
    assert _observe(state, _alert()) == []
    resolved = _observe(state, _alert("resolved"))
    assert [d.slot for d in resolved] == ["resolved/webhook", "resolved/email"]
    # A raise replayed after the resolve neither reopens the episode nor notifies again.
    assert _observe(state, _alert()) == []
    assert not state.episodes["d1:crisis:1"].open


def test_a_refused_delivery_is_given_up_not_repeated() -> None:
    state = NotifierState(ROUTING)
    webhook, _email = _observe(state, _alert())
    state.record(webhook, delivered=False, at_ns=5, reason="http_400")
    assert [d.slot for d in _observe(state, _alert())] == ["raised/email"]
    assert state.episodes["d1:crisis:1"].failed == {"raised/webhook": "http_400"}


def test_delivery_state_survives_a_restart_through_the_saved_episode() -> None:
    before = NotifierState(ROUTING)
    deliveries = _observe(before, _alert(), now_ns=100 * S)
    episode = before.record(deliveries[0], delivered=True, at_ns=101 * S)
    after = NotifierState(ROUTING)
    assert after.merge({"d1:crisis:1": encode_episode(episode), "bad": b"{not json"}) == ["bad"]
    # Only the channel not recorded before the restart is still owed; escalation still counts from the
    # first sighting, not from the restart.
    assert [d.slot for d in _observe(after, _alert(), now_ns=500 * S)] == ["raised/email"]
    assert after.escalation_due_ns(after.episodes["d1:crisis:1"]) == 700 * S


def test_escalation_is_due_after_the_setting_once_and_only_for_escalating_severities() -> None:
    state = NotifierState(ROUTING)
    _observe(state, _alert(), now_ns=1000 * S)
    _observe(state, _alert(kind="stage2", severity="warning", alert_id="d1:stage2:1"), now_ns=1000 * S)
    assert state.due_escalations(1599 * S) == []
    (due,) = state.due_escalations(1600 * S)
    assert due.transition == UNACKNOWLEDGED and due.channel == "escalation-webhook"
    assert due.alert.alert_id == "d1:crisis:1" and due.key == "d1:crisis:1:unacknowledged"
    state.record(due, delivered=True, at_ns=1601 * S)
    assert state.due_escalations(5000 * S) == []


def test_escalation_only_by_the_owner_of_the_partition() -> None:
    state = NotifierState(ROUTING)
    _observe(state, _alert(), now_ns=0, partition=2)
    assert state.due_escalations(601 * S, partitions={0, 1}) == []
    assert len(state.due_escalations(601 * S, partitions={2})) == 1


def test_acknowledgement_or_resolve_stops_escalation() -> None:
    acked, resolved = NotifierState(ROUTING), NotifierState(ROUTING)
    for state in (acked, resolved):
        _observe(state, _alert(), now_ns=0)
    changed = acked.acknowledge(AlertAck(alert_id="d1:crisis:1", by="dr-a", acked_ns=10 * S))
    assert changed is not None and changed.acked_by == "dr-a"
    assert acked.acknowledge(AlertAck(alert_id="d1:crisis:1", by="dr-b", acked_ns=20 * S)) is None
    _observe(resolved, _alert("resolved"), now_ns=5 * S)
    assert acked.due_escalations(10_000 * S) == [] and resolved.due_escalations(10_000 * S) == []


def test_an_acknowledgement_read_before_its_alert_applies_to_it() -> None:
    state = NotifierState(ROUTING)
    assert state.acknowledge(AlertAck(alert_id="d1:crisis:1", by="dr-a", acked_ns=1)) is None
    _observe(state, _alert(), now_ns=0)
    assert state.due_escalations(10_000 * S) == []


def test_a_newer_alert_version_with_extra_fields_passes_through() -> None:
    raw = json.loads(encode_json(_alert()))
    raw["escalation_level"] = 2
    raw["care_team"] = "ward-3"
    data = json.dumps(raw).encode()
    alert = decode_alert(data)
    state = NotifierState(ROUTING)
    deliveries = state.observe(alert, data, 0, 0)
    assert len(deliveries) == 2
    assert state.episodes[alert.alert_id].alert == data  # kept as received, re-sent on escalation


def test_webhook_body_and_email_carry_the_key_and_no_secret() -> None:
    d = Delivery(_alert(), "raised", "webhook")
    body = json.loads(webhook_body(d, sent_ns=7))
    assert body["idempotency_key"] == "d1:crisis:1:raised" and body["transition"] == "raised"
    assert body["alert"]["alert_id"] == "d1:crisis:1" and body["severity"] == "critical"
    msg = email_message(Delivery(_alert(), UNACKNOWLEDGED, "escalation-email"), "bp@x", ["a@y", "b@y"])
    assert msg["Message-ID"] == message_id("d1:crisis:1:unacknowledged", "escalation-email")
    assert "UNACKNOWLEDGED" in msg["Subject"] and msg["To"] == "a@y, b@y"
    assert "bpstream alerts ack d1:crisis:1" in msg.get_content()


def test_targets_are_named_without_credentials_or_paths() -> None:
    assert target_name("https://hooks.example.org:8443/T/secret-path?token=x") == "hooks.example.org:8443"
    assert target_name("a@ward.example, b@ward.example") == "ward.example"


def test_contract_records_round_trip_and_tolerate_extra_fields() -> None:
    ack = AlertAck(alert_id="a", by="dr", acked_ns=1)
    assert decode_ack(encode(ack)) == ack
    attempt = NotificationAttempt(alert_id="a", clinic_id="c", device_id="d", kind="crisis", severity="critical",
                                  transition="raised", channel="webhook", idempotency_key="a:raised", attempt=1,
                                  outcome="delivered", at_ns=1)
    raw = msgspec.json.decode(encode(attempt))
    raw["new_field"] = 1
    assert decode_attempt(msgspec.json.encode(raw)) == attempt


def test_settings_refuse_credentials_in_urls_and_mask_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="credentials"):
        NotifierSettings(webhook_url="https://user:pw@hooks.example.org/x")
    monkeypatch.setenv("BPSTREAM_NOTIFY_WEBHOOK_URL", "http://127.0.0.1:9999/hook")
    monkeypatch.setenv("BPSTREAM_NOTIFY_WEBHOOK_SECRET", "s3cret")
    monkeypatch.setenv("BPSTREAM_NOTIFY_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("BPSTREAM_NOTIFY_SMTP_PASSWORD", "pw-value")
    monkeypatch.setenv("BPSTREAM_NOTIFY_SMTP_TO", "a@x, b@x")
    monkeypatch.setenv("BPSTREAM_NOTIFY_ESCALATION_EMAIL_TO", "lead@x")
    settings = NotifierSettings()
    dumped = settings.model_dump_json()
    assert "s3cret" not in dumped and "pw-value" not in dumped
    assert settings.channels() == ("webhook", "email")
    assert settings.escalation_channels() == ("escalation-email",)
    assert settings.recipients() == ("a@x", "b@x") and settings.escalate_after_s == 600.0
