"""Settings of the InfluxDB writer (``BPSTREAM_WRITER_*``; Kafka and InfluxDB from ``BPSTREAM_KAFKA_*`` and
``BPSTREAM_INFLUX_*``)."""

from __future__ import annotations

import socket

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from bpstream.shared.settings import ServiceSettings


class WriterSettings(ServiceSettings):
    """How the writer batches Kafka records into InfluxDB writes."""

    model_config = SettingsConfigDict(env_prefix="BPSTREAM_WRITER_", frozen=True, extra="ignore")

    group_id: str = "bpstream-writer"
    #: Largest number of Kafka records written in one InfluxDB request.
    batch_max_size: int = Field(default=5000, ge=1)
    #: Longest a record waits for its batch to fill before it is written anyway.
    batch_max_wait_ms: int = Field(default=50, ge=0)
    #: How often consumer lag of every pipeline group is stored as ``pipeline`` points (0 disables).
    pipeline_interval_s: float = Field(default=5.0, ge=0)
    #: ``instance`` tag of the pipeline points.
    instance: str = Field(default_factory=socket.gethostname)
    retry_base_s: float = 0.2
    retry_cap_s: float = 5.0
