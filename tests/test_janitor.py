"""The janitor: expired uploads, superseded partitions and orphans in the store are
removed; nothing that is referenced or still in use is touched. Every case runs
against both stores."""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from server import keys
from server.janitor import Janitor, JanitorReport
from tests.conftest import unique
from tests.support.client import SyncClient, register_login
from tests.support.server import RunningServer

KiB = 1024

LIMITS: dict[str, Any] = {
    "max_chunk": 64 * KiB,
    "max_frame": 128 * KiB,
    "window": 256 * KiB,
    "max_partition": 256 * KiB,
}


def app_state(server: RunningServer) -> Any:
    """The app's state. (RunningServer.services assumes a wrapped app, which it is not
    when uvicorn runs without proxy_headers; walk the wrappers, whichever it is.)"""
    assert server._server is not None
    app = server._server.config.loaded_app
    while not hasattr(app, "state"):
        app = app.app
    return app.state


@dataclass
class Env:
    server: RunningServer
    tokens: dict[str, Any]
    user: int
    db: asyncpg.Connection

    @property
    def store(self) -> Any:
        return app_state(self.server).services.store

    def run_janitor(self) -> JanitorReport:
        """One janitor pass, built and run on the server's own loop with its settings."""
        services = app_state(self.server).services

        async def run() -> JanitorReport:
            return await Janitor(self.server.settings, services.pool, services.store).run_once()

        return self.server.call(run)

    def keys_under(self, prefix: str) -> list[str]:
        store = self.store

        async def collect() -> list[str]:
            return sorted([info.key async for info in store.list(prefix)])

        return self.server.call(collect)

    def exists(self, key: str) -> bool:
        store = self.store
        return self.server.call(lambda: store.stat(key)) is not None

    def put(self, key: str, data: bytes) -> None:
        store = self.store
        self.server.call(lambda: store.put_bytes(key, data))

    async def connect(self) -> SyncClient:
        return await SyncClient.connect(self.server.ws, self.tokens["access"], unique("dev"))

    async def object_parts(self, obj: int) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=self.server.http) as http:
            r = await http.get(
                f"/v1/object/{obj}", headers={"Authorization": f"Bearer {self.tokens['access']}"}
            )
        assert r.status_code == 200, r.text
        return r.json()["parts"]

    async def store_keys(self, obj: int) -> list[str]:
        rows = await self.db.fetch(
            "SELECT store_key FROM partitions WHERE object_id = $1 ORDER BY idx", obj
        )
        return [r["store_key"] for r in rows]

    async def assert_downloads(self, obj: int, parts: list[bytes]) -> None:
        listed = await self.object_parts(obj)
        assert [p["size"] for p in listed] == [len(p) for p in parts]
        c = await self.connect()
        try:
            for p, data in zip(listed, parts, strict=True):
                assert await c.download(p["id"]) == data
        finally:
            await c.close()

    async def assert_all_committed_intact(self) -> None:
        """Every partition row of this user still has its blob, of the right size."""
        rows = await self.db.fetch(
            "SELECT p.store_key, p.size FROM partitions p JOIN objects o ON o.id = p.object_id "
            "WHERE o.owner_id = $1",
            self.user,
        )
        store = self.store
        for row in rows:
            info = self.server.call(lambda key=row["store_key"]: store.stat(key))
            assert info is not None, row["store_key"]
            assert info.size == row["size"]


@pytest.fixture
def janitor_env(make_server, db, store_kind):
    async def start(**overrides: Any) -> Env:
        server = make_server(store_kind, **{**LIMITS, **overrides})
        tokens = await register_login(server.http, unique("jan"))
        async with httpx.AsyncClient(base_url=server.http) as http:
            r = await http.get(
                "/v1/account", headers={"Authorization": f"Bearer {tokens['access']}"}
            )
        return Env(server=server, tokens=tokens, user=int(r.json()["user"]), db=db)

    return start


async def open_upload(c: SyncClient, parts: list[bytes], **kw: Any) -> str:
    ok = await c.start_upload(parts, **kw)
    assert ok["t"] == "upload_ok", ok
    return ok["upload"]


# -------------------------------------------------------------------- cases


async def test_expired_upload_is_removed(janitor_env):
    env = await janitor_env()
    c = await env.connect()
    parts = [os.urandom(50 * KiB), os.urandom(20 * KiB), os.urandom(10 * KiB)]
    upload = await open_upload(c, parts)
    await c.send_parts(upload, parts, indexes=[0, 2])
    prefix = keys.staging_prefix(env.user, upload)
    assert env.keys_under(prefix) == [prefix + "0", prefix + "2"]
    # A committed object of the same user must survive the pass.
    kept = [os.urandom(30 * KiB)]
    done = await c.push(kept)
    await c.close()

    await env.db.execute(
        "UPDATE uploads SET expires_at = now() - interval '1 minute' WHERE id = $1", upload
    )
    report = env.run_janitor()
    assert report.expired_uploads >= 1

    assert await env.db.fetchval("SELECT count(*) FROM uploads WHERE id = $1", upload) == 0
    assert (
        await env.db.fetchval("SELECT count(*) FROM upload_parts WHERE upload_id = $1", upload) == 0
    )
    assert env.keys_under(prefix) == []
    c = await env.connect()
    for t in ("resume", "commit"):
        err = await c.request({"t": t, "upload": upload})
        assert err["t"] == "error" and err["code"] == "not_found", (t, err)
    await c.close()
    await env.assert_downloads(done["object"], kept)
    await env.assert_all_committed_intact()


async def test_expired_upload_via_upload_ttl(janitor_env):
    env = await janitor_env(upload_ttl=1)
    c = await env.connect()
    parts = [os.urandom(40 * KiB), os.urandom(40 * KiB)]
    upload = await open_upload(c, parts)
    await c.send_parts(upload, parts, indexes=[1])
    prefix = keys.staging_prefix(env.user, upload)
    assert env.keys_under(prefix) == [prefix + "1"]
    # Wait (in the database's own clock) until the upload has lapsed.
    for _ in range(60):
        if await env.db.fetchval("SELECT expires_at < now() FROM uploads WHERE id = $1", upload):
            break
        await asyncio.sleep(0.05)
    # Expired but not yet swept: it already does not resume.
    err = await c.request({"t": "resume", "upload": upload})
    assert err["code"] == "not_found", err
    env.run_janitor()
    assert await env.db.fetchval("SELECT count(*) FROM uploads WHERE id = $1", upload) == 0
    assert env.keys_under(prefix) == []
    await c.close()


async def test_orphan_partition_object_is_removed(janitor_env):
    env = await janitor_env(orphan_grace=0)
    c = await env.connect()
    parts = [os.urandom(60 * KiB), os.urandom(5 * KiB)]
    done = await c.push(parts)
    dir_done = await c.push([], kind="dir")
    await c.close()
    orphan = keys.partition_key(env.user, 9_000_000_000_000 + secrets.randbelow(10**9))
    env.put(orphan, b"left behind by a crash between copy and commit")
    assert env.exists(orphan)
    committed = await env.store_keys(done["object"])
    assert len(committed) == 2

    report = env.run_janitor()
    assert report.partition_orphans == 1
    assert not env.exists(orphan)
    for key in committed:
        assert env.exists(key), key
    await env.assert_downloads(done["object"], parts)
    await env.assert_downloads(dir_done["object"], [])
    await env.assert_all_committed_intact()
    # Idempotent: a second pass finds nothing more.
    again = env.run_janitor()
    assert again.partition_orphans == 0
    await env.assert_downloads(done["object"], parts)


async def test_young_orphan_partition_object_is_kept(janitor_env):
    env = await janitor_env(orphan_grace=3600)
    orphan = keys.partition_key(env.user, 9_000_000_000_000 + secrets.randbelow(10**9))
    env.put(orphan, b"maybe a commit in progress")
    report = env.run_janitor()
    assert report.partition_orphans == 0
    assert env.exists(orphan)


async def test_superseded_partitions_removed_without_delay(janitor_env):
    env = await janitor_env(garbage_delay=0)
    c = await env.connect()
    v1 = [os.urandom(70 * KiB), os.urandom(10 * KiB)]
    done1 = await c.push(v1)
    old = await env.store_keys(done1["object"])
    old_ids = [p["id"] for p in await env.object_parts(done1["object"])]
    v2 = [os.urandom(33 * KiB)]
    done2 = await c.push(v2, obj=done1["object"], base=done1["rev"])
    assert done2["rev"] == 2
    await c.close()
    new = await env.store_keys(done1["object"])
    assert set(new).isdisjoint(old)
    assert await env.db.fetchval("SELECT count(*) FROM garbage WHERE store_key = ANY($1)", old) == 2

    report = env.run_janitor()
    assert report.garbage_deleted >= 2
    for key in old:
        assert not env.exists(key), key
    assert await env.db.fetchval("SELECT count(*) FROM garbage WHERE store_key = ANY($1)", old) == 0
    for key in new:
        assert env.exists(key), key
    await env.assert_downloads(done1["object"], v2)
    c = await env.connect()
    for pid in old_ids:
        err = await c.request({"t": "get", "part": pid})
        assert err["code"] == "not_found", err
    await c.close()
    await env.assert_all_committed_intact()


async def test_superseded_partitions_kept_during_delay(janitor_env):
    # orphan_grace=0 as well: the garbage table must protect them from the orphan sweep.
    env = await janitor_env(garbage_delay=3600, orphan_grace=0)
    c = await env.connect()
    v1 = [os.urandom(70 * KiB)]
    done1 = await c.push(v1)
    old = await env.store_keys(done1["object"])
    v2 = [os.urandom(20 * KiB), os.urandom(20 * KiB)]
    await c.push(v2, obj=done1["object"], base=done1["rev"])
    await c.close()

    report = env.run_janitor()
    assert report.partition_orphans == 0
    for key in old:
        assert env.exists(key), key
    assert await env.db.fetchval("SELECT count(*) FROM garbage WHERE store_key = ANY($1)", old) == 1
    await env.assert_downloads(done1["object"], v2)
    await env.assert_all_committed_intact()


async def test_deleted_object_partitions_collected(janitor_env):
    env = await janitor_env(garbage_delay=0)
    c = await env.connect()
    data = [os.urandom(40 * KiB)]
    done = await c.push(data)
    old = await env.store_keys(done["object"])
    gone = await c.request({"t": "delete", "object": done["object"], "base": done["rev"]})
    assert gone["t"] == "committed", gone
    await c.close()
    env.run_janitor()
    for key in old:
        assert not env.exists(key), key


async def test_duplicate_commit_copies_are_reclaimed(janitor_env):
    """Two concurrent commits of one upload may both copy the parts; whatever the
    losing commit leaves in partitions/ is an orphan the janitor removes, and the
    committed object is untouched."""
    env = await janitor_env(orphan_grace=0)
    c = await env.connect()
    parts = [os.urandom(60 * KiB) for _ in range(4)]
    upload = await open_upload(c, parts)
    await c.send_parts(upload, parts)
    await c.send({"t": "commit", "rid": 501, "upload": upload})
    await c.send({"t": "commit", "rid": 502, "upload": upload})
    first = await c.wait_for(lambda f: f.get("rid") == 501)
    second = await c.wait_for(lambda f: f.get("rid") == 502)
    assert first["t"] == second["t"] == "committed", (first, second)
    await c.close()
    referenced = await env.store_keys(first["object"])
    env.run_janitor()
    assert env.keys_under(f"partitions/{env.user}/") == sorted(referenced)
    await env.assert_downloads(first["object"], parts)
    await env.assert_all_committed_intact()


async def test_orphan_staging_object_is_removed(janitor_env):
    env = await janitor_env(orphan_grace=0)
    ghost = secrets.token_urlsafe(16)
    orphan = keys.staging_key(env.user, ghost, 0)
    env.put(orphan, b"no upload row for this")
    stray = "staging/not-a-user/whatever/x"
    env.put(stray, b"not even a staging key")
    report = env.run_janitor()
    assert report.staging_orphans >= 2
    assert not env.exists(orphan)
    assert not env.exists(stray)


async def test_young_orphan_staging_object_is_kept(janitor_env):
    env = await janitor_env(orphan_grace=3600)
    orphan = keys.staging_key(env.user, secrets.token_urlsafe(16), 0)
    env.put(orphan, b"an upload row may be about to appear")
    env.run_janitor()
    assert env.exists(orphan)


async def test_open_upload_staging_is_kept(janitor_env):
    env = await janitor_env(orphan_grace=0)
    c = await env.connect()
    parts = [os.urandom(50 * KiB), os.urandom(50 * KiB)]
    upload = await open_upload(c, parts)
    await c.send_parts(upload, parts, indexes=[0])
    prefix = keys.staging_prefix(env.user, upload)
    assert env.keys_under(prefix) == [prefix + "0"]

    report = env.run_janitor()
    assert report.staging_orphans == 0
    assert env.keys_under(prefix) == [prefix + "0"]
    assert await env.db.fetchval("SELECT state FROM uploads WHERE id = $1", upload) == "open"
    # The upload carries on: resume from another session, finish, commit.
    await c.close()
    c = await env.connect()
    ok = await c.request({"t": "resume", "upload": upload})
    assert ok["t"] == "upload_ok" and ok["have"] == [0], ok
    await c.send_parts(upload, parts, indexes=[1])
    done = await c.request({"t": "commit", "upload": upload})
    assert done["t"] == "committed", done
    await c.close()
    await env.assert_downloads(done["object"], parts)


async def test_staging_is_empty_after_commit(janitor_env):
    env = await janitor_env()
    c = await env.connect()
    parts = [os.urandom(60 * KiB), os.urandom(60 * KiB), os.urandom(1)]
    upload = await open_upload(c, parts)
    await c.send_parts(upload, parts)
    prefix = keys.staging_prefix(env.user, upload)
    assert len(env.keys_under(prefix)) == 3
    done = await c.request({"t": "commit", "upload": upload})
    assert done["t"] == "committed", done
    await c.close()
    assert env.keys_under(prefix) == []
    assert env.keys_under(f"staging/{env.user}/") == []
    # The committed upload row stays (for idempotent retries) until it expires.
    assert await env.db.fetchval("SELECT state FROM uploads WHERE id = $1", upload) == "committed"
    await env.assert_downloads(done["object"], parts)
    # Expiring the committed row removes only the row: the object is untouched.
    await env.db.execute(
        "UPDATE uploads SET expires_at = now() - interval '1 minute' WHERE id = $1", upload
    )
    env.run_janitor()
    assert await env.db.fetchval("SELECT count(*) FROM uploads WHERE id = $1", upload) == 0
    await env.assert_downloads(done["object"], parts)
    await env.assert_all_committed_intact()


async def test_aborted_upload_staging_is_removed(janitor_env):
    env = await janitor_env()
    c = await env.connect()
    parts = [os.urandom(30 * KiB), os.urandom(30 * KiB)]
    upload = await open_upload(c, parts)
    await c.send_parts(upload, parts)
    prefix = keys.staging_prefix(env.user, upload)
    assert len(env.keys_under(prefix)) == 2
    ok = await c.request({"t": "abort", "upload": upload})
    assert ok == {"t": "ok", "rid": ok["rid"]}
    assert env.keys_under(prefix) == []
    err = await c.request({"t": "resume", "upload": upload})
    assert err["code"] == "not_found", err
    await c.close()
