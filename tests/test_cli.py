"""The ``tessera`` command as a user runs it: real subprocesses against a real server.

Every device is its own config directory (``TESSERA_CONFIG_DIR``); the
password comes from ``TESSERA_PASSWORD`` (or ``--password-stdin``), Argon2id is
made cheap with the test-only ``TESSERA_KDF_FAST=1``, and partitions are 64 KiB
(``TESSERA_PART_SIZE``) so small files still have many parts.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from client.sdk import Tessera
from client.state import State
from server.keys import staging_prefix
from tests.conftest import unique
from tests.support.s3 import free_port

PASSWORD = "correct horse battery staple"
PART = 65536


def tessera_command() -> list[str]:
    script = Path(sys.executable).with_name("tessera")
    return [str(script)] if script.exists() else [sys.executable, "-m", "client.cli"]


@dataclass
class Device:
    """One installation of the client: a config dir and a working directory."""

    server: str
    config: Path
    cwd: Path
    password: str = PASSWORD
    part_size: int = PART
    outputs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)

    def env(self, **extra: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
        env.update(
            TESSERA_SERVER=self.server,
            TESSERA_CONFIG_DIR=str(self.config),
            TESSERA_PASSWORD=self.password,
            TESSERA_KDF_FAST="1",
            TESSERA_PART_SIZE=str(self.part_size),
            PYTHONUNBUFFERED="1",
        )
        for key, value in extra.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def run(
        self,
        *args: str,
        ok: bool = True,
        stdin: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*tessera_command(), *args],
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            env=env or self.env(),
            cwd=cwd or self.cwd,
            timeout=timeout,
        )
        self.outputs += [proc.stdout, proc.stderr]
        if ok:
            assert proc.returncode == 0, (
                f"tessera {' '.join(args)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*tessera_command(), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
            cwd=self.cwd,
        )

    @property
    def profile(self) -> dict[str, Any]:
        return json.loads((self.config / "profile.json").read_text())

    @property
    def tokens(self) -> dict[str, Any]:
        return json.loads((self.config / "tokens.json").read_text())

    @property
    def device_id(self) -> str:
        return str(json.loads((self.config / "device.json").read_text())["device"])

    def sdk(self) -> Tessera:
        return Tessera(State(self.config))


def failure(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """Assert a one-line ``tessera: error:`` failure and return that line."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tessera: error: "), lines[0]
    return lines[0]


def pair(server_url: str, tmp_path: Path) -> tuple[Device, Device, str]:
    """A fresh user registered on device A and logged in on device B."""
    username = unique("cli")
    a = Device(server_url, tmp_path / "cfg-a", tmp_path / "a")
    b = Device(server_url, tmp_path / "cfg-b", tmp_path / "b")
    out = a.run("register", username).stdout
    assert f"registered {username}" in out
    # B reads the password from stdin instead of the environment.
    out = b.run(
        "login",
        username,
        "--password-stdin",
        stdin=PASSWORD + "\n",
        env=b.env(TESSERA_PASSWORD=None),
    ).stdout
    assert f"logged in as {username}" in out
    return a, b, username


def write(path: Path, data: bytes, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


# ------------------------------------------------------------------ round trip


async def test_two_devices_push_ls_pull_rm(make_server, store_kind, tmp_path):
    """The whole life of a tree of files between two devices (S3 too: REST pulls
    then follow the presigned redirect)."""
    server = make_server(store_kind)
    a, b, username = pair(server.http, tmp_path)

    # Both config dirs are private and hold the same master key.
    for dev in (a, b):
        assert stat.S_IMODE(dev.config.stat().st_mode) == 0o700
        for name in ("profile.json", "tokens.json", "master.key", "device.json"):
            assert stat.S_IMODE((dev.config / name).stat().st_mode) == 0o600, name
    assert len((a.config / "master.key").read_bytes()) == 32
    assert (a.config / "master.key").read_bytes() == (b.config / "master.key").read_bytes()
    assert a.device_id != b.device_id
    tokens_seen = [a.tokens, b.tokens]

    files = {
        "tree/empty.txt": b"",
        "tree/one.bin": b"x",
        "tree/exact.bin": os.urandom(PART),  # exactly one partition
        "tree/many.bin": os.urandom(1_000_003),  # 16 partitions, the last one short
        "tree/résumé/ñandú 日本.txt": "¡hola, 世界!\n".encode() * 1000,
    }
    for i, (name, data) in enumerate(files.items()):
        write(a.cwd / name, data, mtime=1_600_000_000.5 + i * 3600)
    pushed = a.run("push", "tree").stdout.splitlines()
    assert sorted(pushed) == sorted(
        [
            "tree/empty.txt  0 B",
            "tree/one.bin  1 B",
            "tree/exact.bin  64.0 KiB",
            "tree/many.bin  976.6 KiB",
            "tree/résumé/ñandú 日本.txt  15.6 KiB",  # 16 bytes x 1000
        ]
    )
    remote = await a.sdk().remote_files()
    assert {n: r.meta.parts for n, r in remote.items()} == {
        "tree/empty.txt": 0,
        "tree/one.bin": 1,
        "tree/exact.bin": 1,
        "tree/many.bin": 16,
        "tree/résumé/ñandú 日本.txt": 1,
    }

    assert b.run("ls").stdout.splitlines() == sorted(files)
    listing = b.run("ls", "-l").stdout
    assert "64.0 KiB" in listing and "rev 1" in listing
    assert b.run("ls", "tree/résumé").stdout.splitlines() == ["tree/résumé/ñandú 日本.txt"]

    # B pulls everything over its WebSocket session: byte-identical, mtimes kept.
    got = b.run("pull", "-o", "out").stdout.splitlines()
    assert len(got) == len(files)
    for name, data in files.items():
        local = b.cwd / "out" / name
        assert local.read_bytes() == data, name
        assert local.stat().st_mtime_ns == (a.cwd / name).stat().st_mtime_ns, name
    # A directory prefix over REST (S3: a presigned redirect).
    b.run("pull", "--rest", "-o", str(tmp_path / "rest"), "tree/résumé/", "tree/many.bin")
    rest = tmp_path / "rest"
    assert sorted(str(p.relative_to(rest)) for p in rest.rglob("*")) == [
        "tree",
        "tree/many.bin",
        "tree/résumé",
        "tree/résumé/ñandú 日本.txt",
    ]
    assert (tmp_path / "rest/tree/many.bin").read_bytes() == files["tree/many.bin"]

    # A new revision of an existing name; B sees it.
    write(a.cwd / "tree/one.bin", b"two")
    assert a.run("push", "tree/one.bin").stdout.strip() == "tree/one.bin  3 B"
    long = b.run("ls", "-l").stdout.splitlines()
    assert "rev 2" in next(line for line in long if "one.bin" in line)
    b.run("pull", "tree/one.bin", "-o", "out")
    assert (b.cwd / "out/tree/one.bin").read_bytes() == b"two"

    # Removing is seen by the other device.
    assert a.run("rm", "tree/one.bin").stdout.strip() == "removed tree/one.bin"
    assert "tree/one.bin" not in b.run("ls").stdout.splitlines()

    # Devices: both listed, this one marked.
    table = a.run("devices").stdout
    assert a.device_id in table and b.device_id in table
    mine = next(line for line in table.splitlines() if a.device_id in line)
    assert "this device" in mine and mine.lstrip().startswith("*")

    status = a.run("status").stdout
    assert f"username: {username}" in status
    assert f"device: {a.device_id}" in status
    assert f"server: {server.http}" in status
    assert f"user id: {a.profile['user']}" in status
    assert "unfinished uploads: 0" in status
    assert "server reachable: yes" in status
    usage = next(line for line in status.splitlines() if line.startswith("usage: "))
    assert usage.endswith(" used") and " of 10.0 GiB" in usage

    # Tokens are never printed, whatever the command.
    tokens_seen += [a.tokens, b.tokens]
    printed = "".join(a.outputs + b.outputs)
    for tokens in tokens_seen:
        assert tokens["access"] not in printed and tokens["refresh"] not in printed


def test_push_names_follow_the_path_rules(server, tmp_path):
    """Relative paths inside the cwd keep their path; anything else its basename."""
    a = Device(server.http, tmp_path / "cfg", tmp_path / "work")
    a.run("register", unique("names"))
    outside = tmp_path / "elsewhere"
    write(outside / "abs.txt", b"abs")
    write(outside / "dir/sub/deep.txt", b"deep")
    write(a.cwd / "in/here.txt", b"here")
    write(a.cwd / "single.txt", b"single")
    a.run("push", str(outside / "abs.txt"))  # absolute -> basename
    a.run("push", "../elsewhere/dir")  # outside the cwd -> basename/...
    a.run("push", "./in/../in/here.txt")  # normalised, relative
    out = a.run("push", "single.txt", "--as", "renamed/as.txt").stdout
    assert out.strip() == "renamed/as.txt  6 B"
    assert a.run("ls").stdout.splitlines() == [
        "abs.txt",
        "dir/sub/deep.txt",
        "in/here.txt",
        "renamed/as.txt",
    ]
    # --as takes exactly one file and a safe name.
    assert a.run("push", "single.txt", "in", "--as", "x", ok=False).returncode == 2
    assert a.run("push", "single.txt", "--as", "../x", ok=False).returncode == 2
    # rm of a directory needs -r.
    assert "use -r" in failure(a.run("rm", "dir", ok=False))
    assert a.run("rm", "-r", "dir").stdout.strip() == "removed dir/sub/deep.txt"


# ----------------------------------------------------------------------- errors


def test_failures_are_one_line_with_status_1(make_server, tmp_path):
    server = make_server()
    a, b, username = pair(server.http, tmp_path)
    write(a.cwd / "f.txt", b"data")
    a.run("push", "f.txt")

    # Wrong password.
    c = Device(server.http, tmp_path / "cfg-c", tmp_path / "c", password="not the password")
    line = failure(c.run("login", username, ok=False))
    assert "wrong username or password" in line
    # No password source at all (not a terminal).
    line = failure(c.run("login", username, ok=False, env=c.env(TESSERA_PASSWORD=None)))
    assert "no password" in line
    # Not logged in.
    assert "not logged in" in failure(c.run("ls", ok=False))
    assert "not logged in" in failure(c.run("pull", ok=False))
    # Unknown names.
    assert "not on the server: nope.txt" in failure(b.run("pull", "nope.txt", ok=False))
    assert "not on the server" in failure(a.run("rm", "nope.txt", ok=False))
    # A local file that does not exist.
    assert "No such file or directory" in failure(a.run("push", "missing.txt", ok=False))
    # Usage errors are click's (status 2).
    assert a.run("push", ok=False).returncode == 2
    assert a.run("pull", "../f.txt", ok=False).returncode == 2
    assert a.run("frobnicate", ok=False).returncode == 2
    # Logged in elsewhere: refuse to send this device's tokens to another server.
    other = f"http://127.0.0.1:{free_port()}"
    assert "logged in to" in failure(a.run("--server", other, "ls", ok=False))

    # Nothing listening: register fails fast with one line.
    d = Device(other, tmp_path / "cfg-d", tmp_path / "d")
    assert "cannot reach the server" in failure(d.run("register", unique("down"), ok=False))

    # The server goes away under logged-in devices.
    server.stop()
    assert "cannot reach the server" in failure(a.run("ls", ok=False))
    assert "cannot reach the server" in failure(b.run("pull", "-o", "x", ok=False))
    status = a.run("status", ok=False)
    failure(status)
    assert f"username: {username}" in status.stdout
    assert "server reachable: no" in status.stdout


def test_password_change_and_logout(server, tmp_path):
    a, b, username = pair(server.http, tmp_path)
    new = "a brand new passphrase"
    b_refresh = b.tokens["refresh"]
    assert (
        "other devices have been signed out"
        in a.run("passwd", env=a.env(TESSERA_NEW_PASSWORD=new)).stdout
    )
    a.run("ls")  # this device stays logged in
    c = Device(server.http, tmp_path / "cfg-c", tmp_path / "c")
    assert "wrong username or password" in failure(c.run("login", username, ok=False))
    c.run("login", username, "--password-stdin", stdin=new + "\n")
    assert (c.config / "master.key").read_bytes() == (a.config / "master.key").read_bytes()
    # Logging out forgets the tokens and the key, and the refresh token dies.
    refresh = c.tokens["refresh"]
    assert "logged out" in c.run("logout").stdout
    assert not (c.config / "tokens.json").exists() and not (c.config / "master.key").exists()
    assert "not logged in" in failure(c.run("ls", ok=False))
    for dead in (refresh, b_refresh):
        r = httpx.post(f"{server.http}/v1/auth/refresh", json={"refresh": dead})
        assert r.status_code == 401


async def test_names_that_escape_the_output_dir_are_refused(server, tmp_path):
    """Names are whatever some device of the user encrypted: a hostile or buggy one
    must not make ``pull`` write outside the output directory."""
    a = Device(server.http, tmp_path / "cfg", tmp_path / "work")
    a.run("register", unique("hostile"))
    write(a.cwd / "ok.txt", b"fine")
    a.run("push", "ok.txt")
    sdk = a.sdk()
    payload = write(tmp_path / "payload", b"pwned")
    async with sdk.session() as conn:
        await sdk.push(conn, payload, "../escape.txt")
    line = failure(a.run("pull", "-o", "out", ok=False))
    assert "refusing" in line and "escape.txt" in line
    assert not (a.cwd / "escape.txt").exists() and not (a.cwd / "out").exists()
    a.run("pull", "ok.txt", "-o", "out")  # the safe one can still be pulled by name
    assert (a.cwd / "out/ok.txt").read_bytes() == b"fine"
    assert sorted(os.listdir(a.cwd / "out")) == ["ok.txt"]

    async with sdk.session() as conn:
        await sdk.remove(conn, (await sdk.remote_files())["../escape.txt"])
        await sdk.push(conn, payload, "/tmp/absolute.txt")
    assert "refusing" in failure(a.run("pull", "-o", "out2", ok=False))
    assert not (a.cwd / "out2").exists()

    # Names cannot drive the terminal either: control characters are escaped.
    async with sdk.session() as conn:
        await sdk.remove(conn, (await sdk.remote_files())["/tmp/absolute.txt"])
        await sdk.push(conn, payload, "bell\x07\x1b[2J.txt")
    listing = a.run("ls").stdout
    assert "\x1b" not in listing and "\x07" not in listing
    assert listing.splitlines() == ["bell\\x07\\x1b[2J.txt", "ok.txt"]


# ------------------------------------------------------------------ kill, resume


class StagingRecorder:
    """Wraps the test server's blob store (it runs in this process): records every
    write and, while ``delay`` is set, slows staging writes so a client can be
    killed mid-upload reliably."""

    def __init__(self, server: Any, delay: float) -> None:
        self.puts: list[str] = []
        self.delay = delay
        store = server.services.store
        original = store.put_file

        async def put_file(key: str, path: Path, size: int, **kw: Any) -> None:
            self.puts.append(key)
            if key.startswith("staging/") and self.delay:
                await asyncio.sleep(self.delay)
            await original(key, path, size, **kw)

        store.put_file = put_file


async def kill_mid_upload(db: Any, device: Device, name: str) -> tuple[str, set[int]]:
    """Start ``tessera push name``, SIGKILL it once the server holds a few parts, and
    return (upload id, parts the server has) once that set stops changing."""
    user = device.profile["user"]

    async def received() -> tuple[str | None, set[int]]:
        rows = await db.fetch(
            "SELECT u.id, p.idx FROM uploads u JOIN upload_parts p ON p.upload_id = u.id "
            "WHERE u.user_id = $1 AND u.state = 'open' AND p.received",
            user,
        )
        return (rows[0]["id"] if rows else None), {r["idx"] for r in rows}

    proc = device.popen("push", name)
    try:
        deadline = time.monotonic() + 30
        while True:
            upload, have = await received()
            if len(have) >= 3:
                break
            assert proc.poll() is None, f"push ended before the kill: {proc.communicate()}"
            assert time.monotonic() < deadline, "the upload never got going"
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # Parts in flight at the kill may still land: wait until the set is stable.
    before: set[int] = set()
    stable_since = time.monotonic()
    while time.monotonic() - stable_since < 0.6:
        upload, now = await received()
        if now != before:
            before, stable_since = now, time.monotonic()
        await asyncio.sleep(0.05)
    assert upload is not None
    return upload, before


async def test_killed_upload_resumes_without_resending_parts(make_server, db, tmp_path):
    """SIGKILL mid-upload, then rerun: same upload, only the missing parts, same bytes.

    Evidence that received parts are not sent again: the test wraps the server's
    blob store (it runs in this process) and records every staging write. The
    server writes a part to ``staging/<user>/<upload>.<index>`` exactly once per
    complete, verified arrival of that part, so the rerun's staging writes are
    exactly the parts it sent. Staging writes are slowed down during the first
    run only, so the kill reliably lands mid-upload. The set of parts the server
    had is read from ``upload_parts.received`` once it stops changing after the
    kill; the rerun's ``-v`` log must report the same count.
    """
    server = make_server(window=262144, max_chunk=65536, max_frame=131072)
    a = Device(server.http, tmp_path / "cfg", tmp_path / "work")
    a.run("register", unique("resume"))
    user = a.profile["user"]
    data = os.urandom(3 * 1024 * 1024)
    write(a.cwd / "big.bin", data)
    count = len(data) // PART  # 48
    recorder = StagingRecorder(server, delay=0.15)
    puts = recorder.puts

    upload, before = await kill_mid_upload(db, a, "big.bin")
    assert 0 < len(before) < count, before
    journal = list((a.config / "uploads").glob("*.json"))
    assert len(journal) == 1
    assert json.loads(journal[0].read_text())["upload"] == upload
    assert "unfinished uploads: 1" in a.run("status").stdout

    puts.clear()
    recorder.delay = 0
    rerun = a.run("-v", "push", "big.bin")
    assert rerun.stdout.strip() == "big.bin  3.0 MiB"
    assert f"resuming upload {upload}: {len(before)} of {count} parts already on the server" in (
        rerun.stderr
    )
    prefix = staging_prefix(user, upload)
    resent = [int(k.removeprefix(prefix)) for k in puts if k.startswith(prefix)]
    assert sorted(resent) == sorted(set(range(count)) - before)  # each missing part once
    assert not any(k.startswith(f"staging/{user}/") and not k.startswith(prefix) for k in puts)

    # One upload, committed; one object; the journal is gone.
    uploads = await db.fetch("SELECT id, state FROM uploads WHERE user_id = $1", user)
    assert [(r["id"], r["state"]) for r in uploads] == [(upload, "committed")]
    assert await db.fetchval("SELECT count(*) FROM objects WHERE owner_id = $1", user) == 1
    assert list((a.config / "uploads").glob("*.json")) == []
    assert a.run("ls").stdout.splitlines() == ["big.bin"]
    a.run("pull", "big.bin", "-o", "out")
    assert hashlib.sha256((a.cwd / "out/big.bin").read_bytes()).digest() == (
        hashlib.sha256(data).digest()
    )


async def test_file_changed_since_an_interrupted_upload(make_server, db, tmp_path):
    """The file is rewritten (same size, mtime put back) after a killed upload: the
    rerun must not send different bytes under the declared hashes. It notices
    before sending, aborts the unfinished upload and uploads the file afresh."""
    server = make_server(window=262144, max_chunk=65536, max_frame=131072)
    a = Device(server.http, tmp_path / "cfg", tmp_path / "work")
    a.run("register", unique("changed"))
    path = write(a.cwd / "f.bin", os.urandom(2 * 1024 * 1024))
    recorder = StagingRecorder(server, delay=0.15)
    upload, before = await kill_mid_upload(db, a, "f.bin")
    assert 31 not in before
    st = path.stat()
    with path.open("r+b") as fh:  # the last part, not on the server yet
        fh.seek(31 * PART)
        fh.write(b"changed!")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    recorder.delay = 0
    a.run("push", "f.bin")
    assert list((a.config / "uploads").glob("*.json")) == []
    assert await db.fetchval("SELECT count(*) FROM uploads WHERE id = $1", upload) == 0
    a.run("pull", "f.bin", "-o", "out")
    assert (a.cwd / "out/f.bin").read_bytes() == path.read_bytes()


# ---------------------------------------------------------------------- tamper


async def _keys(store: Any, prefix: str) -> list[str]:
    return [info.key async for info in store.list(prefix)]


async def _read(store: Any, key: str) -> bytes:
    return b"".join([piece async for piece in store.read(key)])


async def test_tampered_partition_fails_with_integrity_error(make_server, store_kind, tmp_path):
    server = make_server(store_kind)
    a = Device(server.http, tmp_path / "cfg", tmp_path / "work")
    a.run("register", unique("tamper"))
    data = os.urandom(4 * PART + 123)
    write(a.cwd / "victim.bin", data)
    a.run("push", "victim.bin")
    user = a.profile["user"]

    store = server.services.store
    keys = sorted(server.call(lambda: _keys(store, f"partitions/{user}/")))
    assert len(keys) == 5
    target = keys[2]
    if store_kind == "local":
        path = server.settings.data_dir / "blobs" / target
        assert path.is_file()
        blob = bytearray(path.read_bytes())
        blob[100] ^= 0x01
        path.write_bytes(bytes(blob))
    else:
        blob = bytearray(server.call(lambda: _read(store, target)))
        blob[100] ^= 0x01
        server.call(lambda: store.put_bytes(target, bytes(blob)))

    for how in ([], ["--rest"]):
        out = tmp_path / f"out{len(how)}"
        line = failure(a.run("pull", *how, "-o", str(out), ok=False))
        assert "integrity" in line.lower()
        assert os.listdir(out) == []  # no partial file, no temp file


# -------------------------------------------------------------- plaintext scan


async def test_server_never_sees_plaintext(make_server, store_kind, db, tmp_path):
    """After everything, no database row and no stored object contains a name, the
    content, the password or the master key."""
    server = make_server(store_kind)
    password = f"pw-{os.urandom(6).hex()}-unguessable"
    username = unique("scan")
    a = Device(server.http, tmp_path / "cfg-a", tmp_path / "a", password=password)
    b = Device(server.http, tmp_path / "cfg-b", tmp_path / "b", password=password)
    a.run("register", username)
    b.run("login", username)
    marker = b"TOP-SECRET-CONTENT-1234"
    write(a.cwd / "classified/secret-plan-XYZ.txt", marker * 20_000)  # ~450 KiB, 8 parts
    write(a.cwd / "classified/notes-QWERTY.md", b"# notes\n" + marker + b"\n")
    a.run("push", "classified")
    write(a.cwd / "classified/notes-QWERTY.md", b"v2 " + marker)
    a.run("push", "classified/notes-QWERTY.md")  # a second revision
    b.run("pull", "-o", "out")
    a.run("rm", "classified/notes-QWERTY.md")
    master = (a.config / "master.key").read_bytes()

    needles = {
        "name": b"secret-plan-XYZ",
        "name 2": b"notes-QWERTY",
        "directory": b"classified",
        "content": marker,
        "content (partial)": marker[:12],
        "password": password.encode(),
        "master key": master,
        "master key (hex)": master.hex().encode(),
        "master key (base64)": base64.b64encode(master),
    }

    def scan(where: str, blob: bytes) -> None:
        for what, needle in needles.items():
            assert needle not in blob, f"{what} found in {where}"

    # Every column of every row of every table.
    tables = await db.fetch(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
    )
    assert {"users", "objects", "partitions", "uploads", "upload_parts"} <= {
        t["table_name"] for t in tables
    }
    rows_seen = 0
    user_found = False
    for t in tables:
        for row in await db.fetch(f'SELECT * FROM "{t["table_name"]}"'):
            rows_seen += 1
            for column, value in row.items():
                blob = _as_bytes(value)
                scan(f"{t['table_name']}.{column}", blob)
                user_found |= username.encode() in blob
    assert rows_seen > 0 and user_found  # the scan does see this user's rows

    # Every stored object, and every file the server keeps on disk.
    store = server.services.store
    keys = server.call(lambda: _keys(store, "staging/")) + server.call(
        lambda: _keys(store, "partitions/")
    )
    assert len(keys) >= 9
    for key in keys:
        scan(f"store object {key}", server.call(lambda key=key: _read(store, key)))
    for path in server.settings.data_dir.rglob("*"):
        if path.is_file():
            scan(f"server file {path}", path.read_bytes())


def _as_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


async def test_sync_command_runs_live_between_two_devices(server, tmp_path):
    """`tessera sync DIR` on device B receives A's pushes live, and B's local edits
    (picked up by the file watcher) reach A; SIGINT stops it cleanly."""
    a = Device(server.http, tmp_path / "cfg-a", tmp_path / "work-a")
    b = Device(server.http, tmp_path / "cfg-b", tmp_path / "work-b")
    name = unique("syncer")
    a.run("register", name)
    b.run("login", name)
    folder = b.cwd / "Synced"
    proc = b.popen("sync", str(folder))
    try:
        await asyncio.sleep(1.0)  # let sync connect and start watching
        write(a.cwd / "hello.txt", b"pushed by A")
        a.run("push", "hello.txt")
        await until_file(folder / "hello.txt", b"pushed by A")
        write(folder / "notes" / "from-b.txt", b"written on B")
        for _ in range(100):
            if "notes/from-b.txt" in a.run("ls").stdout.splitlines():
                break
            await asyncio.sleep(0.2)
        a.run("pull", "notes/from-b.txt", "-o", "got")
        assert (a.cwd / "got" / "notes" / "from-b.txt").read_bytes() == b"written on B"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert "downloaded hello.txt" in out and "uploaded notes/from-b.txt" in out


def _holds(path: Path, data: bytes) -> bool:
    return path.is_file() and path.read_bytes() == data


async def until_file(path: Path, data: bytes, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not _holds(path, data):
        if loop.time() > deadline:
            raise AssertionError(f"{path} did not arrive with the expected bytes")
        await asyncio.sleep(0.1)


def test_a_short_new_password_is_refused_by_the_client(server, tmp_path):
    """The server sees only the derived login secret, so the client checks strength."""
    d = Device(server.http, tmp_path / "cfg", tmp_path / "work", password="short")
    line = failure(d.run("register", unique("weak"), ok=False))
    assert "at least 8 characters" in line
