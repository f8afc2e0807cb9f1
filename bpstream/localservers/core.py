"""Start, reuse, check, restart and stop the three local servers, tracked by PID in a state file.

State lives in ``.local/servers/state.json`` of the checkout (override with ``BPSTREAM_LOCAL_DIR``). Servers
run detached (their own session, parent = init), so they outlive the command or test session that started
them; the next ``ensure_up`` reuses them when they still answer a round trip. A file lock serialises
concurrent callers (parallel test sessions, two terminals).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import SecretStr

from bpstream.localservers import influx_security, install, kafka_security, mqtt_security, probes, servers
from bpstream.shared.mqtt import mqtt_env
from bpstream.shared.settings import InfluxSettings, KafkaSettings, MqttSettings

HOST = "127.0.0.1"
SERVER_NAMES: tuple[str, ...] = ("mosquitto", "kafka", "influxdb")
STARTUP_TIMEOUT_S = float(os.environ.get("BPSTREAM_SERVERS_TIMEOUT_S", "120"))
_STOP_TIMEOUT_S = 30.0
_T = TypeVar("_T")
log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """A local server could not be started or does not answer; the message includes its log tail."""


@dataclass(frozen=True, slots=True)
class ServerEndpoints:
    """Where the running servers listen (all on loopback), and where their credentials and CA lie.

    Kafka is SASL_SSL with one SCRAM user per service and InfluxDB HTTPS with auth: take connection settings
    from ``kafka_settings`` / ``influx_settings`` / ``env`` (a service name gets that service's own user,
    None the admin used by tools and tests) rather than building them by hand.
    """

    mqtt_host: str
    mqtt_port: int
    kafka_bootstrap: str
    influx_url: str
    #: Folder with the generated credentials and ``pki/ca.crt`` (``state_dir()``).
    secrets_dir: str = ""
    #: Kafka's controller listener (internal to the broker: mutual TLS with its own certificate).
    kafka_controller: str = ""

    @property
    def ca_file(self) -> str:
        return str(Path(self.secrets_dir) / "pki" / "ca.crt")

    def kafka_settings(self, prefix: str = "", service: str | None = None) -> KafkaSettings:
        """Kafka settings for ``service``'s own user (None: the admin) with topic prefix ``prefix``."""
        if service is not None and service not in kafka_security.SERVICES:
            raise ValueError(f"{service!r} has no Kafka user; choose one of {', '.join(kafka_security.SERVICES)}")
        return kafka_security.client_settings(Path(self.secrets_dir), self.kafka_bootstrap,
                                              service or kafka_security.ADMIN, topic_prefix=prefix)

    def influx_settings(self, database: str = "bpstream", service: str | None = None) -> InfluxSettings:
        """InfluxDB settings for ``service``'s user (``writer``, ``grafana``; None: the admin)."""
        user = influx_security.SERVICE_USERS.get(service, None) if service else influx_security.ADMIN
        return influx_security.client_settings(Path(self.secrets_dir), self.influx_url, user, database=database)

    def env(self, service: str | None = None) -> dict[str, str]:
        """The ``BPSTREAM_*`` variables that point a process at these servers: for a service name that
        service's own users, for None the admin (tools, tests)."""
        state = Path(self.secrets_dir)
        # a process that is neither a Kafka service nor a tool (the simulator, Grafana) gets no Kafka user
        influx_user = influx_security.SERVICE_USERS.get(service) if service else influx_security.ADMIN
        kafka_user = kafka_security.ADMIN if service is None else (service if service in kafka_security.SERVICES
                                                                   else None)
        # Only the services that speak MQTT (and tools) get an MQTT account.
        mqtt = mqtt_env(self.mqtt_settings(service)) if service in mqtt_security.SERVICE_ACCOUNTS else {}
        return {
            **mqtt,
            "BPSTREAM_KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap,
            **kafka_security.client_env(state, kafka_user),
            "BPSTREAM_INFLUX_URL": self.influx_url,
            **influx_security.client_env(state, influx_user),
        }

    async def grant_kafka_prefix(self, prefix: str) -> int:
        """Every service's ACLs for topics and groups under ``prefix`` (through the admin)."""
        return await kafka_security.grant_prefix(self.kafka_settings(), prefix)

    async def grant_influx_database(self, database: str) -> None:
        """Create ``database`` and grant the writer WRITE and Grafana READ on it (through the admin)."""
        await influx_security.grant_database(self.influx_settings(database), database)

    def mqtt_settings(self, service: str | None = None) -> MqttSettings:
        """MQTT settings for ``service``: TLS with the local CA and the service's account ("bridge",
        "simulator", "cuff", "probe", "observer"; None: the cuff account tools such as calibrate use)."""
        state = Path(self.secrets_dir) if self.secrets_dir else state_dir()
        user, password = mqtt_security.password_for(state, service)
        return MqttSettings(host=self.mqtt_host, port=self.mqtt_port, username=user,
                            password=SecretStr(password), tls=True, ca_file=str(mqtt_security.ca_file(state)))


@dataclass(slots=True)
class ServerStatus:
    """What ``status()`` knows about one server."""

    name: str
    pid: int | None
    running: bool
    healthy: bool
    ports: dict[str, int] = field(default_factory=dict)
    detail: str = ""
    log_file: str = ""
    started_s: float | None = None
    reused: bool = False


def project_root() -> Path:
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def state_dir() -> Path:
    override = os.environ.get("BPSTREAM_LOCAL_DIR")
    return Path(override).resolve() if override else project_root() / ".local" / "servers"


def _state_file() -> Path:
    return state_dir() / "state.json"


def _load_state() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return {}
    return data.get("servers", {}) if isinstance(data, dict) else {}


def _save_state(state: dict[str, dict[str, Any]]) -> None:
    path = _state_file()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"servers": state}, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, or None when there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _alive(entry: dict[str, Any]) -> bool:
    pid = entry.get("pid")
    if not isinstance(pid, int):
        return False
    info = _proc_stat(pid)
    # The start time guards against a recycled PID belonging to some other process.
    return info is not None and info[0] not in ("Z", "X") and info[1] == entry.get("start_ticks")


def _spawn(argv: list[str], log_file: Path, extra_env: dict[str, str]) -> tuple[int, int]:
    """Start ``argv`` detached (reparented to init, own session), output appended to ``log_file``."""
    script = 'log=$1; shift; "$@" >>"$log" 2>&1 </dev/null & echo $!'
    result = subprocess.run(["sh", "-c", script, "sh", str(log_file), *argv], env={**os.environ, **extra_env},
                            capture_output=True, text=True, start_new_session=True, check=True)
    pid = int(result.stdout.strip())
    for _ in range(50):
        info = _proc_stat(pid)
        if info is not None:
            return pid, info[1]
        time.sleep(0.01)
    raise ServerError(f"{argv[0]} exited immediately; see {log_file}")


def _stop_pid(entry: dict[str, Any], timeout_s: float = _STOP_TIMEOUT_S, *, kill: bool = False) -> None:
    """SIGTERM (wait up to ``timeout_s``, then SIGKILL), or with ``kill`` SIGKILL at once (a crash)."""
    if not _alive(entry):
        return
    pid = int(entry["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(entry):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while _alive(entry):
        time.sleep(0.05)


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port(avoid: set[int]) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            avoid.add(port)
            return port


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


# ---------------------------------------------------------------- servers


def _endpoints(state: dict[str, dict[str, Any]]) -> ServerEndpoints:
    return ServerEndpoints(
        mqtt_host=HOST,
        mqtt_port=int(state["mosquitto"]["ports"]["port"]),
        kafka_bootstrap=f"{HOST}:{state['kafka']['ports']['port']}",
        influx_url=f"https://{HOST}:{state['influxdb']['ports']['port']}",
        secrets_dir=str(state_dir()),
        kafka_controller=f"{HOST}:{state['kafka']['ports'].get('controller_port', 0)}",
    )


@contextlib.contextmanager
def _quiet_kafka_client() -> Iterator[None]:
    # aiokafka logs every refused connection at ERROR while the broker boots; that is expected here.
    logger = logging.getLogger("aiokafka")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


async def _probe(name: str, ports: dict[str, int]) -> None:
    port = int(ports["port"])
    if not _port_open(port):
        raise probes.ProbeFailed(f"{name} is not listening on {HOST}:{port} yet")
    if name == "mosquitto":
        user, password = mqtt_security.password_for(state_dir(), "probe")
        await asyncio.to_thread(probes.mqtt_round_trip, HOST, port, username=user, password=password,
                                ca_file=str(mqtt_security.ca_file(state_dir())))
    elif name == "kafka":
        with _quiet_kafka_client():
            await probes.kafka_round_trip(kafka_security.client_settings(state_dir(), f"{HOST}:{port}"))
    else:
        url = f"https://{HOST}:{port}"
        await probes.influx_ping(influx_security.client_settings(state_dir(), url, None))
        await influx_security.provision(state_dir(), url)  # the admin first, then the other users
        await probes.influx_round_trip(influx_security.client_settings(state_dir(), url))


async def _wait_healthy(name: str, entry: dict[str, Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        if not _alive(entry):
            raise ServerError(f"{name} exited while starting. Last lines of {entry['log']}:\n"
                              f"{_log_tail(Path(entry['log']))}")
        try:
            await _probe(name, entry["ports"])
            return
        except probes.ProbeFailed as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise ServerError(f"{name} did not answer a round trip within {timeout_s:.0f} s ({last}). "
                              f"Last lines of {entry['log']}:\n{_log_tail(Path(entry['log']))}")
        await asyncio.sleep(0.25)


def _choose_ports(name: str, previous: dict[str, int] | None, taken: set[int]) -> dict[str, int]:
    keys = {"mosquitto": ("port",), "kafka": ("port", "controller_port"), "influxdb": ("port", "rpc_port")}[name]
    # Keep the ports of a previous run when they are free, so clients configured before a restart reconnect.
    if previous and all(key in previous for key in keys) and all(_port_free(previous[k]) for k in keys):
        taken.update(previous[k] for k in keys)
        return {k: int(previous[k]) for k in keys}
    return {k: _free_port(taken) for k in keys}


def _start(name: str, paths: dict[str, str], ports: dict[str, int]) -> dict[str, Any]:
    root = state_dir() / name
    root.mkdir(parents=True, exist_ok=True)
    log_file = root / "server.log"
    if name == "mosquitto":
        launch = servers.prepare_mosquitto(root, paths["mosquitto"], ports["port"], state_dir())
    elif name == "influxdb":
        tls = influx_security.server_tls(state_dir())
        launch = servers.prepare_influxdb(root, paths["influxd"], ports["port"], ports["rpc_port"], auth=True,
                                          tls_cert=tls.cert, tls_key=tls.key)
    else:
        launch, format_cmd = servers.prepare_kafka(
            root, paths["java"], paths["kafka_libs"], ports["port"], ports["controller_port"],
            security=kafka_security.server_properties(state_dir(), ports["port"], ports["controller_port"]),
            format_args=kafka_security.format_args(state_dir()),
            formatted_as=kafka_security.formatted_marker(state_dir()))
        if format_cmd is not None:
            result = subprocess.run(format_cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise ServerError(f"formatting the Kafka log folder failed:\n{(result.stdout + result.stderr)[-3000:]}")
    with open(log_file, "a") as handle:
        handle.write(f"\n--- started by bpstream at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} ---\n")
    pid, ticks = _spawn(launch.argv, log_file, launch.env)
    return {"pid": pid, "start_ticks": ticks, "ports": launch.ports, "log": str(log_file),
            "argv": launch.argv, "started_at": time.time()}


def run_blocking(coro_factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion, also when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_loop = False
    else:
        in_loop = True
    if not in_loop:  # outside the except block, so errors of the coroutine carry no unrelated context
        return asyncio.run(coro_factory())
    box: dict[str, Any] = {}

    def worker() -> None:
        try:
            box["value"] = asyncio.run(coro_factory())
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=worker, name="bpstream-localservers")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    value: _T = box["value"]
    return value


async def _bring_up(name: str, state: dict[str, dict[str, Any]], paths: dict[str, str], taken: set[int],
                    report: dict[str, ServerStatus], timeout_s: float) -> None:
    began = time.monotonic()
    entry = state.get(name)
    expected = {"mosquitto": paths.get("mosquitto"), "influxdb": paths.get("influxd")}.get(name)
    if entry and _alive(entry) and expected and entry.get("argv", [expected])[0] != expected:
        # e.g. Debian's influxd left running by an older checkout: this one tests the version it builds
        log.warning("restarting %s: it runs %s, this checkout uses %s", name, entry["argv"][0], expected)
        await asyncio.to_thread(_stop_pid, entry)
    elif entry and _alive(entry):
        try:
            await _wait_healthy(name, entry, min(timeout_s, 30.0))
        except ServerError as exc:
            log.warning("restarting unhealthy %s: %s", name, exc)
            await asyncio.to_thread(_stop_pid, entry)
        else:
            report[name] = ServerStatus(name, entry["pid"], True, True, entry["ports"], "reused", entry["log"],
                                        time.monotonic() - began, reused=True)
            return
    ports = _choose_ports(name, entry["ports"] if entry else None, taken)
    entry = await asyncio.to_thread(_start, name, paths, ports)
    state[name] = entry
    _save_state(state)
    await _wait_healthy(name, entry, timeout_s)
    report[name] = ServerStatus(name, entry["pid"], True, True, entry["ports"], "started", entry["log"],
                                time.monotonic() - began)


def ensure_up_report(timeout_s: float = STARTUP_TIMEOUT_S) -> tuple[ServerEndpoints, list[ServerStatus]]:
    """Like ``ensure_up`` and also say, per server, whether it was reused or started and how long it took."""
    paths = install.ensure_installed()
    with _locked():
        state = _load_state()
        taken: set[int] = set()
        for entry in state.values():
            taken.update(int(p) for p in entry.get("ports", {}).values())
        report: dict[str, ServerStatus] = {}
        from bpstream.localservers import pki  # cryptography: not in the service images

        pki.ensure_ca(state_dir() / "pki")  # once, before the servers are prepared side by side

        async def all_up() -> None:
            results = await asyncio.gather(
                *(_bring_up(name, state, paths, taken, report, timeout_s) for name in SERVER_NAMES),
                return_exceptions=True,
            )
            errors = [exc for exc in results if isinstance(exc, BaseException)]
            if errors:
                raise ServerError("\n\n".join(str(exc) for exc in errors))

        try:
            run_blocking(all_up)
        finally:
            _save_state(state)
        return _endpoints(state), [report[name] for name in SERVER_NAMES]


def ensure_up(timeout_s: float = STARTUP_TIMEOUT_S) -> ServerEndpoints:
    """Install what is missing, reuse healthy servers, start the others; return where they listen.

    Raises ``ServerError`` (with the server's log tail) or ``install.InstallError`` when that fails.
    """
    return ensure_up_report(timeout_s)[0]


def endpoints() -> ServerEndpoints | None:
    """Endpoints from the state file without any check (None when the servers were never started)."""
    state = _load_state()
    if not all(name in state for name in SERVER_NAMES):
        return None
    return _endpoints(state)


def status() -> list[ServerStatus]:
    """Running and healthy (one real round trip) state of every server."""
    state = _load_state()

    async def check(name: str) -> ServerStatus:
        entry = state.get(name)
        if not entry:
            return ServerStatus(name, None, False, False, detail="never started")
        running = _alive(entry)
        healthy, detail = False, "not running"
        if running:
            try:
                await asyncio.wait_for(_probe(name, entry["ports"]), 15)
                healthy, detail = True, "answers"
            except (probes.ProbeFailed, TimeoutError) as exc:
                detail = str(exc) or "probe timed out"
        return ServerStatus(name, entry.get("pid"), running, healthy, entry.get("ports", {}), detail,
                            entry.get("log", ""))

    async def check_all() -> list[ServerStatus]:
        return list(await asyncio.gather(*(check(name) for name in SERVER_NAMES)))

    return run_blocking(check_all)


def restart(name: str, timeout_s: float = STARTUP_TIMEOUT_S, *, down_s: float = 0.0,
            kill: bool = False) -> ServerEndpoints:
    """Stop one server and start it again on the same ports (for fault-tolerance tests).

    ``down_s`` keeps it stopped that long before starting it again; ``kill`` stops it with SIGKILL (a crash:
    nothing flushed) instead of SIGTERM.
    """
    if name not in SERVER_NAMES:
        raise ValueError(f"unknown server {name!r}; choose one of {', '.join(SERVER_NAMES)}")
    paths = install.ensure_installed()
    with _locked():
        state = _load_state()
        entry = state.get(name)
        if entry is None:
            raise ServerError(f"{name} was never started; run `bpstream servers up` first")
        _stop_pid(entry, kill=kill)
        if down_s > 0:
            time.sleep(down_s)
        ports = dict(entry["ports"])
        new_entry = _start(name, paths, ports)
        state[name] = new_entry
        _save_state(state)

        async def wait() -> None:
            await _wait_healthy(name, new_entry, timeout_s)

        run_blocking(wait)
        if not all(n in state for n in SERVER_NAMES):
            raise ServerError("other servers are not started; run `bpstream servers up`")
        return _endpoints(state)


def stop(name: str, *, kill: bool = False) -> None:
    """Stop one server, keeping its ports and data (``restart`` or ``ensure_up`` starts it again); ``kill``
    sends SIGKILL (a crash) instead of SIGTERM."""
    with _locked():
        state = _load_state()
        if name in state:
            _stop_pid(state[name], kill=kill)


def down(wipe: bool = False) -> list[str]:
    """Stop every server started from this checkout; with ``wipe`` also delete their data."""
    stopped: list[str] = []
    with _locked():
        state = _load_state()
        running = [(name, state[name]) for name in SERVER_NAMES if name in state and _alive(state[name])]
        threads = [threading.Thread(target=_stop_pid, args=(entry,)) for _, entry in running]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stopped = [name for name, _ in running]
        if wipe:
            for name in SERVER_NAMES:
                shutil.rmtree(state_dir() / name, ignore_errors=True)
            state = {}
        else:
            for entry in state.values():
                entry["pid"] = None
        _save_state(state)
    return stopped
