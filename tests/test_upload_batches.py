"""The three-step upload's statements run several uploads' at once (server/uploads.py
``Uploads.declares``, ``received``, ``reads``, ``commits``). Each test holds a
group (concurrency 0) until every session's request waits in it, then lets them
go as one batch, so the batch path runs for certain, with real sessions, a
real PostgreSQL and a real store; and each upload must get exactly the outcome
it would have had alone."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import asyncpg

from server.groupcommit import GroupCommit
from server.uploads import _Declare
from tests.conftest import unique
from tests.support.client import SyncClient, meta, part_spec, register_login
from tests.support.server import RunningServer

Frame = dict[str, Any]


async def _set(group: GroupCommit[Any, Any], concurrency: int) -> None:
    group.concurrency = concurrency


@contextlib.asynccontextmanager
async def held(server: RunningServer, name: str, writes: int) -> AsyncIterator[None]:
    """Hold the group ``name`` while the body starts ``writes`` writes; on leaving,
    wait until all of them are queued and let them go together."""
    group: GroupCommit[Any, Any] = getattr(server.services.uploads, name)
    before = group.stats.batches
    server.call(lambda: _set(group, 0))
    try:
        yield
        for _ in range(1000):
            if group.pending >= writes:
                break
            await asyncio.sleep(0.01)
        assert group.pending == writes, f"{group.pending} of {writes} writes queued in {name}"
    finally:
        server.call(lambda: _set(group, 2))
    for _ in range(1000):
        if group.pending == 0 and group.stats.batches > before:
            break
        await asyncio.sleep(0.01)
    assert group.stats.batches == before + 1, f"{name}: not one batch"


def tasks(calls: list[Awaitable[Any]]) -> list[asyncio.Task[Any]]:
    return [asyncio.ensure_future(c) for c in calls]


async def clients(
    server: RunningServer, db: asyncpg.Connection, n: int, prefix: str
) -> list[tuple[SyncClient, int]]:
    """``n`` sessions of ``n`` new users, with the users' ids."""
    out = []
    for _ in range(n):
        name = unique(prefix)
        tokens = await register_login(server.http, name)
        client = await SyncClient.connect(server.ws, tokens["access"], device=name)
        out.append((client, await db.fetchval("SELECT id FROM users WHERE username = $1", name)))
    return out


async def test_uploads_of_several_users_go_through_each_step_in_one_batch(make_server, db):
    server = make_server()
    users = await clients(server, db, 5, "batch")
    cs = [c for c, _ in users]
    # Some of one part, some of two, one of none: the batch statements flatten
    # the parts of each upload into one array per column.
    files = [
        [os.urandom(700 + i), os.urandom(300)] if i % 2 else [os.urandom(1000 + i)]
        for i in range(5)
    ]
    files[4] = []  # an empty file: no parts at all

    async with held(server, "declares", 5):
        declared = tasks([c.start_upload(f) for c, f in zip(cs, files, strict=True)])
    oks = await asyncio.gather(*declared)
    assert [ok["t"] for ok in oks] == ["upload_ok"] * 5, oks
    ids = [ok["upload"] for ok in oks]
    for (_, uid), upload, f in zip(users, ids, files, strict=True):
        rows = await db.fetch(
            "SELECT idx, size, sha256, received FROM upload_parts WHERE upload_id = $1 "
            "ORDER BY idx",
            upload,
        )
        assert [(r["idx"], r["size"], bytes(r["sha256"]), r["received"]) for r in rows] == [
            (i, len(p), hashlib.sha256(p).digest(), False) for i, p in enumerate(f)
        ]
        assert await db.fetchval("SELECT user_id FROM uploads WHERE id = $1", upload) == uid

    async with held(server, "received", sum(map(len, files))):
        sent = tasks([c.send_parts(u, f) for c, u, f in zip(cs, ids, files, strict=True)])
    await asyncio.gather(*sent)
    assert await db.fetchval(
        "SELECT bool_and(received) FROM upload_parts WHERE upload_id = ANY($1)", ids
    )

    uploads = server.services.uploads
    ((other, _),) = await clients(server, db, 1, "stray")
    async with held(server, "commits", 5), held(server, "reads", 6):
        commits = tasks(
            [c.request({"t": "commit", "upload": u}) for c, u in zip(cs, ids, strict=True)]
        )
        # A commit of an upload that is not there, in the same read batch.
        stray = tasks([other.request({"t": "commit", "upload": "no-such-upload"})])
    done = await asyncio.gather(*commits)
    assert [d["t"] for d in done] == ["committed"] * 5, done
    (missing,) = await asyncio.gather(*stray)
    assert missing["t"] == "error" and missing["code"] == "not_found", missing
    assert uploads.commits.stats.largest >= 5

    assert len({d["object"] for d in done}) == 5
    for (client, uid), upload, f, d in zip(users, ids, files, done, strict=True):
        size = sum(map(len, f))
        row = await db.fetchrow(
            "SELECT owner_id, size, rev FROM objects WHERE id = $1", d["object"]
        )
        assert (row["owner_id"], row["size"], row["rev"]) == (uid, size, 1)
        assert d["rev"] == 1
        assert await db.fetchval("SELECT used FROM users WHERE id = $1", uid) == size
        assert d["seq"] == await db.fetchval(
            "SELECT seq FROM access_list WHERE object_id = $1 AND user_id = $2", d["object"], uid
        )
        stored = await db.fetch(
            "SELECT id, idx, size, sha256 FROM partitions WHERE object_id = $1 ORDER BY idx",
            d["object"],
        )
        assert [(r["idx"], r["size"], bytes(r["sha256"])) for r in stored] == [
            (i, len(p), hashlib.sha256(p).digest()) for i, p in enumerate(f)
        ]
        for r, p in zip(stored, f, strict=True):  # the bytes, back through the session
            assert await client.download(r["id"]) == p
        assert await db.fetchval("SELECT state FROM uploads WHERE id = $1", upload) == "committed"
    assert not await db.fetchval("SELECT count(*) FROM upload_parts WHERE upload_id = ANY($1)", ids)
    for c in [*cs, other]:
        await c.close()


async def test_a_refusal_in_a_batch_is_that_uploads_alone(make_server, db):
    """Limits are judged upload by upload inside one statement: one user over quota
    is refused at declaration and at commit; the others in its batches go on."""
    server = make_server(default_quota=10_000)
    users = await clients(server, db, 3, "refuse")
    cs = [c for c, _ in users]
    poor = users[1][1]
    await db.execute("UPDATE users SET quota = 100 WHERE id = $1", poor)
    data = [os.urandom(2000) for _ in cs]

    async with held(server, "declares", 3):
        declared = tasks([c.start_upload([d]) for c, d in zip(cs, data, strict=True)])
    oks = await asyncio.gather(*declared)
    assert [ok["t"] for ok in oks] == ["upload_ok", "error", "upload_ok"], oks
    assert oks[1]["code"] == "quota_exceeded"
    assert not await db.fetchval("SELECT count(*) FROM uploads WHERE user_id = $1", poor)

    # Now declared, then its quota shrinks: refused at commit, in the same batch.
    await db.execute("UPDATE users SET quota = 10000 WHERE id = $1", poor)
    again = await cs[1].start_upload([data[1]])
    assert again["t"] == "upload_ok", again
    ids = [oks[0]["upload"], again["upload"], oks[2]["upload"]]
    for c, u, d in zip(cs, ids, data, strict=True):
        await c.send_parts(u, [d])
    await db.execute("UPDATE users SET quota = 100 WHERE id = $1", poor)
    async with held(server, "commits", 3):
        commits = tasks(
            [c.request({"t": "commit", "upload": u}) for c, u in zip(cs, ids, strict=True)]
        )
    done = await asyncio.gather(*commits)
    assert [d["t"] for d in done] == ["committed", "error", "committed"], done
    assert done[1]["code"] == "quota_exceeded"
    assert await db.fetchval("SELECT used FROM users WHERE id = $1", poor) == 0
    assert not await db.fetchval("SELECT count(*) FROM objects WHERE owner_id = $1", poor)
    assert await db.fetchval("SELECT state FROM uploads WHERE id = $1", ids[1]) == "open"
    for (_, uid), d in zip([users[0], users[2]], data[::2], strict=True):
        assert await db.fetchval("SELECT used FROM users WHERE id = $1", uid) == len(d)
    for c in cs:
        await c.close()


async def test_a_part_of_an_upload_aborted_meanwhile_is_refused_in_its_batch(make_server, db):
    """Parts of three uploads recorded in one statement; one upload was aborted while
    its part waited: that part is refused and its staged copy deleted."""
    server = make_server()
    users = await clients(server, db, 3, "gone")
    cs = [c for c, _ in users]
    data = [os.urandom(1500) for _ in cs]
    oks = [await c.start_upload([d]) for c, d in zip(cs, data, strict=True)]
    ids = [ok["upload"] for ok in oks]

    async with held(server, "received", 3):
        sent = tasks(
            [c.send_parts(u, [d], wait=False) for c, u, d in zip(cs, ids, data, strict=True)]
        )
        await asyncio.gather(*sent)
        for _ in range(500):
            if server.services.uploads.received.pending == 3:
                break
            await asyncio.sleep(0.01)
        await db.execute("DELETE FROM uploads WHERE id = $1", ids[1])  # an abort elsewhere

    replies = [
        await c.wait_for(lambda f, u=u: f.get("upload") == u and f["t"] in ("part_ok", "error"))
        for c, u in zip(cs, ids, strict=True)
    ]
    assert [r["t"] for r in replies] == ["part_ok", "error", "part_ok"], replies
    assert replies[1]["code"] == "not_found"
    for c, u in zip(cs[::2], ids[::2], strict=True):
        assert (await c.request({"t": "commit", "upload": u}))["t"] == "committed"
    staged = f"staging/{users[1][1]}/{ids[1]}."
    store = server.services.uploads.store
    for _ in range(200):
        left = server.call(lambda: _keys(store, staged))
        if not left:
            break
        await asyncio.sleep(0.05)
    assert not left, left
    for c in cs:
        await c.close()


async def _keys(store: Any, prefix: str) -> list[str]:
    return [info.key async for info in store.list(prefix)]


async def test_a_statement_error_in_a_batch_runs_its_writes_one_by_one(make_server, db):
    """Two declarations of one upload id by two users in one batch: the statement
    fails on the id (unique), so each runs alone and gets its own outcome."""
    server = make_server()
    users = await clients(server, db, 2, "split")
    uploads = server.services.uploads
    upload = unique("dup")

    def declare(uid: int) -> _Declare:
        return _Declare(
            upload, uid, uid, None, None, None, "file", b"n", b"m", b"k", b"s", 10, 0,
            [10], [hashlib.sha256(b"x").digest()], [b"pk"], [b"ps"],
        )  # fmt: skip

    async def both() -> list[Any]:
        uploads.declares.concurrency = 0
        runs = [
            asyncio.ensure_future(uploads.declares.submit(declare(uid), frozenset({uid})))
            for _, uid in users
        ]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        uploads.declares.concurrency = 2
        return await asyncio.gather(*runs, return_exceptions=True)

    split = uploads.declares.stats.split
    first, second = server.call(both)
    assert uploads.declares.stats.split == split + 1
    assert first["outcome"] == "declared"
    assert isinstance(second, asyncpg.UniqueViolationError)
    assert await db.fetchval("SELECT user_id FROM uploads WHERE id = $1", upload) == users[0][1]
    assert await db.fetchval("SELECT count(*) FROM upload_parts WHERE upload_id = $1", upload) == 1
    for c, _ in users:
        await c.close()


async def test_a_declaration_still_queued_when_its_session_ends_is_dropped(make_server, db, ended):
    server = make_server()
    ((client, uid),) = await clients(server, db, 1, "drop")
    group = server.services.uploads.declares
    server.call(lambda: _set(group, 0))
    try:
        data = os.urandom(900)
        await client.send(
            {"t": "upload", "rid": 7, "kind": "file", "meta": meta(), "parts": [part_spec(data)]}
        )
        for _ in range(500):
            if group.pending:
                break
            await asyncio.sleep(0.01)
        assert group.pending == 1
        client.ws.transport.abort()
        for _ in range(500):
            if ended:
                break
            await asyncio.sleep(0.01)
        assert ended, "a session whose declaration never started must not wait for it"
    finally:
        server.call(lambda: _set(group, 2))
    await asyncio.sleep(0.3)
    assert group.pending == 0
    assert not await db.fetchval("SELECT count(*) FROM uploads WHERE user_id = $1", uid)
