"""Settings of the alerting service (``BPSTREAM_ALERTING_*``; Kafka from ``BPSTREAM_KAFKA_*``)."""

from __future__ import annotations

import msgspec
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from bpstream.shared.anomaly import AlertConfig
from bpstream.shared.settings import ServiceSettings


class AlertingSettings(ServiceSettings):
    """Consumer group, batching, state flushing and the detector's thresholds."""

    model_config = SettingsConfigDict(env_prefix="BPSTREAM_ALERTING_", frozen=True, extra="ignore")

    group_id: str = "bpstream-alerting"
    batch_max_size: int = Field(default=1000, ge=1)
    batch_max_wait_ms: int = Field(default=50, ge=0)
    #: How often detector state is saved to ``alerting.state`` and offsets committed (together, so a
    #: restart resumes from a state that matches the committed position; 0 = after every batch).
    state_flush_s: float = Field(default=2.0, ge=0)
    #: Cuff readings older than this (by the bridge's receipt time) when alerting starts are remembered but
    #: raise nothing: a backlog in the compacted ``cuff`` topic, not news.
    cuff_backlog_max_age_s: float = Field(default=3600.0, ge=0)
    #: A device whose newest window (or cuff reading) lies this far behind the newest window seen (record
    #: time, not the wall clock) loses its detector state, and a tombstone is written to ``alerting.state``
    #: (0 keeps every device forever).
    evict_after_s: float = Field(default=24 * 3600.0, ge=0)
    #: Overrides of ``bpstream.shared.anomaly.AlertConfig`` fields, as JSON, e.g. ``{"persistence": 3}``.
    detector: dict[str, float | int] = Field(default_factory=dict)

    def alert_config(self) -> AlertConfig:
        return msgspec.convert(self.detector, AlertConfig)
