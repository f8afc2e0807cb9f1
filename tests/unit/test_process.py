"""Per-process tuning every service applies at start (shared/process.py)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

PROBE = """
import gc, json, numpy
from threadpoolctl import threadpool_info
from bpstream.shared.process import freeze_after_startup, limit_blas_threads
before = max(p["num_threads"] for p in threadpool_info())
limit_blas_threads()
freeze_after_startup()
print(json.dumps({"before": before, "after": max(p["num_threads"] for p in threadpool_info()),
                  "threshold": gc.get_threshold()[0], "frozen": gc.get_freeze_count()}))
"""


def run_probe(**env: str) -> dict[str, int]:
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, **env})
    return dict(json.loads(out.stdout))


def test_a_service_process_runs_one_blas_thread_and_a_frozen_collector() -> None:
    got = run_probe(OPENBLAS_NUM_THREADS="2")
    assert got["before"] == 2 and got["after"] == 1
    assert got["threshold"] == 50_000 and got["frozen"] > 1000


def test_the_settings_can_give_more_threads_and_keep_the_default_collector() -> None:
    got = run_probe(OPENBLAS_NUM_THREADS="2", BPSTREAM_BLAS_THREADS="2", BPSTREAM_GC_THRESHOLD="0")
    assert got["after"] == 2 and got["threshold"] == gc.get_threshold()[0]
