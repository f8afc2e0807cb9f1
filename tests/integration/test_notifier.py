"""The notifier against real Kafka, a real HTTP receiver and a real SMTP server (aiosmtpd).

Alerts are real ``Alert`` records produced to the test's ``alerts`` topic. "Nothing more will come" is never
decided by waiting a while: a test waits until the notifier's consumer group has committed every alert record
(the notifier commits only after every delivery those records owe is recorded in ``notify.state``), and from
then on a record can only be delivered again if the saved state were ignored, which is what is asserted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from notify_support import SmtpReceiver, WebhookReceiver
from pipeline_support import wait_until

from bpstream.localservers import ServerEndpoints
from bpstream.services.notifier.episodes import episodes
from bpstream.services.notifier.service import run_notifier
from bpstream.services.notifier.settings import NotifierSettings
from bpstream.services.notifier.stage import Episode, decode_episode, verify_signature
from bpstream.shared.kafka import KafkaProducer
from bpstream.shared.kafka_tools import read_latest_by_key, read_topic, topic_partitions
from bpstream.shared.messages import Alert, encode_json
from bpstream.shared.notifications import NotificationAttempt, decode_attempt
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import ALERTS, NOTIFICATIONS, NOTIFY_STATE, group_name, topic_name

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]
SECRET = "test-signing-secret"
WARD, LEAD = "ward@clinic.example", "lead@clinic.example"
T0 = 1_760_000_000_000_000_000
REPO = Path(__file__).resolve().parents[2]
LOGS = REPO / "reports" / "test-logs"


def _alert(device: str, state: str = "raised", kind: str = "crisis", severity: str = "critical") -> Alert:
    return Alert(alert_id=f"{device}:{kind}:{T0}", clinic_id="c1", device_id=device, kind=kind, severity=severity,
                 state=state, started_ns=T0, event_ns=T0 + (60 if state == "resolved" else 10) * 10**9,
                 sbp=192.0 if state == "raised" else 150.0, dbp=124.0 if state == "raised" else 95.0, n_windows=5,
                 confidence=0.95, message=f"{kind} {state}")


def _key(device: str, transition: str, kind: str = "crisis") -> str:
    return f"{device}:{kind}:{T0}:{transition}"


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def smtp() -> Iterator[SmtpReceiver]:
    receiver = SmtpReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def notifier_kafka(servers: ServerEndpoints, kafka_settings: KafkaSettings) -> KafkaSettings:
    """The notifier's own Kafka user (its ACLs under this test's prefix); the test itself uses the admin."""
    return servers.kafka_settings(kafka_settings.topic_prefix, "notifier")


def _env(kafka: KafkaSettings, webhook: WebhookReceiver, smtp: SmtpReceiver, **extra: str) -> dict[str, str]:
    return {
        "BPSTREAM_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "BPSTREAM_KAFKA_SECURITY_PROTOCOL": kafka.security_protocol,
        "BPSTREAM_KAFKA_SASL_MECHANISM": kafka.sasl_mechanism or "",
        "BPSTREAM_KAFKA_SASL_USERNAME": kafka.sasl_username or "",
        "BPSTREAM_KAFKA_SASL_PASSWORD": kafka.sasl_password.get_secret_value() if kafka.sasl_password else "",
        "BPSTREAM_KAFKA_SSL_CA_FILE": kafka.ssl_ca_file or "",
        "BPSTREAM_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "BPSTREAM_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "BPSTREAM_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
        "BPSTREAM_NOTIFY_WEBHOOK_URL": webhook.url,
        "BPSTREAM_NOTIFY_WEBHOOK_SECRET": SECRET,
        "BPSTREAM_NOTIFY_SMTP_HOST": "127.0.0.1",
        "BPSTREAM_NOTIFY_SMTP_PORT": str(smtp.port),
        "BPSTREAM_NOTIFY_SMTP_STARTTLS": "false",
        "BPSTREAM_NOTIFY_SMTP_TO": WARD,
        "BPSTREAM_NOTIFY_RETRY_ATTEMPTS": "3",
        "BPSTREAM_NOTIFY_RETRY_BASE_S": "0.1",
        "BPSTREAM_NOTIFY_RETRY_CAP_S": "0.5",
        "BPSTREAM_NOTIFY_ROUND_PAUSE_S": "0.5",
        "BPSTREAM_NOTIFY_TICK_S": "0.2",
        "BPSTREAM_NOTIFY_BATCH_MAX_WAIT_MS": "50",
        "BPSTREAM_NOTIFY_LOG_LEVEL": "INFO",
        **extra,
    }


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> NotifierSettings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return NotifierSettings()


class Clock:
    """Wall clock plus an offset the test advances (escalation without waiting minutes)."""

    def __init__(self) -> None:
        self.offset_ns = 0

    def __call__(self) -> int:
        return time.time_ns() + self.offset_ns


@pytest.fixture
async def in_process() -> AsyncIterator[list[asyncio.Task[None]]]:
    """Notifiers started by a test in this event loop; stopped (SIGTERM path) at the end."""
    tasks: list[asyncio.Task[None]] = []
    stops: list[asyncio.Event] = []
    yield tasks
    for task in tasks:
        stop = getattr(task, "stop_event", None)
        if isinstance(stop, asyncio.Event):
            stops.append(stop)
    for stop in stops:
        stop.set()
    for task in tasks:
        await asyncio.wait_for(task, timeout=60)


def _start(tasks: list[asyncio.Task[None]], settings: NotifierSettings, clock: Clock | None = None) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run_notifier(settings, stop, clock or Clock()))
    task.stop_event = stop  # type: ignore[attr-defined]
    tasks.append(task)


async def _produce(kafka: KafkaSettings, *records: Alert | bytes, key: str = "x") -> None:
    async with KafkaProducer(kafka) as producer:
        for r in records:
            if isinstance(r, Alert):
                await producer.send(ALERTS, encode_json(r), key=r.device_id)
            else:
                await producer.send(ALERTS, r, key=key)


async def _all_committed(kafka: KafkaSettings, group: str = "bpstream-notifier") -> bool:
    """True once the notifier's group committed every record of the alerts topic."""
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    reader = AIOKafkaConsumer(**kafka.client_kwargs(), enable_auto_commit=False)
    await admin.start()
    await reader.start()
    try:
        partitions = await topic_partitions(admin, [topic_name(ALERTS, kafka.topic_prefix)])
        ends = await reader.end_offsets(partitions)
        committed = await admin.list_consumer_group_offsets(group_name(group, kafka))
        return all(ends[tp] == 0 or (tp in committed and committed[tp].offset >= ends[tp]) for tp in partitions)
    finally:
        await reader.stop()
        await admin.close()


async def _episodes(kafka: KafkaSettings) -> dict[str, Episode]:
    return {k: decode_episode(v) for k, v in (await read_latest_by_key(kafka, NOTIFY_STATE)).items()}


async def _attempts(kafka: KafkaSettings) -> list[NotificationAttempt]:
    return [decode_attempt(r.value or b"") for r in await read_topic(kafka, NOTIFICATIONS)]


def _assert_signed(webhook: WebhookReceiver) -> None:
    for post in webhook.posts:
        ts = int(post.headers["X-Bpstream-Timestamp"])
        assert verify_signature(SECRET.encode(), ts, post.body, post.headers["X-Bpstream-Signature"])
        assert post.json["idempotency_key"] == post.headers["Idempotency-Key"]


async def test_a_crisis_alert_reaches_webhook_and_email_exactly_once(
        kafka_settings: KafkaSettings, notifier_kafka: KafkaSettings, kafka_topics: str, webhook: WebhookReceiver,
        smtp: SmtpReceiver,
        in_process: list[asyncio.Task[None]], monkeypatch: pytest.MonkeyPatch) -> None:
    webhook.start()
    smtp.start()
    settings = _settings(_env(notifier_kafka, webhook, smtp, BPSTREAM_NOTIFY_ESCALATION_EMAIL_TO=LEAD,
                              BPSTREAM_NOTIFY_ESCALATE_AFTER_S="2"), monkeypatch)
    _start(in_process, settings)
    crisis = _alert("dev-crisis")
    # The alert, a replay of it (alerting re-sends after a restart), and a record that does not decode.
    await _produce(kafka_settings, crisis, crisis, b"\xff not an alert")
    # The crisis is nobody's acknowledged: after ESCALATE_AFTER_S it goes to the escalation address too.
    await wait_until(lambda: _has(smtp.keys(LEAD)), timeout_s=120, what="the escalation e-mail")
    await wait_until(lambda: _all_committed(kafka_settings), timeout_s=120, what="alert offsets committed")
    saved = await wait_until(lambda: _episode_with(kafka_settings, crisis.alert_id, "unacknowledged/escalation-email"),
                             timeout_s=60, what="escalation recorded")

    assert webhook.keys() == [_key("dev-crisis", "raised")]
    _assert_signed(webhook)
    body = webhook.posts[0].json
    assert body["alert"]["alert_id"] == crisis.alert_id and body["severity"] == "critical"
    assert smtp.keys(WARD) == [_key("dev-crisis", "raised")]
    assert smtp.keys(LEAD) == [_key("dev-crisis", "unacknowledged")]
    assert set(saved.delivered) == {"raised/webhook", "raised/email", "unacknowledged/escalation-email"}
    attempts = await _attempts(kafka_settings)
    assert sorted((a.channel, a.transition, a.outcome) for a in attempts) == [
        ("email", "raised", "delivered"), ("escalation-email", "unacknowledged", "delivered"),
        ("webhook", "raised", "delivered")]
    assert all(SECRET not in a.target and "/hook" not in a.target for a in attempts)
    (view,) = await episodes(kafka_settings)
    assert view.open and view.ack is None and "raised/webhook" in view.delivered


async def _has(items: list[str]) -> list[str]:
    return items


async def _episode_with(kafka: KafkaSettings, alert_id: str, *slots: str) -> Episode | None:
    episode = (await _episodes(kafka)).get(alert_id)
    return episode if episode is not None and all(s in episode.delivered for s in slots) else None


async def test_receivers_down_get_the_notification_when_they_return(
        kafka_settings: KafkaSettings, notifier_kafka: KafkaSettings, kafka_topics: str, webhook: WebhookReceiver,
        smtp: SmtpReceiver,
        in_process: list[asyncio.Task[None]], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(_env(notifier_kafka, webhook, smtp), monkeypatch)
    _start(in_process, settings)
    await _produce(kafka_settings, _alert("dev-down"))

    async def retried_both() -> bool:
        attempts = await _attempts(kafka_settings)
        retries = {a.channel for a in attempts if a.outcome == "retry" and a.attempt > settings.retry_attempts}
        return retries == {"webhook", "email"}

    # Both receivers are down: the notifier keeps trying, round after round, and commits nothing meanwhile.
    await wait_until(retried_both, timeout_s=120, what="a second round of retries on both channels")
    assert not await _all_committed(kafka_settings)
    webhook.start()
    smtp.start()
    await wait_until(lambda: _all_committed(kafka_settings), timeout_s=120, what="alert offsets committed")
    assert webhook.keys() == [_key("dev-down", "raised")]
    assert smtp.keys(WARD) == [_key("dev-down", "raised")]
    _assert_signed(webhook)
    outcomes = [a.outcome for a in await _attempts(kafka_settings) if a.channel == "webhook"]
    assert outcomes[-1] == "delivered" and outcomes.count("delivered") == 1 and "failed" not in outcomes


async def test_acknowledging_stops_the_escalation(
        kafka_settings: KafkaSettings, notifier_kafka: KafkaSettings, kafka_topics: str, servers: ServerEndpoints,
        webhook: WebhookReceiver,
        smtp: SmtpReceiver, in_process: list[asyncio.Task[None]], monkeypatch: pytest.MonkeyPatch) -> None:
    webhook.start()
    smtp.start()
    escalation = f"http://127.0.0.1:{webhook.port}/escalation"
    settings = _settings(_env(notifier_kafka, webhook, smtp, BPSTREAM_NOTIFY_ESCALATION_WEBHOOK_URL=escalation,
                              BPSTREAM_NOTIFY_ESCALATE_AFTER_S="600"), monkeypatch)
    clock = Clock()
    _start(in_process, settings, clock)
    acked, ignored = _alert("dev-acked"), _alert("dev-ignored")
    await _produce(kafka_settings, acked, ignored)
    await wait_until(lambda: _episode_with(kafka_settings, ignored.alert_id, "raised/webhook", "raised/email"),
                     timeout_s=120, what="both raises delivered")
    await wait_until(lambda: _episode_with(kafka_settings, acked.alert_id, "raised/webhook", "raised/email"),
                     timeout_s=120, what="both raises delivered")

    env = {**os.environ, **servers.env(), "BPSTREAM_KAFKA_TOPIC_PREFIX": kafka_settings.topic_prefix}
    rc, listed = await _cli(env, "alerts", "list")
    assert rc == 0 and acked.alert_id in listed and ignored.alert_id in listed and "UNACKNOWLEDGED" in listed
    rc, done = await _cli(env, "alerts", "ack", acked.alert_id, "--by", "dr-who")
    assert rc == 0 and f"acknowledged {acked.alert_id}" in done
    rc, _ = await _cli(env, "alerts", "ack", "no-such-alert")
    assert rc == 1

    async def ack_applied() -> bool:
        episode = (await _episodes(kafka_settings)).get(acked.alert_id)
        return episode is not None and episode.acked_by == "dr-who"

    await wait_until(ack_applied, timeout_s=60, what="the notifier applied the acknowledgement")
    clock.offset_ns = int(settings.escalate_after_s * 1e9)  # ten minutes later, for the notifier
    await wait_until(lambda: _episode_with(kafka_settings, ignored.alert_id, "unacknowledged/escalation-webhook"),
                     timeout_s=60, what="the unacknowledged episode escalated")
    # Both episodes became due at the same moment; only the unacknowledged one was escalated.
    assert webhook.keys("/escalation") == [_key("dev-ignored", "unacknowledged")]
    assert acked.alert_id not in {p.json["alert_id"] for p in webhook.posts if p.path == "/escalation"}
    rc, listed = await _cli(env, "alerts", "list")
    assert rc == 0 and "acked by dr-who" in listed


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run ``bpstream ARGS`` as a user would; return its exit code and its output."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bpstream", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode or 0, out.decode()


class NotifierProcess:
    """``bpstream notifier`` as a real process, to be SIGKILLed."""

    def __init__(self, env: dict[str, str], name: str) -> None:
        self.env, self.name = {**os.environ, **env}, name
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.runs += 1
        with open(LOGS / f"{self.name}-{self.runs}.log", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "bpstream", "notifier"], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "the notifier died on its own"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def test_a_notifier_killed_mid_episode_neither_repeats_nor_loses(
        kafka_settings: KafkaSettings, notifier_kafka: KafkaSettings, kafka_topics: str, webhook: WebhookReceiver,
        smtp: SmtpReceiver) -> None:
    webhook.start()
    smtp.start()
    notifier = NotifierProcess(_env(notifier_kafka, webhook, smtp), "notifier-sigkill")
    first, second = _alert("dev-k1"), _alert("dev-k2")
    try:
        notifier.start()
        await _produce(kafka_settings, first)
        await wait_until(lambda: _episode_with(kafka_settings, first.alert_id, "raised/webhook", "raised/email"),
                         timeout_s=180, what="the raise delivered and recorded")
        notifier.kill()
        # While it is dead: the raise is replayed, the episode resolves, another patient's crisis starts.
        await _produce(kafka_settings, first, _alert("dev-k1", "resolved"), second)
        notifier.start()
        await wait_until(lambda: _episode_with(kafka_settings, first.alert_id, "resolved/webhook", "resolved/email"),
                         timeout_s=180, what="the resolve delivered after the restart")
        await wait_until(lambda: _episode_with(kafka_settings, second.alert_id, "raised/webhook", "raised/email"),
                         timeout_s=180, what="the second crisis delivered after the restart")
        await wait_until(lambda: _all_committed(kafka_settings), timeout_s=120, what="alert offsets committed")
    finally:
        notifier.stop()
    expected = sorted([_key("dev-k1", "raised"), _key("dev-k1", "resolved"), _key("dev-k2", "raised")])
    assert sorted(webhook.keys()) == expected
    assert sorted(smtp.keys(WARD)) == expected
    _assert_signed(webhook)
