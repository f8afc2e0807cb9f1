"""MQTT topic layout and Kafka topic names (shared/topics.py)."""

from __future__ import annotations

import pytest

from bpstream.shared.topics import (
    ALL_TOPICS,
    MQTT_SIGNALS_WILDCARD,
    SIGNALS_DLQ,
    SIGNALS_RAW,
    KafkaTopic,
    mqtt_shared_subscription,
    mqtt_signals_topic,
    mqtt_status_topic,
    parse_signals_topic,
    processor_changelog,
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


def _ensured_topics() -> dict[str, list[KafkaTopic]]:
    """Every topic list passed to ``ensure_topics`` anywhere under services/, evaluated with default settings.

    Found in the source (each ``ensure_topics(kafka, TOPICS)`` call), so a service that starts ensuring a new
    topic is checked without this test knowing about it.
    """
    import ast
    import importlib
    from pathlib import Path
    from types import SimpleNamespace

    import bpstream.services

    root = Path(bpstream.services.__file__).parent
    found: dict[str, list[KafkaTopic]] = {}
    for path in sorted(root.glob("*/*.py")):
        calls = [node for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "ensure_topics"]
        if not calls:
            continue
        service = path.parent.name
        module = importlib.import_module(f"bpstream.services.{service}.{path.stem}")
        settings_module = importlib.import_module(f"bpstream.services.{service}.settings")
        (settings_cls,) = [v for k, v in vars(settings_module).items()
                           if k.endswith("Settings") and k != "ServiceSettings" and isinstance(v, type)
                           and v.__module__ == settings_module.__name__]
        settings = settings_cls.model_construct()  # defaults, not the environment
        scope = {**vars(module), "settings": settings, "self": SimpleNamespace(settings=settings)}
        for call in calls:
            expression = ast.Expression(call.args[1])
            found.setdefault(f"{service}/{path.name}:{call.lineno}", []).extend(
                eval(compile(expression, str(path), "eval"), scope))
    return found


def test_every_topic_a_service_ensures_is_in_all_topics() -> None:
    ensured = _ensured_topics()
    # The services that create topics at start (all six): the scan must not silently find nothing.
    assert {where.split("/")[0] for where in ensured} == {"bridge", "processor", "inference", "alerting",
                                                          "writer", "notifier"}
    for where, wanted in ensured.items():
        missing = [t.name for t in wanted if t not in ALL_TOPICS]
        assert not missing, f"{where} ensures topics missing from ALL_TOPICS: {missing}"


def test_all_topics_holds_the_private_state_topics() -> None:
    names = {t.name for t in ALL_TOPICS}
    assert {"alerting.state", "calibration.state", "notify.state", "alerts.acks",
            "bpstream-processor-device-state-changelog"} <= names
    assert all(t.compacted and t.retention_ms == -1 for t in ALL_TOPICS if t.name.endswith((".state", "changelog")))
    assert processor_changelog().partitions == SIGNALS_RAW.partitions  # co-partitioned with its input
