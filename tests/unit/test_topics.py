"""MQTT topic layout and Kafka topic names (shared/topics.py)."""

from __future__ import annotations

import pytest

from bpstream.shared.topics import (
    ALL_TOPICS,
    MQTT_SIGNALS_WILDCARD,
    SIGNALS_DLQ,
    SIGNALS_RAW,
    mqtt_shared_subscription,
    mqtt_signals_topic,
    mqtt_status_topic,
    parse_signals_topic,
    topic_name,
)

pytestmark = pytest.mark.unit


def test_mqtt_topics_follow_the_layout() -> None:
    assert mqtt_signals_topic("clinic-1", "dev-7") == "bpstream/clinic-1/dev-7/signals"
    assert mqtt_status_topic("clinic-1", "dev-7") == "bpstream/clinic-1/dev-7/status"
    assert MQTT_SIGNALS_WILDCARD == "bpstream/+/+/signals"
    assert mqtt_shared_subscription("bridges") == "$share/bridges/bpstream/+/+/signals"


def test_signals_topic_parses_back_to_its_ids() -> None:
    assert parse_signals_topic(mqtt_signals_topic("c.1", "d_2")) == ("c.1", "d_2")


@pytest.mark.parametrize("topic", ["bpstream/c/d/status", "other/c/d/signals", "bpstream/c/signals",
                                   "bpstream/c/d/e/signals", "bpstream/c d/x/signals", "bpstream/-c/d/signals",
                                   "bpstream//d/signals"])
def test_other_topics_are_rejected(topic: str) -> None:
    with pytest.raises(ValueError, match="topic"):
        parse_signals_topic(topic)


def test_kafka_topic_names_are_unique_and_prefixable() -> None:
    names = [t.name for t in ALL_TOPICS]
    assert len(set(names)) == len(names)
    assert {"signals.raw", "signals.dlq", "windows", "estimates", "alerts"} <= set(names)
    assert all(t.partitions >= 1 for t in ALL_TOPICS)
    assert topic_name(SIGNALS_RAW) == "signals.raw"
    assert topic_name(SIGNALS_DLQ, "t1234abcd.") == "t1234abcd.signals.dlq"


def test_per_device_topics_scale_out() -> None:
    # Several consumers of a group can share the device-keyed stream only if it has several partitions.
    assert SIGNALS_RAW.partitions > 1
