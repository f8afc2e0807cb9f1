"""The inference service's wiring: Kafka ``windows`` -> batched model -> Kafka ``estimates``.

Built on the shared loop (``bpstream.shared.consumer_loop``): collect a batch (bounded by size and wait) ->
decode and check each window (bad ones to the DLQ with the reason) -> score the batch in a worker thread with
the model in service -> produce every estimate and wait until Kafka acknowledged all of them -> commit the
batch's offsets. A crash anywhere replays the batch; estimates are identified by device and window end, so the
replay overwrites downstream. Between batches a newer model version, loaded in the background, is swapped in.

Calibration (``calibration.CalibrationBook``): at start the compacted ``calibration.state`` (finished
calibrations) and ``cuff`` (latest reading per device) topics are read whole; the ``cuff`` topic is then
followed between batches (no consumer group: every instance knows every device's reading), so a new reading
takes effect without a restart. Calibrations a batch finishes are produced to ``calibration.state`` with the
batch's estimates, before its offsets are committed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from pathlib import Path

from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge, Histogram

from bpstream.services.inference.calibration import CalibrationBook, CalibrationPolicy
from bpstream.services.inference.reload import ModelManager
from bpstream.services.inference.settings import InferenceSettings
from bpstream.services.inference.stage import InputSpec, estimates_for, prepare_batch
from bpstream.shared.consumer_loop import BatchServiceBase, ConsumerLoop, LoopConfig, Outcome, Record, Rejected
from bpstream.shared.errors import DecodeError, TransientError
from bpstream.shared.kafka import OutgoingRecord, RecoveringProducer, ensure_topics
from bpstream.shared.kafka_tools import CuffFollower, read_latest_by_key
from bpstream.shared.messages import (
    CalibrationRecord,
    CuffReading,
    Window,
    decode_calibration,
    decode_window,
    encode_json,
)
from bpstream.shared.model.calibration import IntervalSpec
from bpstream.shared.model.runtime import DEFAULT_MODELS_ROOT, BpModel, Runtime, load_model
from bpstream.shared.retry import retry_async
from bpstream.shared.settings import log_settings
from bpstream.shared.telemetry import HealthServer
from bpstream.shared.topics import (
    CALIBRATION_STATE,
    CUFF,
    ESTIMATES,
    SIGNALS_DLQ,
    WINDOWS,
    cuff_key,
    device_key,
)

log = logging.getLogger(__name__)

WINDOWS_IN = Counter("bpstream_inference_windows_total", "Windows consumed", ["outcome"])
ERRORS = Counter("bpstream_inference_rejected_total", "Windows dead-lettered", ["reason"])
BATCH_SIZE = Histogram("bpstream_inference_batch_size", "Windows per model call",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
INFER_SECONDS = Histogram("bpstream_inference_model_seconds", "Model time per batch",
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
BATCH_SECONDS = Histogram("bpstream_inference_batch_seconds", "Batch handling, decode to commit",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
RELOADS = Counter("bpstream_inference_model_reloads_total", "Model versions swapped in while running")
CALIBRATIONS = Counter("bpstream_inference_calibrations_total", "Calibrations finished from cuff readings")
CUFF_READINGS = Counter("bpstream_inference_cuff_readings_total", "Cuff readings taken in")
ESTIMATE_MODES = Counter("bpstream_inference_estimates_total", "Estimates produced, by mode and withheld reason",
                         ["mode", "withheld"])
MODEL_INFO = Gauge("bpstream_inference_model_info", "The model version in service", ["version", "runtime",
                                                                                   "device"])


def resolve_runtime(runtime: str, device: str) -> tuple[Runtime, str]:
    """The concrete (runtime, device): ``auto`` devices become CUDA when torch sees a GPU, ``auto`` runtimes
    ONNX Runtime on CPU and TorchScript on CUDA."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if runtime == "auto":
        return ("torchscript" if device.startswith("cuda") else "onnx"), device
    if runtime not in ("torchscript", "onnx"):
        raise ValueError(f"unknown runtime {runtime!r}")
    return ("torchscript" if runtime == "torchscript" else "onnx"), device


def make_loader(settings: InferenceSettings) -> functools.partial[BpModel]:
    """``load_model`` with the runtime and device from settings (and the thread limit for torch or ONNX)."""
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    runtime, device = resolve_runtime(settings.runtime, settings.device)
    return functools.partial(load_model, runtime=runtime, device=device, threads=settings.threads)


def calibration_policy(settings: InferenceSettings, model: BpModel) -> CalibrationPolicy:
    """The calibration stage's policy: settings plus the model's interval spec and input ranges."""
    return CalibrationPolicy(reference_window_s=settings.calibration_window_s,
                             max_age_s=settings.calibration_max_age_s,
                             max_half_width_sbp=settings.max_half_width_sbp,
                             buffer_s=settings.calibration_buffer_s,
                             spec=IntervalSpec.from_dict(model.metadata.intervals),
                             input_ranges=dict(model.metadata.input_ranges))


class InferenceService(BatchServiceBase):
    """Scores one batch at a time with the model in service (a ``BatchService`` of the shared loop)."""

    def __init__(self, settings: InferenceSettings, producer: RecoveringProducer, models: ModelManager,
                 book: CalibrationBook | None = None, follower: CuffFollower | None = None) -> None:
        self.settings, self.producer, self.models, self.follower = settings, producer, models, follower
        self.book = book or CalibrationBook(calibration_policy(settings, models.model))
        self.scored = 0

    def take_cuff(self, readings: list[CuffReading]) -> None:
        for reading in readings:
            self.book.add_cuff(reading)
            CUFF_READINGS.inc()

    @staticmethod
    def spec(model: BpModel) -> InputSpec:
        shape = model.metadata.input_shape
        return InputSpec(tuple(model.metadata.channels), float(model.metadata.sample_rate), int(shape[2]))

    def swap_model_if_ready(self) -> None:
        """Between batches, never inside one: a newer model version loaded in the background goes in service."""
        if self.models.swap_if_ready():
            RELOADS.inc()
            self.model_info()
            self.book.policy = calibration_policy(self.settings, self.models.model)

    async def tick(self) -> None:
        """Between batches: look for a newer model, take new cuff readings and finish late calibrations."""
        self.models.poll()
        if self.follower is not None:
            try:
                new_cuffs = await self.follower.poll()
            except KafkaError as exc:  # Kafka restarting: the readings wait in the topic
                log.warning("cuff poll failed", extra={"error": repr(exc)[:200]})
                new_cuffs = []
            if new_cuffs:
                self.take_cuff(new_cuffs)
                await self.finish_late_calibrations()
        self.swap_model_if_ready()

    async def handle(self, records: list[Record]) -> Outcome:
        started = time.monotonic()
        self.swap_model_if_ready()
        model = self.models.model
        outcome = Outcome()
        windows: list[Window] = []
        origins: list[Record] = []
        for record in records:
            try:
                windows.append(decode_window(record.value or b""))
                origins.append(record)
            except DecodeError as exc:
                outcome.rejected.append(Rejected(record, exc.reason, str(exc)))
        batch = prepare_batch(windows, self.spec(model))
        outcome.rejected.extend(Rejected(origins[r.index], r.reason, r.detail) for r in batch.rejected)
        for rejected in outcome.rejected:
            ERRORS.labels(rejected.reason).inc()
        WINDOWS_IN.labels("rejected").inc(len(outcome.rejected))
        predictions = None
        if batch.inputs is not None:
            BATCH_SIZE.observe(len(batch.scored))
            t0 = time.monotonic()
            predictions = await asyncio.to_thread(model.predict, batch.inputs)  # the loop keeps heartbeating
            INFER_SECONDS.observe(time.monotonic() - t0)
        raw = estimates_for(batch, predictions, model.version, time.time_ns)
        features = {(w.clinic_id, w.device_id, w.end_ns): {"heart_rate_bpm": w.heart_rate_bpm} for w in batch.scored}
        estimates, finished = self.book.process(raw, features)
        outcome.outgoing.extend(self._calibration_record(r) for r in finished)
        outcome.outgoing.extend((ESTIMATES, encode_json(e), device_key(e.clinic_id, e.device_id)) for e in estimates)
        CALIBRATIONS.inc(len(finished))
        for e in estimates:
            ESTIMATE_MODES.labels(e.mode, e.withheld or "none").inc()
        WINDOWS_IN.labels("scored").inc(len(batch.scored))
        WINDOWS_IN.labels("unscored").inc(len(batch.unscored))
        self.scored += len(batch.scored)
        BATCH_SECONDS.observe(time.monotonic() - started)
        return outcome

    @staticmethod
    def _calibration_record(record: CalibrationRecord) -> OutgoingRecord:
        return CALIBRATION_STATE, encode_json(record), cuff_key(record.clinic_id, record.device_id)

    async def finish_late_calibrations(self) -> None:
        """Cuff readings sent after the windows around them were scored: calibrate from the buffer now."""
        finished = self.book.pending_finish()
        if finished:
            await self.producer.send_many([self._calibration_record(r) for r in finished])
            CALIBRATIONS.inc(len(finished))

    def model_info(self) -> None:
        MODEL_INFO.clear()
        model = self.models.model
        MODEL_INFO.labels(model.version, model.runtime, model.device).set(1)


def loop_config(settings: InferenceSettings) -> LoopConfig:
    """The shared loop's settings: ``windows`` in, batches bounded by ``batch_max_size``/``batch_max_wait_ms``."""
    return LoopConfig(service="inference", topics=[WINDOWS], group_id=settings.group_id,
                      batch_max_size=settings.batch_max_size, batch_max_wait_ms=settings.batch_max_wait_ms)


async def run_inference(settings: InferenceSettings, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set, finishing (and committing) the batch in hand."""
    log_settings(settings, "inference")
    source = settings.model_path or DEFAULT_MODELS_ROOT
    loader = make_loader(settings)
    models = await asyncio.to_thread(ModelManager, Path(source), loader, poll_s=settings.reload_poll_s)
    log.info("model loaded", extra={"version": models.version, "runtime": models.model.runtime,
                                    "device": models.model.device, "path": str(models.model.directory)})
    # Every topic this service reads or writes: started by hand on fresh servers, it must not wait for
    # another service (or the deployment's init job) to create them.
    await retry_async(lambda: ensure_topics(settings.kafka, [WINDOWS, ESTIMATES, SIGNALS_DLQ, CUFF, CALIBRATION_STATE]),
                      attempts=10, what="ensure topics")
    book = CalibrationBook(calibration_policy(settings, models.model))
    saved = await retry_async(lambda: read_latest_by_key(settings.kafka, CALIBRATION_STATE), attempts=10,
                              what="read calibration state")
    restored = []
    for data in saved.values():
        try:
            restored.append(decode_calibration(data))
        except DecodeError:
            log.warning("unreadable saved calibration ignored")
    book.restore(restored)
    follower = CuffFollower(settings.kafka)

    async def start_follower() -> list[CuffReading]:
        try:
            return await follower.start()
        except KafkaError as exc:
            raise TransientError(f"reading cuff: {exc!r}", reason="kafka_retriable") from exc

    readings = await retry_async(start_follower, attempts=10, what="read cuff readings")
    for reading in readings:
        book.add_cuff(reading)
    log.info("calibrations restored", extra={"calibrations": len(restored), "cuff_readings": len(readings)})
    loop = ConsumerLoop(settings.kafka, loop_config(settings))
    service: InferenceService | None = None
    try:
        async with HealthServer(settings.metrics_host, settings.metrics_port, lambda: loop.ready), loop:
            service = InferenceService(settings, loop.producer, models, book, follower)
            service.model_info()
            await loop.run(service, stop)
    finally:
        await follower.stop()
    log.info("inference stopped", extra={"scored": service.scored if service else 0})
