"""``bpstream devices add|revoke|list``: per-device MQTT credentials in the broker's auth, no broker restart.

The registry (``devices.json``, password hashes only) is the source of truth; each change rewrites the broker's
``password_file`` and ``acl_file`` and sends the broker SIGHUP: Mosquitto reloads both and disconnects
connected clients whose account is gone, so a revoked device is cut off at once. Against the local servers
(default) everything is found under ``state_dir()``; against a deployed broker, point ``--state`` at a folder
holding the registry, ``mqtt-accounts.json`` and ``mosquitto/auth/`` (the broker's auth volume) and reload the
broker yourself (``--no-reload``; docs/SECURITY.md).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import typer

from bpstream.devices.registry import RegistryError, gateway_key, render_acl, render_passwd
from bpstream.localservers.credentials import write_private

devices = typer.Typer(help="Per-device MQTT credentials: add, revoke, list (applied without a broker restart).",
                      no_args_is_help=True)


def _state(state: Path | None) -> Path:
    from bpstream.localservers.core import state_dir

    return state.resolve() if state else state_dir()


def reload_broker(state: Path) -> int | None:
    """SIGHUP the local Mosquitto started from ``state`` (its PID from the servers' state file); its PID."""
    from bpstream.localservers.core import _alive, _load_state, state_dir

    if state != state_dir():
        return None
    entry = _load_state().get("mosquitto")
    if not entry or not _alive(entry):
        return None
    os.kill(int(entry["pid"]), signal.SIGHUP)
    return int(entry["pid"])


def apply(state: Path, *, reload: bool = True) -> int | None:
    """Write the registry's fragments (``devices.passwd``, ``devices.acl``: what a deployed broker's auth is
    assembled from, see docs/SECURITY.md); for the local servers also rewrite the broker's auth files and
    reload it (SIGHUP). Returns the PID reloaded, if any."""
    from bpstream.localservers import mqtt_security
    from bpstream.localservers.core import state_dir

    registry = mqtt_security.load_registry(state)
    write_private(state / "devices.passwd", render_passwd({}, registry))
    write_private(state / "devices.acl", render_acl(registry, services={}))
    if state != state_dir():
        return None
    mqtt_security.write_auth_files(state, registry)
    return reload_broker(state) if reload else None


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def _device_or_gateway(device: str | None, gateway: str | None) -> str:
    """The registry key: the device id, or ``gateway/<id>`` for a gateway (exactly one must be given)."""
    if (device is None) == (gateway is None):
        raise _fail("give exactly one of --device and --gateway")
    return device if device is not None else gateway_key(gateway or "")


STATE_OPTION = typer.Option(None, help="Folder with the registry and the broker's auth files "
                                       "(default: the local servers' state).")


@devices.command("add")
def add(clinic: str = typer.Option(..., help="Clinic id."), device: str = typer.Option(None, help="Device id."),
        gateway: str = typer.Option(None, help="Register a clinic gateway instead of a device: MQTT user "
                                               "CLINIC/gateway/GATEWAY, allowed bpstream/CLINIC/gateway/GATEWAY/"
                                               "{batch,status} (batches of this clinic's devices only)."),
        password_file: Path = typer.Option(None, help="Write the password to this new file (mode 0600) instead "
                                                      "of printing it."),
        rotate: bool = typer.Option(False, help="Give an active device a new password."),
        state: Path = STATE_OPTION,
        reload: bool = typer.Option(True, help="SIGHUP the local broker so the change applies at once.")) -> None:
    """Register a device: its MQTT user is CLINIC/DEVICE, allowed bpstream/CLINIC/DEVICE/{signals,status,cuff}."""
    from bpstream.localservers import mqtt_security

    device = _device_or_gateway(device, gateway)
    folder = _state(state)
    if password_file is not None and password_file.exists():
        raise _fail(f"{password_file} exists; choose a new file")
    try:
        with mqtt_security.registry_locked(folder) as registry:
            secret = registry.add(clinic, device, now=time.time(), rotate=rotate)
            username = registry.get(clinic, device).username
    except RegistryError as exc:
        raise _fail(str(exc)) from exc
    apply(folder, reload=reload)
    if password_file is not None:
        write_private(password_file, secret + "\n")
        typer.echo(f"added {username}; password written to {password_file} (shown nowhere else)")
    else:
        typer.echo(f"added {username}\nusername: {username}\npassword: {secret}\n"
                   "(printed once: the registry keeps only its hash)")


@devices.command("revoke")
def revoke(clinic: str = typer.Option(...), device: str = typer.Option(None), gateway: str = typer.Option(None),
           state: Path = STATE_OPTION,
           reload: bool = typer.Option(True, help="SIGHUP the local broker so the change applies at once.")) -> None:
    """Revoke a device: its account leaves the broker's password file and ACL; a connected device is cut off."""
    from bpstream.localservers import mqtt_security

    device = _device_or_gateway(device, gateway)
    folder = _state(state)
    try:
        with mqtt_security.registry_locked(folder) as registry:
            record = registry.revoke(clinic, device, now=time.time())
    except RegistryError as exc:
        raise _fail(str(exc)) from exc
    apply(folder, reload=reload)
    typer.echo(f"revoked {record.username}")


@devices.command("list")
def list_cmd(clinic: str = typer.Option(None, help="Only this clinic."), state: Path = STATE_OPTION) -> None:
    """Registered devices with their state (active or revoked, and when)."""
    from bpstream.localservers import mqtt_security

    def when(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    for record in mqtt_security.load_registry(_state(state)).listing(clinic):
        status = "active" if record.active else f"revoked {when(record.revoked_at or 0)}"
        typer.echo(f"{record.clinic}\t{record.device}\tadded {when(record.added_at)}\t{status}")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add the ``devices`` group to the ``bpstream`` app."""
    app.add_typer(devices, name="devices")
