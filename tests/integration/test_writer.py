"""The InfluxDB writer against real Kafka and InfluxDB: points stored, replays overwrite, bad input is
dead-lettered while the stream goes on, and offsets are committed only once InfluxDB has the points."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from pipeline_support import influx_query, wait_until

from bpstream.localservers import ServerEndpoints
from bpstream.services.writer.points import WRITTEN_TOPICS as WRITTEN
from bpstream.services.writer.service import run_writer
from bpstream.services.writer.settings import WriterSettings
from bpstream.shared import influx_api
from bpstream.shared.kafka import KafkaProducer
from bpstream.shared.kafka_tools import read_topic
from bpstream.shared.messages import Alert, DeadLetter, Estimate, decode_dead_letter, encode_json
from bpstream.shared.settings import InfluxSettings, KafkaSettings
from bpstream.shared.topics import ALERTS, ESTIMATES, SIGNALS_DLQ

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]
T0 = 1_760_000_000_000_000_000
HOP = 2 * 10**9


def _estimate(device: str, i: int, sbp: float = 120.0) -> Estimate:
    return Estimate(clinic_id="c1", device_id=device, window_start_ns=T0 + i * HOP - 8 * 10**9,
                    window_end_ns=T0 + i * HOP, sbp=sbp, dbp=80.0, sbp_sd=5.0, dbp_sd=3.0, anomaly_prob=0.01,
                    sqi=0.9, quality_ok=True, inputs="ecg+ppg", model_version="v1", received_ns=T0 + i * HOP,
                    estimated_ns=T0 + i * HOP + 10**7)


@pytest.fixture
async def writer(servers: ServerEndpoints, kafka_topics: str, influx_db: str) -> AsyncIterator[WriterSettings]:
    # the writer's own users: Kafka ACLs for what it reads, InfluxDB WRITE only on its database
    settings = WriterSettings(kafka=servers.kafka_settings(kafka_topics, "writer"),
                              influx=servers.influx_settings(influx_db, "writer"),
                              batch_max_wait_ms=100, pipeline_interval_s=1.0)
    stop = asyncio.Event()
    task = asyncio.create_task(run_writer(settings, stop))
    yield settings
    stop.set()
    await asyncio.wait_for(task, timeout=60)


@pytest.fixture
def admin_influx(servers: ServerEndpoints, influx_db: str) -> InfluxSettings:
    """The InfluxDB admin on this test's database: the test reads what the (WRITE-only) writer stored."""
    return servers.influx_settings(influx_db)


async def test_estimates_and_alerts_are_stored_once_even_when_replayed(
        writer: WriterSettings, kafka_settings: KafkaSettings, admin_influx: InfluxSettings) -> None:
    async with KafkaProducer(kafka_settings) as producer:
        records = [(ESTIMATES, encode_json(_estimate(d, i)), d) for d in ("dev-a", "dev-b") for i in range(20)]
        await producer.send_many(records)
        await producer.send_many(records[:10])  # a replay: same devices and window ends
        alert = Alert(alert_id="dev-a:crisis:1", clinic_id="c1", device_id="dev-a", kind="crisis",
                      severity="critical", state="raised", started_ns=T0, event_ns=T0 + 10 * HOP, sbp=190.0,
                      dbp=125.0, n_windows=5, confidence=0.97, message="crisis")
        await producer.send_many([(ALERTS, encode_json(alert), "dev-a")] * 2)

    async def stored() -> list[dict[str, object]]:
        rows = await influx_query(admin_influx, "SELECT count(sbp) FROM bp_estimate GROUP BY device")
        return rows if sum(int(r["count"]) for r in rows) >= 40 else []

    rows = await wait_until(stored, timeout_s=120, what="40 estimate points")
    assert {r["device"]: r["count"] for r in rows} == {"dev-a": 20, "dev-b": 20}
    alerts = await wait_until(lambda: influx_query(admin_influx, "SELECT * FROM bp_alert"), timeout_s=60,
                              what="alert point")
    assert len(alerts) == 1
    assert alerts[0]["alert_id"] == "dev-a:crisis:1" and alerts[0]["active"] == 1
    assert alerts[0]["kind"] == "crisis" and alerts[0]["severity"] == "critical"
    # The writer also samples consumer lag of the pipeline's groups.
    query = "SELECT last(consumer_lag) FROM pipeline WHERE service = 'bpstream-writer'"
    lag = await wait_until(lambda: influx_query(admin_influx, query),
                           timeout_s=60, what="pipeline lag point")
    assert lag[0]["last"] == 0


async def test_malformed_records_go_to_the_dlq_and_the_stream_goes_on(
        writer: WriterSettings, kafka_settings: KafkaSettings, admin_influx: InfluxSettings) -> None:
    async with KafkaProducer(kafka_settings) as producer:
        await producer.send(ESTIMATES, encode_json(_estimate("dev-c", 0)), key="dev-c")
        await producer.send(ESTIMATES, b'{"v": 1, "device_id": "dev-c"}', key="dev-c")  # missing fields
        await producer.send(ESTIMATES, b"\xff\x00 not json", key="dev-c")
        await producer.send(ESTIMATES, encode_json(_estimate("dev-c", 1)), key="dev-c")

    async def two_points() -> list[dict[str, object]]:
        rows = await influx_query(admin_influx, "SELECT sbp FROM bp_estimate WHERE device = 'dev-c'")
        return rows if len(rows) == 2 else []

    await wait_until(two_points, timeout_s=120, what="both good estimates stored")

    async def dead_letters() -> list[object]:
        records = [decode_dead_letter(r.value or b"") for r in await read_topic(kafka_settings, SIGNALS_DLQ)]
        return [r for r in records if r.stage == "writer"] if len(records) >= 2 else []

    letters = await wait_until(dead_letters, timeout_s=60, what="two dead letters")
    assert {r.reason for r in letters} == {"invalid_message"}  # type: ignore[attr-defined]
    assert {r.payload for r in letters} == {b'{"v": 1, "device_id": "dev-c"}', b"\xff\x00 not json"}  # type: ignore[attr-defined]
    # ... and the writer stores the dead letters it reads back from the DLQ as countable points.
    counted = await wait_until(lambda: influx_query(
        admin_influx, "SELECT count(\"count\") FROM dead_letter WHERE stage = 'writer'"),
                               timeout_s=60, what="dead_letter points")
    assert counted[0]["count"] == 2


async def test_points_influxdb_refuses_are_dead_lettered_and_skipped_without_blocking(
        writer: WriterSettings, kafka_settings: KafkaSettings, admin_influx: InfluxSettings,
        caplog: pytest.LogCaptureFixture) -> None:
    from bpstream.shared.lag import LagProbe

    # A field-type conflict: model_version already exists as an integer in this database, so InfluxDB answers
    # 400 for every estimate line (a bad point). The alert in the same batch must still be stored.
    async with influx_api.async_client(writer.influx) as client:
        await client.write_api().write(bucket=influx_api.bucket(writer.influx), write_precision="ns",
                                       record=f"bp_estimate,clinic=c1,device=other model_version=7i {T0}")
    alert = Alert(alert_id="dev-e:stage2:1", clinic_id="c1", device_id="dev-e", kind="stage2", severity="warning",
                  state="raised", started_ns=T0, event_ns=T0 + HOP, sbp=150.0, dbp=95.0, n_windows=5,
                  confidence=0.8, message="stage 2")
    estimates = [encode_json(_estimate("dev-e", i, sbp=171.25 + i)) for i in range(3)]
    caplog.set_level(logging.DEBUG)
    async with KafkaProducer(kafka_settings) as producer:
        await producer.send_many([(ESTIMATES, payload, "dev-e") for payload in estimates]
                                 + [(ALERTS, encode_json(alert), "dev-e")])
    query = "SELECT * FROM bp_alert WHERE device = 'dev-e'"
    await wait_until(lambda: influx_query(admin_influx, query), timeout_s=120,
                     what="the alert stored next to refused estimates")
    rows = await influx_query(admin_influx, "SELECT * FROM bp_estimate WHERE device = 'dev-e'")
    assert rows == []

    async def writer_caught_up() -> bool:
        async with LagProbe(kafka_settings, {"bpstream-writer": WRITTEN}) as probe:
            return (await probe.lags())["bpstream-writer"] == 0

    await wait_until(writer_caught_up, timeout_s=60, what="the writer to commit past the refused points")

    # Each refused record is dead-lettered once, with our reason and its original bytes ...
    async def refused_letters() -> list[DeadLetter]:
        records = [decode_dead_letter(r.value or b"") for r in await read_topic(kafka_settings, SIGNALS_DLQ)]
        letters = [r for r in records if r.stage == "writer"]
        return letters if len(letters) >= 3 else []

    letters = await wait_until(refused_letters, timeout_s=60, what="three dead letters for the refused estimates")
    assert sorted(r.payload for r in letters) == sorted(estimates)
    assert {r.reason for r in letters} == {"influx_field_type_conflict"}
    assert {r.source for r in letters} == {f"{writer.kafka.topic_prefix}{ESTIMATES.name}"}
    # ... and neither the dead letters nor the writer's log repeat InfluxDB's error body, which quotes the
    # refused line (a patient's readings).
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records
                       if r.name.startswith(("bpstream", "influxdb_client")))
    assert "influx rejected a point" in logged
    for text in (logged, *(r.detail for r in letters)):
        assert "171.25" not in text and "already exists as type" not in text and "dropped=" not in text
