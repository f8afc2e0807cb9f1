"""Settings of the MQTT-to-Kafka bridge (``BPSTREAM_BRIDGE_*``), on top of the shared connection settings."""

from __future__ import annotations

import socket

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from bpstream.services.bridge.limits import DeviceLimits
from bpstream.services.bridge.stage import CuffLimits, DeviceTimeLimits
from bpstream.shared.messages import MAX_CHUNK_BYTES
from bpstream.shared.settings import ServiceSettings


def _default_client_id() -> str:
    return f"bpstream-bridge-{socket.gethostname()}"[:64]


class BridgeSettings(ServiceSettings):
    """What the bridge needs besides the connections."""

    model_config = SettingsConfigDict(env_prefix="BPSTREAM_BRIDGE_", frozen=True, extra="ignore")

    #: MQTT 5 shared-subscription group: bridges in one group split the devices' messages between them.
    share_group: str = "bpstream-bridge"
    #: Clinic whose devices this bridge group serves ("+" = every clinic), e.g. one bridge group per clinic.
    clinic: str = Field(default="+", pattern=r"^(\+|[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$")
    #: MQTT client id. Keep it stable across restarts: the broker keeps the session (subscription and
    #: unacknowledged QoS 1 messages) under it while the bridge is down.
    client_id: str = Field(default_factory=_default_client_id)
    #: How long the broker keeps the session (and queues messages) after the bridge disconnects.
    session_expiry_s: int = Field(default=3600, ge=0)
    #: Messages received but not yet acknowledged; also sent to the broker as MQTT 5 Receive Maximum.
    max_in_flight: int = Field(default=1000, ge=1, le=65535)
    #: Largest batch handed to the Kafka producer at once.
    batch_max: int = Field(default=500, ge=1)
    #: Forward a gateway batch's valid chunks as one ``ChunkBatch`` record per ``signals.raw`` partition
    #: (fewer, larger records for Kafka and the processor); off: one record per chunk. Processors read both,
    #: so upgrade the processors before turning this on in a running deployment.
    raw_batches: bool = True
    #: Sample rates (Hz) this deployment accepts; others are dead-lettered.
    allowed_sample_rates: tuple[float, ...] = (125.0, 250.0, 500.0)
    #: Seconds to finish in-flight work after SIGTERM before disconnecting.
    drain_timeout_s: float = Field(default=10.0, gt=0)
    #: Seconds between MQTT reconnect attempts (min, max).
    reconnect_min_s: int = Field(default=1, ge=1)
    reconnect_max_s: int = Field(default=30, ge=1)
    #: Retire this replica's session (scale-down): resume the session of ``client_id``, unsubscribe, forward
    #: what the broker still holds for it, and exit once nothing arrived for ``retire_idle_s``, ending the
    #: session, so a replica removed for good strands nothing (docs/RELIABILITY.md).
    retire: bool = False
    retire_idle_s: float = Field(default=2.0, gt=0)
    #: Plausible cuff pressures (mmHg); readings outside are dead-lettered.
    cuff_sbp_range: tuple[float, float] = (50.0, 300.0)
    cuff_dbp_range: tuple[float, float] = (20.0, 200.0)
    #: How far ahead of the bridge's clock a cuff time may be, and how old it may be (seconds).
    cuff_max_future_s: float = Field(default=300.0, ge=0)
    cuff_max_age_s: float = Field(default=7 * 86400.0, gt=0)

    #: A chunk whose device time is more than this ahead of the bridge's clock at receipt is dead-lettered
    #: (``device_time_ahead``): one future-dated chunk would otherwise make every later chunk "late".
    max_device_ahead_s: float | None = Field(default=300.0, gt=0)
    #: Likewise for chunks dated this far behind the bridge's clock (``device_time_behind``); unset: no bound
    #: (devices on poor links send old data legitimately, and old data cannot freeze a window clock).
    max_device_behind_s: float | None = Field(default=None, gt=0)

    #: Largest payload a device may publish (bytes); larger ones are dead-lettered (``payload_too_large``)
    #: with their head only. The broker refuses packets over its own ``message_size_limit`` (256 KiB) first.
    max_payload_bytes: int = Field(default=MAX_CHUNK_BYTES, ge=1024, le=MAX_CHUNK_BYTES)
    #: Per-device token bucket: sustained messages per second (None: no limit) and burst. A device sends
    #: 1 chunk/s; the burst absorbs backlogs after a link, bridge or Kafka outage (20 min at 1 chunk/s).
    #: Beyond it, messages are dead-lettered (``rate_limited``) without their payload.
    rate_limit_per_s: float | None = Field(default=10.0, gt=0)
    rate_limit_burst: float = Field(default=1200.0, ge=1)

    def device_limits(self) -> DeviceLimits:
        return DeviceLimits(self.max_payload_bytes, self.rate_limit_per_s, self.rate_limit_burst)

    def device_time_limits(self) -> DeviceTimeLimits:
        return DeviceTimeLimits(self.max_device_ahead_s, self.max_device_behind_s)

    def cuff_limits(self) -> CuffLimits:
        return CuffLimits(self.cuff_sbp_range, self.cuff_dbp_range, self.cuff_max_future_s, self.cuff_max_age_s)
