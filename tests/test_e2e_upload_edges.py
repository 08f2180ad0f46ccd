"""Edge cases of chunk handling around the moment a part completes."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from tests.conftest import cut_and_see_it_settle, unique, until_ended
from tests.support.client import SyncClient, meta, part_spec, register_login
from tests.support.db import until_a_statement_waits_on_a_lock


async def test_chunks_after_a_complete_part_are_refused_and_nothing_breaks(server, alice):
    client = await SyncClient.connect(server.ws, alice["access"])
    data = os.urandom(200_000)
    ok = await client.start_upload([data])
    upload = ok["upload"]
    await client.send_parts(upload, [data], wait=False)
    # Right behind the last chunk, before the part can have been stored:
    await client.send_chunk(upload, 0, len(data), b"")
    await client.send_chunk(upload, 0, len(data), b"extra")
    errors = []
    stored = False
    while len(errors) < 2 or not stored:
        frame = await client.wait_for(lambda f: f.get("upload") == upload)
        if frame["t"] == "part_ok":
            stored = True
        else:
            errors.append(frame)
    assert [e["code"] for e in errors] == ["bad_offset", "bad_offset"]
    assert all(e["expected"] == len(data) for e in errors)
    done = await client.request({"t": "commit", "upload": upload})
    assert done["t"] == "committed", done
    change = await client.wait_for(lambda f: f["t"] == "change" and f["seq"] == done["seq"])
    assert await client.download(change["parts"][0]["id"]) == data
    assert (await client.request({"t": "ping"}))["t"] == "pong"
    await client.close()


async def test_commit_right_after_last_chunk_waits_for_the_part(server, alice):
    client = await SyncClient.connect(server.ws, alice["access"])
    parts = [os.urandom(300_000), os.urandom(300_000)]
    ok = await client.start_upload(parts)
    await client.send_parts(ok["upload"], parts, wait=False)
    done = await client.request({"t": "commit", "upload": ok["upload"]})  # no part_ok awaited
    assert done["t"] == "committed", done
    await client.close()


async def test_many_concurrent_commits_finish(server, alice):
    """More concurrent commits than pooled connections all finish. (Each once held an
    advisory-lock connection from the same pool, which starved the others.)"""
    client = await SyncClient.connect(server.ws, alice["access"])
    uploads = []
    for _ in range(30):
        data = os.urandom(1000)
        ok = await client.start_upload([data])
        await client.send_parts(ok["upload"], [data])
        uploads.append(ok["upload"])
    rids = [client.rid() for _ in uploads]
    for rid, upload in zip(rids, uploads, strict=True):
        await client.send({"t": "commit", "rid": rid, "upload": upload})
    replies = [await client.wait_for(lambda f, r=rid: f.get("rid") == r, 30) for rid in rids]
    assert [r["t"] for r in replies] == ["committed"] * 30
    assert len({r["object"] for r in replies}) == 30
    await client.close()


async def test_a_sessions_parts_are_stored_side_by_side_up_to_the_stores_bound(
    make_server, store_kind, monkeypatch
):
    """LocalStore puts are renames and fsyncs: a session stores several parts at once
    (with two at a time, a 1 GiB upload's parts queued for up to 1.2 s). S3 puts
    stream the spool file, so they are bounded by the endpoint's pace, not by memory:
    ``parallel_puts`` (4) at once."""
    server = make_server(store_kind)
    store = server.services.store
    put_file = store.put_file
    now, most = 0, 0
    company: asyncio.Event | None = None  # made in the server's loop, on first use

    async def gated(*args, **kwargs):
        nonlocal now, most, company
        company = company or asyncio.Event()
        now += 1
        most = max(most, now)
        if now >= 4:
            company.set()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await company.wait()
            await put_file(*args, **kwargs)
        finally:
            now -= 1

    monkeypatch.setattr(store, "put_file", gated)
    tokens = await register_login(server.http, unique("parallel"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    parts = [os.urandom(100_000) for _ in range(6)]  # spooled: above the in-memory size
    ok = await client.start_upload(parts)
    await client.send_parts(ok["upload"], parts)
    done = await client.request({"t": "commit", "upload": ok["upload"]})
    assert done["t"] == "committed", done
    if store_kind == "local":
        assert most >= 4
    else:
        assert most == store.parallel_puts == 4
    await client.close()


async def test_a_revision_of_an_object_over_2_gib_commits_and_refunds_the_quota(server, alice, db):
    """The quota delta of a commit is a bigint: it overflowed int4 (an internal
    error) for any object of 2 GiB or more, found by a 2 GiB upload bench."""
    client = await SyncClient.connect(server.ws, alice["access"])
    user = client.welcome["user"]
    first = await client.push([b"v1"])
    huge = 3 << 30
    # As if rev 1 had been 3 GiB (sending 3 GiB here would cost the suite seconds).
    await db.execute("UPDATE objects SET size = $2 WHERE id = $1", first["object"], huge)
    await db.execute(
        "UPDATE users SET quota = greatest(quota, 2 * $2::bigint), used = used - 2 + $2 "
        "WHERE id = $1",
        user,
        huge,
    )
    second = await client.push([b"v2"], obj=first["object"], base=1)
    assert second["rev"] == 2, second
    assert await db.fetchval("SELECT used FROM users WHERE id = $1", user) == 2
    await client.close()


async def test_a_failed_spool_write_fails_the_part_and_a_resend_stores_it(make_server):
    server = make_server()
    spool = Path(server.services.spool_dir)
    tokens = await register_login(server.http, unique("spoolfail"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    data = os.urandom(200_000)  # spooled: above the in-memory size
    ok = await client.start_upload([data])
    upload = ok["upload"]
    away = spool.with_name("spool.away")

    def block() -> None:
        spool.rename(away)
        spool.write_bytes(b"")  # a file where the directory was: every open fails

    def unblock() -> None:
        spool.unlink()
        away.rename(spool)

    await asyncio.to_thread(block)
    try:
        await client.send_chunk(upload, 0, 0, data)
        error = await client.wait_for(lambda f: f.get("upload") == upload)
    finally:
        await asyncio.to_thread(unblock)
    assert error["t"] == "error" and error["code"] == "unavailable", error
    assert error["part"] == 0
    # The credit of the failed chunk came back, and the part starts again from 0.
    await client.send_parts(upload, [data])
    done = await client.request({"t": "commit", "upload": upload})
    assert done["t"] == "committed", done
    change = await client.wait_for(lambda f: f["t"] == "change" and f["seq"] == done["seq"])
    assert await client.download(change["parts"][0]["id"]) == data
    await client.close()


async def test_a_session_dropped_mid_upload_leaves_no_spool_file(make_server):
    """Chunks of three parts still queued for their ingest threads when the socket
    goes: each part's discard runs after its writes, and nothing is left."""
    server = make_server()
    spool = Path(server.services.spool_dir)
    tokens = await register_login(server.http, unique("spooldrop"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    parts = [os.urandom(3 << 20) for _ in range(3)]
    ok = await client.start_upload(parts)
    upload = ok["upload"]
    for off in range(0, 2 << 20, 1 << 20):
        for i, part in enumerate(parts):
            await client.send_chunk(upload, i, off, part[off : off + (1 << 20)])
    client.ws.transport.abort()
    deadline = asyncio.get_running_loop().time() + 15
    while left := await asyncio.to_thread(lambda: list(spool.iterdir())):
        assert asyncio.get_running_loop().time() < deadline, left
        await asyncio.sleep(0.05)
    # The upload is still open: a new session resumes it with every part missing.
    client = await SyncClient.connect(server.ws, tokens["access"])
    resumed = await client.request({"t": "resume", "upload": upload})
    assert resumed["t"] == "upload_ok", resumed
    await client.send_parts(upload, parts, chunk=1 << 20)
    done = await client.request({"t": "commit", "upload": upload})
    assert done["t"] == "committed", done
    await client.close()


async def test_a_new_object_that_no_longer_fits_at_commit_writes_nothing(server, db):
    """The quota is checked again at commit (here an operator lowered it after the
    declaration): refused with nothing written, the upload stays open, and the
    same commit goes through once it fits. Then tessera_commit_new itself, on an
    upload already committed and on one that does not exist."""
    name = unique("fits")
    tokens = await register_login(server.http, name)
    client = await SyncClient.connect(server.ws, tokens["access"])
    uid = await db.fetchval("SELECT id FROM users WHERE username = $1", name)
    parts = [os.urandom(3000), os.urandom(5000)]
    ok = await client.start_upload(parts)
    assert ok["t"] == "upload_ok", ok
    await client.send_parts(ok["upload"], parts)
    quota = await db.fetchval("UPDATE users SET quota = 7999 WHERE id = $1 RETURNING 8000", uid)
    refused = await client.request({"t": "commit", "upload": ok["upload"]})
    assert refused["t"] == "error" and refused["code"] == "quota_exceeded", refused
    assert await db.fetchval("SELECT count(*) FROM objects WHERE owner_id = $1", uid) == 0
    assert await db.fetchval("SELECT used FROM users WHERE id = $1", uid) == 0
    again = await client.request({"t": "resume", "upload": ok["upload"]})
    assert again["t"] == "upload_ok" and sorted(again["have"]) == [0, 1], again

    await db.execute("UPDATE users SET quota = $2 WHERE id = $1", uid, quota)
    done = await client.request({"t": "commit", "upload": ok["upload"]})
    assert done["t"] == "committed", done
    change = await client.wait_for(lambda f: f["t"] == "change" and f["seq"] == done["seq"])
    assert [await client.download(p["id"]) for p in change["parts"]] == parts
    assert await db.fetchval("SELECT used FROM users WHERE id = $1", uid) == 8000

    def call(upload: str) -> str:
        return f"""SELECT * FROM tessera_commit_new('{upload}', {uid}, 'file', 1, '', '', '', '',
                   NULL, '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', 60)"""

    won = await db.fetchrow(call(ok["upload"]))
    assert tuple(won) == ("won", done["object"], 1, done["seq"])
    assert tuple(await db.fetchrow(call("no-such-upload"))) == ("aborted", None, None, None)
    assert await db.fetchval("SELECT count(*) FROM objects WHERE owner_id = $1", uid) == 1
    assert await db.fetchval("SELECT used FROM users WHERE id = $1", uid) == 8000
    await client.close()


@pytest.mark.parametrize("step", ["tessera_declare", "tessera_commit_new"])
async def test_a_statement_cut_off_by_its_sessions_end_is_settled_before_the_end(
    make_server, db, ended, step
):
    """A declaration, or a new object's commit, is one statement (grouped with
    others': server/groupcommit.py): once PostgreSQL runs it, it commits whatever
    becomes of the session. So a session that ends (here the client vanished)
    waits for the statement's outcome, as for a put, and never leaves one landing
    after it is gone. Here the statement waits on a row lock the test holds,
    while the client's socket is cut."""
    server = make_server()
    name = unique("cutoff")
    tokens = await register_login(server.http, name)
    client = await SyncClient.connect(server.ws, tokens["access"], device=name)
    uid = await db.fetchval("SELECT id FROM users WHERE username = $1", name)
    parts = [os.urandom(2000)]
    if step == "tessera_commit_new":
        ok = await client.start_upload(parts)
        await client.send_parts(ok["upload"], parts)
        request = {"t": "commit", "rid": 99, "upload": ok["upload"]}
    else:
        request = {"t": "upload", "rid": 99, "kind": "file", "meta": meta()}
        request["parts"] = [part_spec(parts[0])]
    async with db.transaction():
        await db.execute("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE", uid)
        await client.send(request)
        await until_a_statement_waits_on_a_lock(db, f"%{step}%")
        await cut_and_see_it_settle(client, name, ended)
    await until_ended(name, ended)
    state = await db.fetchval("SELECT state FROM uploads WHERE user_id = $1", uid)
    assert state == ("committed" if step == "tessera_commit_new" else "open")
