"""Per-process tuning every service applies at start: BLAS/OpenMP threads and the garbage collector.

* BLAS threads: NumPy/SciPy's OpenBLAS starts one thread per core on larger arrays; in a service that shares
  the machine with four others (and batches windows), those threads contend and cost more than they give.
  One thread per process unless ``BPSTREAM_BLAS_THREADS`` says otherwise.
* Garbage collection: the per-message path allocates many short-lived objects; with the default first-generation
  threshold (700) full collections walk the long-lived start-up objects again and again. After start-up the
  survivors are frozen out of collection and the threshold is raised (``BPSTREAM_GC_THRESHOLD``, 0 = default).
"""

from __future__ import annotations

import gc
import logging

from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)


class ProcessSettings(BaseSettings):
    """Process-wide knobs shared by every service (environment variables with the ``BPSTREAM_`` prefix)."""

    model_config = SettingsConfigDict(env_prefix="BPSTREAM_", frozen=True, extra="ignore")

    blas_threads: int = 1
    gc_threshold: int = 50_000


def limit_blas_threads(settings: ProcessSettings | None = None) -> None:
    """Cap the BLAS/OpenMP thread pools of this process (call before the service's first large array op)."""
    from threadpoolctl import threadpool_limits

    settings = settings or ProcessSettings()
    if settings.blas_threads > 0:
        threadpool_limits(limits=settings.blas_threads)


def freeze_after_startup(settings: ProcessSettings | None = None) -> None:
    """Move everything allocated so far out of the collector's view and raise the first-generation threshold."""
    settings = settings or ProcessSettings()
    gc.collect()
    gc.freeze()
    if settings.gc_threshold > 0:
        _, second, third = gc.get_threshold()
        gc.set_threshold(settings.gc_threshold, second, third)
    log.debug("gc frozen after start-up", extra={"frozen": gc.get_freeze_count()})
