"""What a device keeps on disk: its profile, tokens, master key and upload journal.

Everything lives under one directory (``TESSERA_CONFIG_DIR``, else the
platform's user config dir) with mode 0700; every file is written atomically
with mode 0600. The master key is stored here so commands need not ask for the
password each time, as an SSH key without a passphrase is: whoever can read
this directory can read the user's files (docs/security.md).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import platformdirs


class NotLoggedIn(Exception):
    """No profile on this device: run ``tessera login`` first."""


def default_dir() -> Path:
    override = os.environ.get("TESSERA_CONFIG_DIR")
    return Path(override) if override else Path(platformdirs.user_config_dir("tessera"))


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(slots=True)
class Profile:
    server: str  # http(s)://host:port
    username: str
    device: str
    user: int = 0


class State:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_dir()

    # ------------------------------------------------------------- profile

    def _json(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / name).read_text())
        except FileNotFoundError:
            return None

    def _write_json(self, name: str, value: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        write_private(self.root / name, json.dumps(value, indent=2).encode())

    def profile(self) -> Profile:
        data = self._json("profile.json")
        if data is None:
            raise NotLoggedIn("not logged in on this device (run: tessera login)")
        return Profile(**data)

    def save_profile(self, profile: Profile) -> None:
        self._write_json("profile.json", asdict(profile))

    def device_id(self) -> str:
        """Chosen once per installation and kept across logins."""
        data = self._json("device.json")
        if data is None:
            host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_")[:40]
            data = {"device": f"{host or 'device'}-{secrets.token_hex(4)}"}
            self._write_json("device.json", data)
        return str(data["device"])

    # -------------------------------------------------------------- tokens

    def tokens(self) -> dict[str, Any]:
        data = self._json("tokens.json")
        if data is None:
            raise NotLoggedIn("not logged in on this device (run: tessera login)")
        return data

    def save_tokens(self, tokens: dict[str, Any]) -> None:
        self._write_json("tokens.json", tokens)

    # ---------------------------------------------------------------- keys

    def master_key(self) -> bytes:
        try:
            return (self.root / "master.key").read_bytes()
        except FileNotFoundError:
            raise NotLoggedIn("no master key on this device (run: tessera login)") from None

    def save_master_key(self, key: bytes) -> None:
        write_private(self.root / "master.key", key)

    def forget(self) -> None:
        for name in ("tokens.json", "master.key", "profile.json"):
            (self.root / name).unlink(missing_ok=True)

    # -------------------------------------------------------- upload journal

    @property
    def journal_dir(self) -> Path:
        return self.root / "uploads"

    def journal(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.journal_dir / f"{key}.json").read_text())
        except FileNotFoundError:
            return None

    def save_journal(self, key: str, entry: dict[str, Any]) -> None:
        self.journal_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(self.journal_dir / f"{key}.json", json.dumps(entry).encode())

    def drop_journal(self, key: str) -> None:
        (self.journal_dir / f"{key}.json").unlink(missing_ok=True)
