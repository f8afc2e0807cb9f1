"""``bpstream servers up|down|status|restart|env``: the local Mosquitto, Kafka and InfluxDB servers."""

from __future__ import annotations

import contextlib
import shlex
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from bpstream.localservers import core, install

console = Console()


def _print_endpoints(endpoints: core.ServerEndpoints) -> None:
    console.print(f"MQTT      mqtts://{endpoints.mqtt_host}:{endpoints.mqtt_port}  (MQTT 5 and 3.1.1, TLS only, "
                  "per-account passwords and ACL; `bpstream devices`)")
    console.print(f"Kafka     {endpoints.kafka_bootstrap}  (Apache Kafka {install.KAFKA_VERSION}, KRaft, "
                  "SASL_SSL SCRAM-SHA-512, ACLs)")
    console.print(f"InfluxDB  {endpoints.influx_url}  (InfluxDB {install.INFLUXDB_VERSION}, v1 + v2 API, HTTPS, auth)")
    console.print(f"CA        {endpoints.ca_file}; credentials in {endpoints.secrets_dir} (mode 0600)")
    console.print("Environment for tools (passwords masked; eval \"$(bpstream servers env)\" sets them):")
    for key, value in endpoints.env().items():
        shown = "**********" if key.endswith("PASSWORD") else value
        console.print(f"  export {key}={shown}", highlight=False)


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}", highlight=False)
    return typer.Exit(1)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add the ``services`` group to the ``bpstream`` app."""
    group = typer.Typer(help="Local real servers (Mosquitto, Apache Kafka KRaft, InfluxDB 1.x) on 127.0.0.1.",
                        no_args_is_help=True)
    app.add_typer(group, name="servers")
    # The old name, for one release: `services` now means the pipeline's deployables.
    app.add_typer(group, name="services", hidden=True)

    @group.command("up")
    def up(timeout: float = typer.Option(core.STARTUP_TIMEOUT_S, help="Seconds to wait for each server.")) -> None:
        """Install what is missing, start the servers (reusing healthy ones) and wait for a real round trip."""
        began = time.monotonic()
        try:
            endpoints, report = core.ensure_up_report(timeout)
        except (core.ServerError, install.InstallError) as exc:
            raise _fail(exc) from exc
        for item in report:
            how = "reused" if item.reused else "started"
            console.print(f"{item.name:<10}{how} pid {item.pid}, answered after {item.started_s or 0:.1f} s")
        console.print(f"All servers answer ({time.monotonic() - began:.1f} s). Data and logs: {core.state_dir()}")
        _print_endpoints(endpoints)

    @group.command("down")
    def down(wipe: bool = typer.Option(False, help="Also delete the servers' data.")) -> None:
        """Stop the servers started from this checkout."""
        stopped = core.down(wipe=wipe)
        console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}"
                      + (" (data wiped)" if wipe else ""))

    @group.command("status")
    def status() -> None:
        """Show each server's PID, ports and whether it answers a round trip. Exit 1 if any does not."""
        table = Table("server", "pid", "port", "state", "log")
        table.columns[4].overflow = "fold"
        items = core.status()
        for item in items:
            state = "[green]healthy[/green]" if item.healthy else f"[red]{item.detail}[/red]"
            extra = ", ".join(f"{k.removesuffix('_port')} {v}" for k, v in item.ports.items() if k != "port")
            ports = f"{item.ports.get('port', '-')}" + (f" ({extra})" if extra else "")
            log_file = item.log_file
            with contextlib.suppress(ValueError):
                log_file = str(Path(log_file).relative_to(Path.cwd()))
            table.add_row(item.name, str(item.pid or "-"), ports, state, log_file)
        console.print(table)
        if not all(item.healthy for item in items):
            raise typer.Exit(1)

    @group.command("restart")
    def restart(name: str = typer.Argument(..., help="mosquitto, kafka or influxdb"),
                down_s: float = typer.Option(0.0, help="Seconds to stay down before starting again."),
                kill: bool = typer.Option(False, "--kill", help="Stop with SIGKILL (a crash), not SIGTERM.")) -> None:
        """Restart one server on the same ports (fault-tolerance tests)."""
        began = time.monotonic()
        try:
            core.restart(name, down_s=down_s, kill=kill)
        except (ValueError, core.ServerError, install.InstallError) as exc:
            raise _fail(exc) from exc
        console.print(f"{name} restarted and answers ({time.monotonic() - began:.1f} s)")

    @group.command("certs")
    def certs(out: Path = typer.Argument(..., help="Folder for ca.crt/ca.key and each server's certificate."),
              server: list[str] = typer.Option(["kafka", "influxdb"], "--server",
                                               help="A server (its name is also its host name)."),
              host: list[str] = typer.Option([], "--host", help="Another host name on every certificate.")) -> None:
        """Create a CA (once) and server certificates for a deployment (docker compose: deploy/pki)."""
        from bpstream.localservers import kafka_security, pki

        ca = pki.ensure_ca(out, name="bpstream deployment CA")
        for name in server:
            files = pki.issue(ca, name, hosts=(name, *host, *pki.LOOPBACK_HOSTS))
            if name == "kafka":  # Kafka's PEM key store: the key and the certificate in one file
                kafka_security.write_key_store(files, out / "kafka-keystore.pem")
            console.print(f"{name}: {files.cert} ({files.key}, mode 0600)")
        console.print(f"CA: {ca.cert} (its key {ca.key} signs new certificates: keep it off the servers)")

    @group.command("env")
    def env(service: str = typer.Option(None, help="a service's own accounts (bridge, processor, ..., "
                                                "simulator, cuff, observer); default: the tools' accounts")) -> None:
        """Print ``export BPSTREAM_...`` lines for the running servers (eval "$(bpstream servers env)")."""
        endpoints = core.endpoints()
        if endpoints is None:
            raise _fail(core.ServerError("servers were never started; run `bpstream servers up`"))
        for key, value in endpoints.env(service).items():
            typer.echo(f"export {key}={shlex.quote(value)}")
