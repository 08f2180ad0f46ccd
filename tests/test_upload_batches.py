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
import pytest

from server.groupcommit import GroupCommit
from server.uploads import _Declare
from tests.conftest import cut_and_see_it_settle, unique, until_ended
from tests.support.client import SyncClient, meta, part_spec, register_login
from tests.support.db import until_a_statement_waits_on_a_lock
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

    # Submitted in descending user order: the statement locks users rows in
    # ascending order, so the batch's results must be put back in order.
    async with held(server, "declares", 5):
        declared = tasks([c.start_upload(f) for c, f in zip(cs, files, strict=True)][::-1])[::-1]
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
            [c.request({"t": "commit", "upload": u}) for c, u in zip(cs, ids, strict=True)][::-1]
        )[::-1]
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
    # The lowest id, its request submitted last: the statement runs it first, so a
    # result given back in the statement's order would reach another session.
    poor = users[0][1]
    await db.execute("UPDATE users SET quota = 100 WHERE id = $1", poor)
    data = [os.urandom(2000) for _ in cs]

    async with held(server, "declares", 3):
        declared = tasks([c.start_upload([d]) for c, d in zip(cs, data, strict=True)][::-1])[::-1]
    oks = await asyncio.gather(*declared)
    assert [ok["t"] for ok in oks] == ["error", "upload_ok", "upload_ok"], oks
    assert oks[0]["code"] == "quota_exceeded"
    assert not await db.fetchval("SELECT count(*) FROM uploads WHERE user_id = $1", poor)

    # Now declared, then its quota shrinks: refused at commit, in the same batch.
    await db.execute("UPDATE users SET quota = 10000 WHERE id = $1", poor)
    again = await cs[0].start_upload([data[0]])
    assert again["t"] == "upload_ok", again
    ids = [again["upload"], oks[1]["upload"], oks[2]["upload"]]
    for c, u, d in zip(cs, ids, data, strict=True):
        await c.send_parts(u, [d])
    await db.execute("UPDATE users SET quota = 100 WHERE id = $1", poor)
    async with held(server, "commits", 3):
        commits = tasks(
            [c.request({"t": "commit", "upload": u}) for c, u in zip(cs, ids, strict=True)][::-1]
        )[::-1]
    done = await asyncio.gather(*commits)
    assert [d["t"] for d in done] == ["error", "committed", "committed"], done
    assert done[0]["code"] == "quota_exceeded"
    assert await db.fetchval("SELECT used FROM users WHERE id = $1", poor) == 0
    assert not await db.fetchval("SELECT count(*) FROM objects WHERE owner_id = $1", poor)
    assert await db.fetchval("SELECT state FROM uploads WHERE id = $1", ids[0]) == "open"
    for (_, uid), d, c in zip(users[1:], data[1:], done[1:], strict=True):
        assert await db.fetchval("SELECT used FROM users WHERE id = $1", uid) == len(d)
        assert await db.fetchval("SELECT owner_id FROM objects WHERE id = $1", c["object"]) == uid
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
    outcomes = server.call(both)
    assert uploads.declares.stats.split == split + 1
    # Alone, the two run at once: either may take the id.
    won = [i for i, o in enumerate(outcomes) if not isinstance(o, BaseException)]
    assert len(won) == 1, outcomes
    (winner,) = won
    assert outcomes[winner]["outcome"] == "declared"
    assert isinstance(outcomes[1 - winner], asyncpg.UniqueViolationError)
    owner = await db.fetchval("SELECT user_id FROM uploads WHERE id = $1", upload)
    assert owner == users[winner][1]
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


async def test_a_data_error_in_a_batch_is_that_writes_alone(make_server, db):
    """A value PostgreSQL cannot take (a NUL in text) fails its own write, not the
    batch's others: the statement is refused (nothing committed), so the batch
    splits and each runs alone. The server refuses NUL before any statement (the
    frames, REST's ``endpoint`` and ``read_json``); this is the group's own guard."""
    server = make_server()
    ((client, uid),) = await clients(server, db, 1, "nul")
    data = [os.urandom(800)]
    ok = await client.start_upload(data)
    await client.send_parts(ok["upload"], data)
    uploads = server.services.uploads

    async def both() -> list[Any]:
        uploads.reads.concurrency = 0
        runs = [
            asyncio.ensure_future(uploads.reads.submit((upload, uid), frozenset()))
            for upload in ("a\x00b", ok["upload"])
        ]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        uploads.reads.concurrency = 2
        return await asyncio.gather(*runs, return_exceptions=True)

    split = uploads.reads.stats.split
    bad, good = server.call(both)
    assert uploads.reads.stats.split == split + 1
    assert isinstance(bad, asyncpg.DataError), bad
    assert good["id"] == ok["upload"] and good["state"] == "open"
    await client.close()


async def test_an_abort_failed_to_break_a_deadlock_runs_again(make_server, db):
    """An abort's cascade locks its upload's part rows one by one; a transaction
    holding one of them and waiting for another (as a batch of part receipts may)
    deadlocks with it. PostgreSQL fails the one whose wait is checked first, here
    the abort (it waited first); it rolled back, so the abort runs again."""
    server = make_server()
    ((client, _),) = await clients(server, db, 1, "deadlock")
    data = [os.urandom(500), os.urandom(600)]
    ok = await client.start_upload(data)
    upload = ok["upload"]
    before = await db.fetchval(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    )
    async with db.transaction():
        await db.execute(
            "SELECT 1 FROM upload_parts WHERE upload_id = $1 AND idx = 1 FOR UPDATE", upload
        )
        aborted = asyncio.ensure_future(client.request({"t": "abort", "upload": upload}))
        # The abort has part 0 and waits for part 1.
        await until_a_statement_waits_on_a_lock(db, "%DELETE FROM uploads WHERE id%", "(abort)")
        # Deadlock: this waits for part 0, which the abort holds (until it fails).
        await db.execute(
            "SELECT 1 FROM upload_parts WHERE upload_id = $1 AND idx = 0 FOR UPDATE", upload
        )
    reply = await aborted
    assert reply["t"] == "ok", reply
    await db.execute("SELECT pg_stat_clear_snapshot()")
    after = await db.fetchval(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    )
    assert after == before + 1
    assert not await db.fetchval("SELECT count(*) FROM uploads WHERE id = $1", upload)
    await client.close()


@pytest.mark.parametrize("step", ["declares", "commits"])
async def test_a_batch_cut_off_by_one_sessions_end_is_settled_before_that_end(
    make_server, db, ended, step
):
    """As test_e2e_upload_edges' cut-off test, for a batch of two: once the batch's
    statement runs, it commits whatever becomes of either session, so a session
    that ends while it runs (its client vanished) waits for the outcome, and the
    other session gets its answer. The statement waits on a lock of the first
    user's row the test holds while the first client's socket is cut."""
    server = make_server()
    users = await clients(server, db, 2, "cutbatch")
    (first, first_id), (second, second_id) = users
    requests: list[Frame] = []
    for client, _ in users:
        data = [os.urandom(1500)]
        if step == "commits":
            ok = await client.start_upload(data)
            await client.send_parts(ok["upload"], data)
            requests.append({"t": "commit", "rid": 99, "upload": ok["upload"]})
        else:
            requests.append(
                {"t": "upload", "rid": 99, "kind": "file", "meta": meta(),
                 "parts": [part_spec(data[0])]}
            )  # fmt: skip
    # The start of the batch's statement (pg_stat_activity keeps only its first 1 KiB).
    start = "q(id, usr, payer" if step == "declares" else "q(upload, usr, kind"
    group: GroupCommit[Any, Any] = getattr(server.services.uploads, step)
    name = await db.fetchval("SELECT username FROM users WHERE id = $1", first_id)
    async with db.transaction():
        await db.execute("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE", first_id)
        async with held(server, step, 2):
            for (client, _), request in zip(users, requests, strict=True):
                await client.send(request)
        await until_a_statement_waits_on_a_lock(db, f"%WITH ORDINALITY AS {start}%", "(batch)")
        assert group.stats.largest >= 2
        await cut_and_see_it_settle(first, name, ended)
    await until_ended(name, ended)
    reply = await second.wait_for(lambda f: f.get("rid") == 99)
    assert reply["t"] == ("committed" if step == "commits" else "upload_ok"), reply
    expect = "committed" if step == "commits" else "open"
    for uid in (first_id, second_id):
        assert await db.fetchval("SELECT state FROM uploads WHERE user_id = $1", uid) == expect
    await second.close()
