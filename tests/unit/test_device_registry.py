"""The device registry's pure parts: Mosquitto-compatible password hashes, the password file and the ACL."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from bpstream.devices.registry import (
    SERVICE_ACLS,
    Registry,
    RegistryError,
    device_acl,
    hash_password,
    render_acl,
    render_passwd,
    verify_password,
)
from bpstream.localservers.credentials import write_private

# Written by Debian's `mosquitto_passwd -b file u1 secret` (Mosquitto 2.0.11).
MOSQUITTO_PASSWD_LINE = ("u1:$7$101$66Qda8am0PGDf+Gx$gv8+gXYkC/la3Iq5f6h+Q/gf8IpS9ZI+GPRiPdYqADZgZSuZkGvhUcgzcbBRnkuI"
                         "VxTIBo5xKVKyzWoJ99Gr3g==")


def test_hashes_are_mosquitto_passwd_compatible() -> None:
    hashed = MOSQUITTO_PASSWD_LINE.split(":", 1)[1]
    assert verify_password("secret", hashed)
    assert not verify_password("Secret", hashed)
    ours = hash_password("secret")
    assert ours.startswith("$7$101$") and verify_password("secret", ours) and ours != hashed  # fresh salt


def test_add_revoke_rotate_and_readmit() -> None:
    reg = Registry()
    first = reg.add("clinic-a", "dev-1", now=1.0)
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("clinic-a", "dev-1", now=2.0)
    rotated = reg.add("clinic-a", "dev-1", now=3.0, rotate=True)
    assert rotated != first and verify_password(rotated, reg.get("clinic-a", "dev-1").password_hash)
    assert not verify_password(first, reg.get("clinic-a", "dev-1").password_hash)
    reg.add("clinic-b", "dev-1", now=4.0)  # the same device id in another clinic is another device
    assert [d.username for d in reg.active()] == ["clinic-a/dev-1", "clinic-b/dev-1"]
    revoked = reg.revoke("clinic-a", "dev-1", now=5.0)
    assert revoked.revoked_at == 5.0 and [d.username for d in reg.active()] == ["clinic-b/dev-1"]
    assert [d.active for d in reg.listing()] == [False, True]  # revoked devices stay listed
    reg.add("clinic-a", "dev-1", now=6.0)  # re-admitted with a new password
    assert len(reg.active()) == 2
    with pytest.raises(RegistryError, match="no device"):
        reg.revoke("clinic-a", "nope", now=7.0)
    for clinic, device in (("clinic/a", "d"), ("c", "+"), ("c", "#"), ("", "d")):
        with pytest.raises(RegistryError, match="must match"):
            reg.add(clinic, device, now=8.0)


def test_registry_round_trips_through_json_without_passwords() -> None:
    reg = Registry()
    secret = reg.add("clinic-a", "dev-1", now=1.0)
    reg.add("clinic-a", "dev-2", now=2.0)
    reg.revoke("clinic-a", "dev-2", now=3.0)
    text = reg.to_json()
    assert secret not in text
    assert Registry.from_json(text) == reg


def test_acl_pins_each_device_to_its_own_clinic_and_id() -> None:
    reg = Registry()
    reg.add("clinic-a", "dev-1", now=1.0)
    reg.add("clinic-b", "dev-1", now=1.0)
    reg.add("clinic-a", "gone", now=1.0)
    reg.revoke("clinic-a", "gone", now=2.0)
    acl = render_acl(reg)
    lines = [line for line in acl.splitlines() if line and not line.startswith("#")]
    assert not [line for line in lines if line.startswith("pattern")]  # nothing applies to every account
    block = lines[lines.index("user clinic-a/dev-1") + 1: lines.index("user clinic-a/dev-1") + 4]
    assert block == ["topic write bpstream/clinic-a/dev-1/signals", "topic readwrite bpstream/clinic-a/dev-1/status",
                     "topic write bpstream/clinic-a/dev-1/cuff"]
    assert "user clinic-b/dev-1" in lines and "user clinic-a/gone" not in lines
    device_topics = [line for line in lines if line.startswith("topic") and "clinic-" in line]
    assert all("+" not in line and "#" not in line for line in device_topics)  # no wildcard for a device
    for user in SERVICE_ACLS:
        assert f"user {user}" in lines
    assert device_acl("c", "d")[0] == "user c/d"


def test_password_file_lists_services_and_active_devices_only() -> None:
    reg = Registry()
    reg.add("clinic-a", "dev-1", now=1.0)
    reg.add("clinic-a", "dev-2", now=1.0)
    reg.revoke("clinic-a", "dev-2", now=2.0)
    text = render_passwd({"bpstream-bridge": hash_password("x")}, reg)
    users = [line.split(":", 1)[0] for line in text.splitlines()]
    assert users == ["bpstream-bridge", "clinic-a/dev-1"]


def test_private_files_are_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "secret"
    write_private(path, "x\n")
    write_private(path, "y\n")
    assert path.read_text() == "y\n" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_devices_cli_against_a_registry_folder_writes_fragments_and_no_password(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bpstream.cli import app

    runner = CliRunner()
    state = tmp_path / "registry"
    added = runner.invoke(app, ["devices", "add", "--clinic", "c1", "--device", "d1", "--state", str(state),
                                "--no-reload"])
    assert added.exit_code == 0, added.output
    secret = added.output.split("password: ")[1].split()[0]
    again = runner.invoke(app, ["devices", "add", "--clinic", "c1", "--device", "d1", "--state", str(state)])
    assert again.exit_code == 2  # already registered
    secret_file = tmp_path / "d2.pw"
    second = runner.invoke(app, ["devices", "add", "--clinic", "c1", "--device", "d2", "--state", str(state),
                                 "--password-file", str(secret_file)])
    assert second.exit_code == 0 and stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert secret_file.read_text().strip() not in second.output
    for name in ("devices.json", "devices.passwd", "devices.acl"):
        text = (state / name).read_text()
        assert secret not in text and stat.S_IMODE((state / name).stat().st_mode) == 0o600
    passwd = (state / "devices.passwd").read_text()
    assert [line.split(":")[0] for line in passwd.splitlines()] == ["c1/d1", "c1/d2"]
    assert verify_password(secret, passwd.splitlines()[0].split(":", 1)[1])
    assert runner.invoke(app, ["devices", "revoke", "--clinic", "c1", "--device", "d1", "--state", str(state)]
                         ).exit_code == 0
    assert "user c1/d1" not in (state / "devices.acl").read_text()
    listing = runner.invoke(app, ["devices", "list", "--state", str(state)]).output
    assert "c1\td1\t" in listing and "revoked" in listing and "c1\td2\t" in listing
    assert not (state / "mqtt-accounts.json").exists()  # no local service accounts in a deployment's registry


def test_a_gateway_account_may_write_only_its_own_batch_topic(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bpstream.cli import app

    runner = CliRunner()
    state = tmp_path / "registry"
    added = runner.invoke(app, ["devices", "add", "--clinic", "c1", "--gateway", "gw1", "--state", str(state),
                                "--no-reload"])
    assert added.exit_code == 0, added.output
    assert "username: c1/gateway/gw1" in added.output
    both = runner.invoke(app, ["devices", "add", "--clinic", "c1", "--device", "d", "--gateway", "g",
                               "--state", str(state), "--no-reload"])
    assert both.exit_code == 2  # exactly one of --device and --gateway
    # a device named like the gateway is another account
    assert runner.invoke(app, ["devices", "add", "--clinic", "c1", "--device", "gw1", "--state", str(state),
                               "--no-reload"]).exit_code == 0
    acl = [line for line in (state / "devices.acl").read_text().splitlines() if line]
    at = acl.index("user c1/gateway/gw1")
    assert acl[at + 1: at + 3] == ["topic write bpstream/c1/gateway/gw1/batch",
                                   "topic readwrite bpstream/c1/gateway/gw1/status"]
    assert "user c1/gw1" in acl
    users = [line.split(":")[0] for line in (state / "devices.passwd").read_text().splitlines()]
    assert users == ["c1/gateway/gw1", "c1/gw1"]
    assert runner.invoke(app, ["devices", "revoke", "--clinic", "c1", "--gateway", "gw1", "--state", str(state),
                               "--no-reload"]).exit_code == 0
    assert "user c1/gateway/gw1" not in (state / "devices.acl").read_text()
    # the bridge reads every gateway's batches; the simulator (tests, demo) may publish them
    assert "topic read bpstream/+/gateway/+/batch" in SERVICE_ACLS["bpstream-bridge"]
    assert "topic write bpstream/+/gateway/+/batch" in SERVICE_ACLS["bpstream-simulator"]
    with pytest.raises(RegistryError):
        Registry().add("c1", "gateway/bad id", now=1.0)
