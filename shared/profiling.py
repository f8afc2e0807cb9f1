"""Optional cProfile of a whole service process, for ``bpstream bench pipeline --profile``.

When ``BPSTREAM_PROFILE_DIR`` is set, ``profiled(name, run)`` runs the service under cProfile and writes
``<dir>/<name>.prof`` when it exits (SIGTERM drains first, so the profile covers the whole run).
"""

from __future__ import annotations

import cProfile
import os
from collections.abc import Callable
from pathlib import Path


def profiled(name: str, run: Callable[[], None]) -> None:
    directory = os.environ.get("BPSTREAM_PROFILE_DIR")
    if not directory:
        run()
        return
    profile = cProfile.Profile()
    try:
        profile.runcall(run)
    finally:
        Path(directory).mkdir(parents=True, exist_ok=True)
        profile.dump_stats(str(Path(directory) / f"{name}.prof"))
