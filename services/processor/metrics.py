"""Prometheus metrics of the processor (one class, registered once per process or per test registry)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram


class ProcessorMetrics:
    """Prometheus metrics of the processor."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.chunks = Counter("bpstream_processor_chunks_total", "Chunks consumed from signals.raw", registry=registry)
        self.windows = Counter("bpstream_processor_windows_total", "Windows emitted, by quality", ["quality_ok"],
                               registry=registry)
        self.events = Counter("bpstream_processor_stream_events_total",
                              "Gaps, clock jumps, format changes, resets and refused windows", ["kind"],
                              registry=registry)
        self.dropped = Counter("bpstream_processor_dropped_chunks_total", "Chunks ignored, by reason", ["reason"],
                               registry=registry)
        self.repaired = Counter(
            "bpstream_processor_repaired_chunks_total",
            "Chunks that arrived after their gap was declared, within the late horizon, and completed windows",
            registry=registry)
        self.dead_letters = Counter("bpstream_processor_dead_letters_total", "Records dead-lettered, by reason",
                                    ["reason"], registry=registry)
        self.replayed = Counter(
            "bpstream_processor_replayed_records_total",
            "Records below the partition's offset mark (already processed) that were passed over", registry=registry)
        self.read_back = Counter(
            "bpstream_processor_read_back_records_total",
            "Records the consumer skipped that the processor read back from Kafka and processed", registry=registry)
        self.checkpoints = Counter("bpstream_processor_checkpoints_total",
                                   "Writes of the changed device states and offset marks to the changelog",
                                   registry=registry)
        self.send_retries = Counter("bpstream_processor_send_retries_total",
                                    "Batches whose outputs Kafka refused and that were sent again", registry=registry)
        self.evicted = Counter("bpstream_processor_evicted_devices_total",
                               "Device states dropped (tombstoned) after the device was silent for evict_after_s",
                               registry=registry)
        self.devices = Gauge("bpstream_processor_devices", "Devices with state in this worker (counted at checkpoints)",
                             registry=registry)
        self.batch_seconds = Histogram(
            "bpstream_processor_batch_seconds",
            "Time to process one batch of chunks, including Kafka acknowledging its outputs",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=registry)
