"""Generated credentials of the local servers: private files (mode 0600) and passwords created once."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path


def write_private(path: Path, text: str, *, owner: tuple[int, int] | None = None) -> None:
    """Write ``text`` atomically to ``path`` with mode 0600 (and ``owner``, for a broker's user)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(tmp, 0o600)
    if owner is not None:
        os.chown(tmp, *owner)
    tmp.replace(path)


def stored_passwords(path: Path, names: Iterable[str]) -> dict[str, str]:
    """Every user of ``names`` with its password: random the first time, kept in ``path`` (JSON, mode 0600)
    and reused afterwards (a user added later gets a password; the others keep theirs)."""
    try:
        known: dict[str, str] = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    wanted = tuple(names)
    if all(name in known for name in wanted):
        return known
    known = {name: known.get(name) or secrets.token_urlsafe(24) for name in wanted}
    write_private(path, json.dumps(known, indent=2, sort_keys=True) + "\n")
    return known
