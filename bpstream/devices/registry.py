"""Devices and service accounts as the broker knows them: password hashes, the password file and the ACL.

Pure (no broker): :func:`hash_password` writes Mosquitto's ``$7$`` PBKDF2-SHA512 hashes (what
``mosquitto_passwd`` writes), :func:`render_passwd` and :func:`render_acl` turn the registry into Mosquitto's
``password_file`` and ``acl_file``. A device's MQTT user name is ``<clinic>/<device>``: unique across clinics,
and pinned by its own ``user`` block to ``bpstream/<clinic>/<device>/...`` (Mosquitto does not substitute ``%u``
for names containing '/', so no ``pattern`` line can widen it).

>>> reg = Registry()
>>> secret = reg.add("clinic-a", "dev-1", now=0.0)
>>> [d.username for d in reg.active()]
['clinic-a/dev-1']
>>> "topic write bpstream/clinic-a/dev-1/signals" in render_acl(reg)
True
>>> verify_password(secret, reg.get("clinic-a", "dev-1").password_hash)
True
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

from bpstream.shared.topics import ID_PATTERN

ITERATIONS = 101  # mosquitto_passwd's default for $7$ (Mosquitto 2.0)
_SALT_BYTES = 12

#: Service accounts: user name -> ACL lines. The simulator account is for tests and the demo only (it may
#: publish for any device); a deployment provisions bridge and cuff accounts and one account per device.
SERVICE_ACLS: Mapping[str, tuple[str, ...]] = {
    # Bridges read every device's signals, status and cuff readings through MQTT 5 shared subscriptions
    # ($share/<group>/...; Mosquitto checks the filter without the $share prefix).
    "bpstream-bridge": ("topic read bpstream/+/+/signals", "topic read bpstream/+/+/status",
                        "topic read bpstream/+/+/cuff", "topic read bpstream/+/gateway/+/batch"),
    # A clinic's cuff station or a clinician's `bpstream calibrate`: cuff readings for any device, nothing else.
    "bpstream-cuff": ("topic write bpstream/+/+/cuff",),
    # Test and demo only: the fleet simulator publishes for every simulated device with one account.
    "bpstream-simulator": ("topic write bpstream/+/+/signals", "topic readwrite bpstream/+/+/status",
                           "topic write bpstream/+/+/cuff", "topic write bpstream/+/gateway/+/batch"),
    # Local servers only: the health probe's round trip, and tests that watch what devices publish.
    "bpstream-probe": ("topic readwrite bpstream-probe/#",),
    "bpstream-observer": ("topic read bpstream/#",),
}


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """Mosquitto's ``$7$<iterations>$<salt>$<hash>`` (PBKDF2-HMAC-SHA512), as ``mosquitto_passwd`` writes."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
    except ValueError:
        return False
    if kind != "7":
        return False
    expected = hash_password(password, salt=base64.b64decode(salt), iterations=int(iterations))
    return hmac.compare_digest(expected.rsplit("$", 1)[1], digest)


def new_password() -> str:
    return secrets.token_urlsafe(24)


def device_username(clinic_id: str, device_id: str) -> str:
    return f"{clinic_id}/{device_id}"


#: Registry key of a gateway: ``(clinic, "gateway/<id>")`` (a device id never holds a slash, so keys and MQTT
#: user names ``<clinic>/gateway/<id>`` never collide with a device's).
GATEWAY_PREFIX = "gateway/"


def gateway_key(gateway_id: str) -> str:
    return f"{GATEWAY_PREFIX}{gateway_id}"


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One device's entry: who it is, its password hash (never the password), when it was added or revoked."""

    clinic: str
    device: str
    password_hash: str
    added_at: float
    revoked_at: float | None = None

    @property
    def username(self) -> str:
        return device_username(self.clinic, self.device)

    @property
    def is_gateway(self) -> bool:
        return self.device.startswith(GATEWAY_PREFIX)

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class RegistryError(ValueError):
    """An add, revoke or lookup that the registry refuses (bad id, already active, unknown device)."""


def _check_ids(clinic_id: str, device_id: str) -> None:
    if device_id.startswith(GATEWAY_PREFIX):  # a gateway's key: check its id
        device_id = device_id[len(GATEWAY_PREFIX):]
    for value, what in ((clinic_id, "clinic"), (device_id, "device")):
        if not ID_PATTERN.match(value):
            raise RegistryError(f"{what} id {value!r} must match {ID_PATTERN.pattern}")


@dataclass(slots=True)
class Registry:
    """Devices by ``(clinic, device)``; revoked devices stay listed (with their revocation time)."""

    devices: dict[tuple[str, str], DeviceRecord] = field(default_factory=dict)

    def get(self, clinic_id: str, device_id: str) -> DeviceRecord:
        try:
            return self.devices[(clinic_id, device_id)]
        except KeyError:
            raise RegistryError(f"no device {clinic_id}/{device_id} in the registry") from None

    def add(self, clinic_id: str, device_id: str, *, now: float, rotate: bool = False) -> str:
        """Register (or re-admit a revoked) device with a fresh password, returned once; ``rotate`` replaces
        an active device's password."""
        _check_ids(clinic_id, device_id)
        existing = self.devices.get((clinic_id, device_id))
        if existing is not None and existing.active and not rotate:
            raise RegistryError(f"device {clinic_id}/{device_id} is already registered (use --rotate for a new "
                                "password)")
        password = new_password()
        self.devices[(clinic_id, device_id)] = DeviceRecord(clinic_id, device_id, hash_password(password), now)
        return password

    def revoke(self, clinic_id: str, device_id: str, *, now: float) -> DeviceRecord:
        record = self.get(clinic_id, device_id)
        if record.active:
            record = self.devices[(clinic_id, device_id)] = replace(record, revoked_at=now)
        return record

    def active(self) -> list[DeviceRecord]:
        return sorted((d for d in self.devices.values() if d.active), key=lambda d: (d.clinic, d.device))

    def listing(self, clinic_id: str | None = None) -> list[DeviceRecord]:
        return sorted((d for d in self.devices.values() if clinic_id in (None, d.clinic)),
                      key=lambda d: (d.clinic, d.device))

    def to_json(self) -> str:
        return json.dumps({"version": 1, "devices": [asdict(d) for d in self.listing()]}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Registry:
        data = json.loads(text)
        records = [DeviceRecord(**item) for item in data.get("devices", [])]
        return cls({(r.clinic, r.device): r for r in records})


def render_passwd(service_hashes: Mapping[str, str], registry: Registry) -> str:
    """Mosquitto's ``password_file``: the service accounts and every active device."""
    lines = [f"{user}:{hashed}" for user, hashed in sorted(service_hashes.items())]
    lines += [f"{d.username}:{d.password_hash}" for d in registry.active()]
    return "\n".join(lines) + "\n"


def device_acl(clinic_id: str, device_id: str) -> list[str]:
    """A device's ACL block: its own signals and cuff topics (write) and status (its last will, read-write)."""
    _check_ids(clinic_id, device_id)
    base = f"bpstream/{clinic_id}/{device_id}"
    return [f"user {device_username(clinic_id, device_id)}", f"topic write {base}/signals",
            f"topic readwrite {base}/status", f"topic write {base}/cuff"]


def gateway_acl(clinic_id: str, gateway_id: str) -> list[str]:
    """A clinic gateway's ACL block: batches on its own topic only (write) and its status. The bridge checks
    that every chunk of a batch belongs to the topic's clinic, so the ACL pins the gateway to its clinic."""
    _check_ids(clinic_id, gateway_id)
    base = f"bpstream/{clinic_id}/gateway/{gateway_id}"
    return [f"user {device_username(clinic_id, gateway_key(gateway_id))}", f"topic write {base}/batch",
            f"topic readwrite {base}/status"]


def render_acl(registry: Registry, services: Mapping[str, tuple[str, ...]] = SERVICE_ACLS) -> str:
    """Mosquitto's ``acl_file``: no ``pattern`` lines, one ``user`` block per service account and device."""
    out = ["# Generated by `bpstream devices` from the device registry: edit the registry, not this file.",
           "# No pattern lines: each account may use only the topics listed under its own user block.", ""]
    for user, lines in services.items():
        out += [f"user {user}", *lines, ""]
    for record in registry.active():
        if record.is_gateway:
            out += [*gateway_acl(record.clinic, record.device[len(GATEWAY_PREFIX):]), ""]
        else:
            out += [*device_acl(record.clinic, record.device), ""]
    return "\n".join(out)


