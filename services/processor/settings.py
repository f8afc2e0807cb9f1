"""Settings of the stream processor (``BPSTREAM_PROCESSOR_*``), on top of the shared connection settings."""

from __future__ import annotations

import os
import tempfile

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from bpstream.shared.modelspec import HOP_SECONDS, WINDOW_SECONDS
from bpstream.shared.settings import ServiceSettings


class ProcessorSettings(ServiceSettings):
    """What the processor needs besides the connections."""

    model_config = SettingsConfigDict(env_prefix="BPSTREAM_PROCESSOR_", frozen=True, extra="ignore")

    #: Faust application id: the Kafka consumer group and the prefix of the state table's changelog topic.
    app_id: str = "bpstream-processor"
    #: Window length and hop in seconds (the model's metadata; defaults from ``bpstream.shared.modelspec``).
    window_s: float = Field(default=WINDOW_SECONDS, gt=0)
    hop_s: float = Field(default=HOP_SECONDS, gt=0)
    #: Chunks that may arrive ahead of a missing one before the missing one is declared a gap.
    max_reorder_chunks: int = Field(default=8, ge=0)
    #: Device-time seconds the stream may move past a missing chunk before it is declared a gap.
    max_lateness_s: float = Field(default=5.0, ge=0)
    #: A chunk whose start differs from the previous chunk's end by more than this is a clock jump.
    clock_tolerance_s: float = Field(default=0.25, gt=0)
    #: Device-time seconds after a declared gap during which a missing chunk that arrives late is still taken
    #: and the windows it completes are cut (same identities; 0: late chunks are ignored). Covers gateways
    #: resending after a broker restart; the repair state exists only while a gap is open and holds at most
    #: ``max_repair_chunks`` chunks per device (about 600 bytes each).
    late_horizon_s: float = Field(default=60.0, ge=0)
    max_repair_chunks: int = Field(default=128, ge=16)
    #: Upper bound of buffered plus waiting chunks per device (bounds state memory and changelog records).
    max_buffer_chunks: int = Field(default=64, ge=4)
    #: Chunks dated more than this after their Kafka receipt time are dead-lettered (``device_time_ahead``),
    #: and more than ``max_device_behind_s`` before it (``device_time_behind``; unset: no bound). The bridge
    #: applies the same bounds; this is defence in depth for records that reach signals.raw another way.
    max_device_ahead_s: float | None = Field(default=300.0, gt=0)
    max_device_behind_s: float | None = Field(default=None, gt=0)
    #: A seq more than this many chunks past the next expected one, without device time moving on as far, is
    #: dead-lettered (``seq_jump``): it would otherwise declare everything before it missing.
    max_seq_jump: int | None = Field(default=3600, ge=1)
    #: Faust worker log level (Faust is chatty; its own logs go through the service's handler).
    faust_loglevel: str = "WARNING"
    #: Folder for Faust's worker files (tables use the in-memory store, rebuilt from their changelog).
    data_dir: str = Field(default_factory=lambda: os.path.join(tempfile.gettempdir(), "bpstream-processor"))
    #: Records processed together (their outputs acknowledged by Kafka at once), and the longest wait to fill
    #: a batch (adds at most this much latency).
    batch_max: int = Field(default=500, ge=1)
    batch_wait_s: float = Field(default=0.05, gt=0)
    #: Seconds between writes of the changed device states and offset marks to the changelog (0: after every
    #: batch). A crashed processor re-reads at most about this much of signals.raw from Kafka when it
    #: restarts (re-emitting identical windows); SIGTERM writes them before exiting. Each write carries the
    #: devices' buffered chunks (about 6 KB per device), so writing less often saves Kafka and CPU time.
    checkpoint_interval_s: float = Field(default=5.0, ge=0)
    #: The state of a device silent this long (record time: the newest chunk this worker received minus the
    #: device's last one) is dropped, with a tombstone in the changelog. 0 keeps every state forever.
    evict_after_s: float = Field(default=24 * 3600.0, ge=0)
    #: How often (wall clock) the states are scanned for silent devices.
    evict_check_interval_s: float = Field(default=60.0, gt=0)
    #: Seconds between Faust offset commits.
    commit_interval_s: float = Field(default=1.0, gt=0)
    #: Restart the process (exec) when records wait in signals.raw but no batch was processed for this long
    #: (0 disables). Guards against Faust's consumer stalling after a recovery; keep it above the time a
    #: table recovery takes.
    stall_restart_s: float = Field(default=40.0, ge=0)
