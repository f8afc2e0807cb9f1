"""Start, stop and restart the pipeline's services as subprocesses (the demo, the benchmark and the e2e tests).

Each service runs its own ``main()`` in a child process with ``BPSTREAM_*`` settings in its environment,
logs to ``<log_dir>/<name>.log``, and is stopped with SIGTERM (it drains, flushes and commits) and, only if it
does not exit in time, SIGKILL. Only processes started here are ever signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

#: Service name -> module with its ``main()``, in start order (downstream first, so nothing waits on it).
SERVICE_MODULES: dict[str, str] = {
    "writer": "bpstream.services.writer.main",
    "alerting": "bpstream.services.alerting.main",
    "inference": "bpstream.services.inference.main",
    "processor": "bpstream.services.processor.main",
    "bridge": "bpstream.services.bridge.main",
}


@dataclass(slots=True)
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    starts: int = 1


@dataclass(slots=True)
class ServiceSupervisor:
    """The pipeline's services as child processes; a context manager that stops what it started."""

    env: Mapping[str, str]
    log_dir: Path
    #: Extra environment per service (e.g. ``{"inference": {"BPSTREAM_INFERENCE_THREADS": "1"}}``).
    per_service_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    children: dict[str, _Child] = field(default_factory=dict)

    def start(self, name: str, *, instance: str | None = None) -> None:
        """Start one service (``instance`` names a second copy, e.g. ``inference-2``)."""
        key = instance or name
        module = SERVICE_MODULES[name]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{key}.log").open("ab")
        env = {**os.environ, **self.env, **self.per_service_env.get(name, {}), **self.per_service_env.get(key, {})}
        process = subprocess.Popen([sys.executable, "-c", f"from {module} import main; main()"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        previous = self.children.get(key)
        self.children[key] = _Child(key, process, log, starts=(previous.starts + 1) if previous else 1)

    def start_all(self, names: tuple[str, ...] = tuple(SERVICE_MODULES)) -> None:
        for name in names:
            self.start(name)

    def stop(self, key: str, *, kill: bool = False, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (or SIGKILL) one service and wait; returns its exit code."""
        child = self.children.get(key)
        if child is None:
            return None
        process = child.process
        if process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        child.log.close()
        return process.returncode

    def restart(self, key: str, *, kill: bool = False, down_s: float = 0.0) -> None:
        name = key.split("-")[0] if key not in SERVICE_MODULES else key
        self.stop(key, kill=kill)
        if down_s:
            time.sleep(down_s)
        self.start(name, instance=key if key != name else None)

    def stop_all(self, timeout_s: float = 30.0) -> dict[str, int | None]:
        """Stop upstream first (bridge ... writer), so downstream services drain what is still in flight."""
        codes: dict[str, int | None] = {}
        for key in sorted(self.children, key=lambda k: -list(SERVICE_MODULES).index(k.split("-")[0])):
            codes[key] = self.stop(key, timeout_s=timeout_s)
        return codes

    def dead(self) -> dict[str, int]:
        """Services that exited on their own, with their exit codes."""
        return {k: c.process.returncode for k, c in self.children.items()
                if c.process.poll() is not None and c.process.returncode is not None}

    def log_tail(self, key: str, lines: int = 40) -> str:
        path = self.log_dir / f"{key}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop_all()
