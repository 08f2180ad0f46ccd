"""The SDK against a real server: keys, encrypted transfers, resume, integrity."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import httpx
import pytest

from client import crypto
from client.connection import Connection, ServerClosed
from client.sdk import Tessera, conflicted_name
from client.state import State
from tests.conftest import unique

PASSWORD = "correct horse battery"


async def device(server, tmp_path: Path, name: str, username: str, *, new: bool) -> Tessera:
    sdk = Tessera(State(tmp_path / name), server.http)
    sdk.part_size = 64 * 1024
    if new:
        await sdk.register(username, PASSWORD)
    else:
        await sdk.login(username, PASSWORD)
    return sdk


@pytest.fixture(autouse=True)
def _cheap_keys(fast_kdf: None) -> None:
    """Every test here derives keys: keep Argon2id cheap."""


async def test_two_devices_share_one_master_key_and_files(server, tmp_path):
    username = unique("sdk")
    a = await device(server, tmp_path, "a", username, new=True)
    b = await device(server, tmp_path, "b", username, new=False)
    assert a.state.master_key() == b.state.master_key()
    assert a.state.device_id() != b.state.device_id()
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    async with a.session() as conn:
        name, done = await a.push(conn, src, "docs/ñame.bin")
    assert name == "docs/ñame.bin" and done.rev == 1
    files = await b.remote_files()
    assert set(files) == {"docs/ñame.bin"}
    remote = files["docs/ñame.bin"]
    assert remote.meta.size == 300_000 and remote.meta.parts == 5
    async with b.session() as conn:
        await b.pull(conn, remote, tmp_path / "out" / "ws.bin")
    await b.pull(None, remote, tmp_path / "out" / "rest.bin")  # the REST fallback
    for out in ("ws.bin", "rest.bin"):
        assert (tmp_path / "out" / out).read_bytes() == src.read_bytes()
        assert (tmp_path / "out" / out).stat().st_mtime_ns == src.stat().st_mtime_ns


async def test_the_sdk_names_its_device_after_the_machine(server, tmp_path):
    sdk = await device(server, tmp_path, "a", unique("sdk"), new=True)
    token = sdk.state.tokens()["access"]
    async with httpx.AsyncClient(
        base_url=server.http, headers={"Authorization": f"Bearer {token}"}
    ) as http:
        listed = (await http.get("/v1/devices")).json()["devices"]
    assert [(d["id"], d["name"]) for d in listed] == [
        (sdk.state.device_id(), socket.gethostname()[:100])
    ]


async def test_stale_revision_becomes_a_conflicted_copy(server, tmp_path):
    username = unique("sdk")
    a = await device(server, tmp_path, "a", username, new=True)
    b = await device(server, tmp_path, "b", username, new=False)
    f = tmp_path / "f.txt"
    f.write_text("v1")
    async with a.session() as conn:
        await a.push(conn, f, "f.txt")
    stale = (await b.remote_files())["f.txt"]
    f.write_text("v2 from a")
    async with a.session() as conn:
        await a.push(conn, f, "f.txt", existing=(await a.remote_files())["f.txt"])
    g = tmp_path / "g.txt"
    g.write_text("v2 from b")
    async with b.session() as conn:
        name, _ = await b.push(conn, g, "f.txt", existing=stale)
    assert name.startswith("f (conflicted copy ") and name.endswith(".txt")
    files = await a.remote_files()
    assert set(files) == {"f.txt", name}
    async with a.session() as conn:
        await a.pull(conn, files["f.txt"], tmp_path / "x1")
        await a.pull(conn, files[name], tmp_path / "x2")
    assert (tmp_path / "x1").read_text() == "v2 from a"
    assert (tmp_path / "x2").read_text() == "v2 from b"


def test_conflicted_name_keeps_directory_and_suffix():
    import datetime as dt

    when = dt.datetime(2026, 11, 21, 9, 30, 12)
    assert conflicted_name("a/b/report.txt", "laptop", when) == (
        "a/b/report (conflicted copy laptop 2026-11-21 093012).txt"
    )
    assert (
        conflicted_name("Makefile", "pc", when) == "Makefile (conflicted copy pc 2026-11-21 093012)"
    )


async def test_an_idle_sdk_session_keeps_itself_alive(make_server, tmp_path):
    server = make_server(idle_timeout=0.6)
    sdk = await device(server, tmp_path, "idle", unique("idle"), new=True)
    async with sdk.session() as conn:
        await asyncio.sleep(2.0)  # > 3 idle timeouts without any call of ours
        assert conn.closed is None
        assert (await conn.request({"t": "ping"}))["t"] == "pong"


async def test_the_server_never_receives_the_password(server, tmp_path, db):
    from argon2 import PasswordHasher
    from argon2.exceptions import VerifyMismatchError

    username = unique("secret")
    await device(server, tmp_path, "a", username, new=True)
    stored = await db.fetchval("SELECT password_hash FROM users WHERE username = $1", username)
    hasher = PasswordHasher()
    assert hasher.verify(stored, crypto.login_secret(username, PASSWORD))
    with pytest.raises(VerifyMismatchError):
        hasher.verify(stored, PASSWORD)


async def test_push_sends_again_the_parts_a_server_lost_from_staging(server, tmp_path):
    """A staged part vanishes on the server (removed by hand, or a store that lost
    it): the commit answers ``incomplete`` with the missing index, and the SDK sends
    that part again and commits."""
    sdk = await device(server, tmp_path, "a", unique("lost"), new=True)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(200_000))  # 4 parts of 64 KiB
    store = server.services.store
    copy = store.copy
    lost: list[str] = []

    async def copy_after_losing_one(src_key: str, dst_key: str) -> None:
        if not lost and src_key.endswith(".2"):  # staging/<user>/<upload>.<index>
            await store.delete(src_key)  # as if the crash took it
            lost.append(src_key)
        await copy(src_key, dst_key)

    store.copy = copy_after_losing_one
    try:
        async with sdk.session() as conn:
            _, done = await sdk.push(conn, src, "lost.bin")
    finally:
        store.copy = copy
    assert lost and done.rev == 1
    out = tmp_path / "out.bin"
    await sdk.pull(None, (await sdk.remote_files())["lost.bin"], out)
    assert out.read_bytes() == src.read_bytes()


async def test_a_small_file_goes_in_one_put_and_a_lost_reply_commits_once(
    server, tmp_path, db, monkeypatch
):
    """A file of one part small enough for a frame is one ``put``. When the reply is
    lost (the connection drops after the put went out), the next push resends the
    same put from the journal and gets the first one's object: no second copy."""
    sdk = await device(server, tmp_path, "a", unique("put"), new=True)
    src = tmp_path / "small.txt"
    src.write_bytes(os.urandom(3000))
    sent: list[dict] = []

    async def put_then_drop(self: Connection, frame: dict) -> dict:
        await self._spend(len(frame["data"]))
        sent.append(frame)
        await self.send({**frame, "rid": 999_999})  # nobody waits for this reply
        await asyncio.sleep(0.5)  # the server commits meanwhile
        raise ServerClosed(1006, "connection lost")

    with monkeypatch.context() as patch:
        patch.setattr(Connection, "put", put_then_drop)
        with pytest.raises(ServerClosed):
            async with sdk.session() as conn:
                await sdk.push(conn, src, "small.txt")
    user = await db.fetchval("SELECT id FROM users WHERE username = $1", sdk.profile.username)
    first = await db.fetchval("SELECT id FROM objects WHERE owner_id = $1", user)
    assert first is not None  # committed, but the client never heard
    async with sdk.session() as conn:
        name, done = await sdk.push(conn, src, "small.txt")
    assert name == "small.txt" and (done.object, done.rev) == (first, 1)
    assert await db.fetchval("SELECT count(*) FROM objects WHERE owner_id = $1", user) == 1
    assert [f["t"] for f in sent] == ["put"]
    staged = await db.fetchval(
        "SELECT count(*) FROM upload_parts p JOIN uploads u "
        "ON u.id = p.upload_id WHERE u.user_id = $1",
        user,
    )
    assert staged == 0
    out = tmp_path / "out.txt"
    await sdk.pull(None, (await sdk.remote_files())["small.txt"], out)
    assert out.read_bytes() == src.read_bytes()
