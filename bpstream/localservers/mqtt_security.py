"""The local Mosquitto's security, as deployed: a TLS-only listener, no anonymous access, per-account passwords
and an ACL generated from the device registry (``bpstream.devices.registry``).

Files (all 0600) under ``state_dir()``: ``mqtt-accounts.json`` holds the service accounts' passwords (created
at the first ``servers up``, reused after), ``devices.json`` the device registry (password hashes only),
``mosquitto/auth/{passwd,acl}`` what the broker reads, ``pki/`` the local CA and the broker's certificate
(copied to ``mosquitto/certs/`` for the broker's user). ``bpstream devices`` rewrites the auth files and
sends the broker SIGHUP: Mosquitto reloads them and disconnects clients whose account is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from bpstream.devices.registry import (
    SERVICE_ACLS,
    Registry,
    hash_password,
    new_password,
    render_acl,
    render_passwd,
)
from bpstream.localservers.credentials import write_private

if TYPE_CHECKING:
    from bpstream.localservers import pki

#: As deployed (deploy/mosquitto/mosquitto.conf): larger PUBLISH packets are refused by the broker.
MESSAGE_SIZE_LIMIT = 262144
#: Which account each process uses (ServerEndpoints.env / mqtt_settings); None: a tool (calibrate).
SERVICE_ACCOUNTS = {"bridge": "bpstream-bridge", "simulator": "bpstream-simulator", "cuff": "bpstream-cuff",
                    "probe": "bpstream-probe", "observer": "bpstream-observer", None: "bpstream-cuff"}


def accounts_file(state: Path) -> Path:
    return state / "mqtt-accounts.json"


def registry_file(state: Path) -> Path:
    return state / "devices.json"


def auth_dir(state: Path) -> Path:
    return state / "mosquitto" / "auth"


def ca_file(state: Path) -> Path:
    return state / "pki" / "ca.crt"


def service_passwords(state: Path) -> dict[str, str]:
    """The service accounts' passwords, created (random) the first time and reused afterwards."""
    path = accounts_file(state)
    try:
        accounts: dict[str, str] = json.loads(path.read_text())["services"]
    except (OSError, ValueError, KeyError):
        accounts = {}
    missing = [user for user in SERVICE_ACLS if user not in accounts]
    if missing:
        accounts.update({user: new_password() for user in missing})
        write_private(path, json.dumps({"services": accounts}, indent=1) + "\n")
    return accounts


def password_for(state: Path, service: str | None) -> tuple[str, str]:
    """(user name, password) of the account ``service`` uses (see ``SERVICE_ACCOUNTS``)."""
    user = SERVICE_ACCOUNTS[service]
    return user, service_passwords(state)[user]


@contextlib.contextmanager
def registry_locked(state: Path) -> Iterator[Registry]:
    """The device registry, locked against concurrent ``bpstream devices`` runs; saved on a clean exit."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / ".devices.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = registry_file(state)
        registry = Registry.from_json(path.read_text()) if path.exists() else Registry()
        yield registry
        write_private(path, registry.to_json())


def load_registry(state: Path) -> Registry:
    path = registry_file(state)
    return Registry.from_json(path.read_text()) if path.exists() else Registry()


def _owner(path: Path) -> tuple[int, int] | None:
    """The broker's user owns its folder (see servers.prepare_mosquitto): its files must be readable to it."""
    if os.geteuid() != 0:
        return None
    info = path.stat()
    return info.st_uid, info.st_gid


def write_auth_files(state: Path, registry: Registry | None = None) -> tuple[Path, Path]:
    """(Re)write the broker's password file and ACL from the service accounts and the registry."""
    folder = auth_dir(state)
    folder.mkdir(parents=True, exist_ok=True)
    owner = _owner(folder.parent)
    if owner is not None:
        os.chown(folder, *owner)
    os.chmod(folder, 0o700)
    registry = registry if registry is not None else load_registry(state)
    hashes = {user: hash_password(password) for user, password in service_passwords(state).items()}
    passwd, acl = folder / "passwd", folder / "acl"
    write_private(passwd, render_passwd(hashes, registry), owner=owner)
    write_private(acl, render_acl(registry), owner=owner)
    return passwd, acl


def broker_certificate(state: Path, root: Path) -> pki.TlsFiles:
    """The broker's server certificate from the local CA, copied where the broker's user can read it."""
    from bpstream.localservers import pki  # here: `cryptography` is not in the services' images
    ca = pki.ensure_ca(state / "pki")
    issued = pki.issue(ca, "mosquitto")
    certs = root / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    owner = _owner(root)
    files = pki.TlsFiles(certs / "ca.crt", certs / "mosquitto.crt", certs / "mosquitto.key")
    for source, target in ((issued.ca, files.ca), (issued.cert, files.cert), (issued.key, files.key)):
        shutil.copyfile(source, target)
        os.chmod(target, 0o600 if target == files.key else 0o644)
        if owner is not None:
            os.chown(target, *owner)
    if owner is not None:
        os.chown(certs, *owner)
    return files


def security_lines(state: Path, root: Path, port: int) -> list[str]:
    """The mosquitto.conf lines of the secured listener (TLS only, passwords, ACL, size limit)."""
    tls = broker_certificate(state, root)
    passwd, acl = write_auth_files(state)
    return [
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {passwd}",
        f"acl_file {acl}",
        f"message_size_limit {MESSAGE_SIZE_LIMIT}",
        f"listener {port} 127.0.0.1",
        "protocol mqtt",
        f"cafile {tls.ca}",
        f"certfile {tls.cert}",
        f"keyfile {tls.key}",
        "tls_version tlsv1.2",
    ]
