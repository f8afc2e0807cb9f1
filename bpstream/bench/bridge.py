"""Throughput of the bridge on this machine, against the real local Mosquitto and Kafka.

The backlog method isolates the bridge from the publisher's speed: the bridge's persistent session is
created, the bridge stops, ``messages`` QoS 1 chunks are published (the broker queues them for the session),
then a bridge process starts and the time from its readiness until every chunk is in ``signals.raw`` gives the
forwarding rate (validate, produce with acks=all, acknowledge over MQTT).

Run: ``.venv/bin/python -m bpstream.bench.bridge --messages 20000 --devices 200``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bpstream.shared.kafka import KafkaConsumer, ensure_topics
from bpstream.shared.messages import SignalChunk, encode_chunk
from bpstream.shared.mqtt import configure_client
from bpstream.shared.settings import KafkaSettings
from bpstream.shared.topics import ALL_TOPICS, SIGNALS_RAW, mqtt_signals_topic


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_bridge(env: dict[str, str], log: Any) -> tuple[subprocess.Popen[bytes], float]:
    proc = subprocess.Popen([sys.executable, "-m", "bpstream.services.bridge.main"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    port = env["BPSTREAM_BRIDGE_METRICS_PORT"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc, time.perf_counter()
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("bridge did not become ready")


def run(messages: int, devices: int) -> dict[str, float | int]:
    from bpstream.localservers import ensure_up

    servers = ensure_up()
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    clinic = f"bench-{uuid.uuid4().hex[:6]}"
    kafka = servers.kafka_settings(prefix)  # the admin creates and reads the topics; the bridge has its own user
    asyncio.run(servers.grant_kafka_prefix(prefix))
    asyncio.run(ensure_topics(kafka, ALL_TOPICS))
    env = {**os.environ, **servers.env("bridge"), "BPSTREAM_KAFKA_TOPIC_PREFIX": prefix,
           "BPSTREAM_BRIDGE_CLINIC": clinic,
           "BPSTREAM_BRIDGE_CLIENT_ID": f"bench-{clinic}", "BPSTREAM_BRIDGE_SHARE_GROUP": clinic,
           "BPSTREAM_BRIDGE_SESSION_EXPIRY_S": "300", "BPSTREAM_BRIDGE_METRICS_PORT": str(_free_port()),
           "BPSTREAM_LOG_LEVEL": "WARNING"}
    samples = np.random.default_rng(0).standard_normal((2, 125)).astype(np.float32)
    payloads = [encode_chunk(SignalChunk(clinic, f"dev-{i % devices}", i // devices, 1_700_000_000 * 10**9,
                                         125.0, ("ecg", "ppg"), samples)) for i in range(messages)]
    with tempfile.TemporaryFile() as log:
        proc, _ = _start_bridge(env, log)  # creates the persistent session and its subscription
        proc.terminate()
        proc.wait(30)
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.max_queued_messages_set(0)
        pub.max_inflight_messages_set(1000)
        configure_client(pub, servers.mqtt_settings("simulator"))
        pub.connect(servers.mqtt_host, servers.mqtt_port)
        pub.loop_start()
        started = time.perf_counter()
        infos = [pub.publish(mqtt_signals_topic(clinic, f"dev-{i % devices}"), p, qos=1)
                 for i, p in enumerate(payloads)]
        for info in infos:
            info.wait_for_publish(120)
        publish_s = time.perf_counter() - started
        pub.disconnect()
        pub.loop_stop()
        proc, ready_at = _start_bridge(env, log)
        try:
            count, last_at = asyncio.run(_count(kafka, messages))
        finally:
            proc.terminate()
            proc.wait(30)
    forward_s = last_at - ready_at
    return {"messages": messages, "devices": devices, "forwarded": count,
            "publish_msgs_per_s": round(messages / publish_s), "bridge_msgs_per_s": round(count / forward_s),
            "bridge_seconds": round(forward_s, 2)}


async def _count(kafka: KafkaSettings, expected: int) -> tuple[int, float]:
    count, last_at = 0, time.perf_counter()
    async with KafkaConsumer(kafka, [SIGNALS_RAW], f"bench-{uuid.uuid4().hex[:6]}") as consumer:
        deadline = time.monotonic() + 300
        while count < expected and time.monotonic() < deadline:
            records = await consumer.getmany(timeout_ms=200)
            if records:
                count += len(records)
                last_at = time.perf_counter()
    return count, last_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(run(args.messages, args.devices)))


if __name__ == "__main__":
    main()
