"""``put``: a one-part file declared, sent and committed in one frame."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import time
from typing import Any

import asyncpg
import httpx
import pytest

from server import keys
from server import uploads as uploads_module
from server.stores import StoreError
from tests.conftest import unique
from tests.support.client import SyncClient, part_spec, register_login
from tests.support.db import until_a_statement_waits_on_a_lock


async def _stored_keys(server, prefix: str) -> set[str]:
    """Keys under ``prefix``, listed in the server's own loop (its S3 client lives there)."""

    async def listing() -> set[str]:
        return {info.key async for info in server.services.store.list(prefix)}

    return await asyncio.to_thread(server.call, listing)


async def _count(db, sql: str, *args) -> int:
    return int(await db.fetchval(sql, *args))


async def test_put_commits_a_new_file_that_every_device_gets(make_server, store_kind, db):
    server = make_server(store_kind)
    tokens = await register_login(server.http, unique("put"))
    a = await SyncClient.connect(server.ws, tokens["access"], device="a")
    b = await SyncClient.connect(server.ws, tokens["access"], device="b")
    user = a.welcome["user"]
    data = os.urandom(5000)
    done = await a.put(a.put_frame(data))
    assert done["t"] == "committed", done
    assert done["rev"] == 1 and done["seq"] >= 1
    change = await b.wait_for(lambda f: f["t"] == "change" and f["seq"] == done["seq"])
    assert change["object"] == done["object"] and change["rev"] == 1
    assert [p["size"] for p in change["parts"]] == [len(data)]
    assert await b.download(change["parts"][0]["id"]) == data
    assert await a.download(change["parts"][0]["id"]) == data
    assert await _count(db, "SELECT used FROM users WHERE id = $1", user) == len(data)
    # Straight to its final key: nothing was staged.
    assert await _stored_keys(server, f"staging/{user}/") == set()
    assert await _stored_keys(server, f"partitions/{user}/") == {
        keys.partition_key(user, change["parts"][0]["id"])
    }
    await a.close()
    await b.close()


async def test_a_resent_put_gets_the_first_result_and_creates_nothing(server, alice, db):
    client = await SyncClient.connect(server.ws, alice["access"])
    user = client.welcome["user"]
    data = os.urandom(3000)
    frame = client.put_frame(data)
    first = await client.put(frame)
    assert first["t"] == "committed", first
    again = await client.put({**frame, "rid": client.rid()})
    assert again["t"] == "committed", again
    assert (again["object"], again["rev"], again["seq"]) == (
        first["object"],
        first["rev"],
        first["seq"],
    )
    # Other bytes under the same id: still the first put's answer, not a second object.
    other = await client.put({**client.put_frame(os.urandom(10)), "upload": frame["upload"]})
    assert other["object"] == first["object"], other
    assert await _count(db, "SELECT count(*) FROM objects WHERE owner_id = $1", user) == 1
    assert await _count(db, "SELECT used FROM users WHERE id = $1", user) == len(data)
    await asyncio.sleep(0.3)  # the resends' partitions are deleted in the background
    assert len(await _stored_keys(server, f"partitions/{user}/")) == 1
    await client.close()


async def test_concurrent_resends_of_one_put_commit_once(server, alice, db):
    client = await SyncClient.connect(server.ws, alice["access"])
    user = client.welcome["user"]
    frame = client.put_frame(os.urandom(2000))
    copies = [{**frame, "rid": client.rid()} for _ in range(5)]
    for copy in copies:
        await client.wait_credit(len(copy["data"]))
        await client.send(copy)
    replies = [await client.wait_for(lambda f, r=c["rid"]: f.get("rid") == r) for c in copies]
    assert {r["t"] for r in replies} == {"committed"}, replies
    assert len({(r["object"], r["seq"]) for r in replies}) == 1
    assert await _count(db, "SELECT count(*) FROM objects WHERE owner_id = $1", user) == 1
    await client.close()


async def test_wrong_hash_or_size_stores_nothing_and_returns_the_credit(server, alice, db):
    client = await SyncClient.connect(server.ws, alice["access"])
    user = client.welcome["user"]
    window = client.welcome["limits"]["window"]
    data = os.urandom(4000)
    wrong_hash = {**part_spec(data), "sha256": hashlib.sha256(b"other").digest()}
    wrong_size = {**part_spec(data), "size": len(data) + 1}
    for spec in (wrong_hash, wrong_size):
        refused = await client.put(client.put_frame(data, spec=spec))
        assert refused["t"] == "error" and refused["code"] == "hash_mismatch", refused
        assert refused["rid"] is not None and "upload" in refused
    assert await _count(db, "SELECT count(*) FROM objects WHERE owner_id = $1", user) == 0
    assert await _count(db, "SELECT count(*) FROM uploads WHERE user_id = $1", user) == 0
    assert await _stored_keys(server, f"partitions/{user}/") == set()
    # Every byte of the refused puts' credit comes back.
    await client.wait_credit(window)
    client.credit = window
    big = os.urandom(client.welcome["limits"]["max_chunk"])
    done = await client.put(client.put_frame(big))
    assert done["t"] == "committed", done
    await client.close()


async def test_put_data_over_max_chunk_is_too_large(server, alice):
    client = await SyncClient.connect(server.ws, alice["access"])
    data = os.urandom(client.welcome["limits"]["max_chunk"] + 1)
    refused = await client.put(client.put_frame(data))
    assert refused["t"] == "error" and refused["code"] == "too_large", refused
    client.credit += len(data)  # not charged: the server dropped it at once
    assert (await client.put(client.put_frame(b"fine")))["t"] == "committed"
    await client.close()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"upload": "short"}, "put.upload"),
        ({"upload": "x" * 15 + "/"}, "put.upload"),
        ({"part": None}, "put.part"),
        ({"object": 5}, "go together"),
        ({"data": "text"}, "put.data"),
    ],
)
async def test_malformed_puts_close_the_session(server, alice, change, reason):
    client = await SyncClient.connect(server.ws, alice["access"])
    frame = {**client.put_frame(b"abc"), **change}
    if frame["part"] is None:
        del frame["part"]
    await client.send(frame)
    code, why = await client.closed()
    assert code == 4400 and reason in why, why


async def test_put_a_new_revision_and_a_stale_one(server, alice, db):
    client = await SyncClient.connect(server.ws, alice["access"])
    user = client.welcome["user"]
    first = await client.put(client.put_frame(os.urandom(1000)))
    obj = first["object"]
    data = os.urandom(70_000)  # over the in-memory part size: spooled like a chunk
    frame = client.put_frame(data, obj=obj, base=1)
    second = await client.put(frame)
    assert second["t"] == "committed" and second["object"] == obj and second["rev"] == 2, second
    change = await client.wait_for(lambda f: f["t"] == "change" and f["seq"] == second["seq"])
    assert await client.download(change["parts"][0]["id"]) == data
    assert await _count(db, "SELECT used FROM users WHERE id = $1", user) == len(data)
    stale = await client.put(client.put_frame(b"late", obj=obj, base=1))
    assert stale["t"] == "error" and stale["code"] == "conflict" and stale["rev"] == 2, stale
    # Refused at declaration: nothing left open to reserve the quota.
    open_ = "SELECT count(*) FROM uploads WHERE user_id = $1 AND state = 'open'"
    assert await _count(db, open_, user) == 0
    # A resend of the committed revision gets its result, though its base is stale now.
    resend = await client.put({**frame, "rid": client.rid()})
    assert resend["t"] == "committed" and resend["seq"] == second["seq"], resend
    await client.close()


async def _open_upload(conn, upload: str, user: int, size: int) -> None:
    """An unfinished upload of a new object, as a declaration leaves it."""
    await conn.execute(
        "INSERT INTO uploads (id, user_id, kind, enc_name, enc_mtime, enc_key, salt, "
        "declared_parts, size, expires_at) "
        "VALUES ($1, $2, 'file', '', '', '', '', 1, $3, now() + interval '1 hour')",
        upload,
        user,
        size,
    )


async def _declared_only(db, user: int, obj: int, frame: dict) -> None:
    """As if a first attempt of ``frame`` got as far as its declaration and no
    further (the connection dropped right after)."""
    await db.execute(
        """INSERT INTO uploads (id, user_id, object_id, base_rev, kind, enc_name, enc_mtime,
               enc_key, salt, declared_parts, size, expires_at)
           VALUES ($1, $2, $3, 1, 'file', '', '', '', '', 1, $4, now() + interval '1 hour')""",
        frame["upload"],
        user,
        obj,
        frame["part"]["size"],
    )
    await db.execute(
        "INSERT INTO upload_parts (upload_id, idx, size, sha256, enc_key, salt) "
        "VALUES ($1, 0, $2, $3, $4, $5)",
        frame["upload"],
        frame["part"]["size"],
        frame["part"]["sha256"],
        frame["part"]["key"],
        frame["part"]["salt"],
    )


async def test_a_revision_put_cut_off_before_its_commit_finishes_when_resent(server, alice, db):
    client = await SyncClient.connect(server.ws, alice["access"])
    user = client.welcome["user"]
    obj = (await client.put(client.put_frame(b"v1")))["object"]
    frame = client.put_frame(b"v2 of the file", obj=obj, base=1)
    upload = frame["upload"]
    await _declared_only(db, user, obj, frame)  # the resend stores the part and commits
    done = await client.put(frame)
    assert done["t"] == "committed" and done["rev"] == 2, done
    state = await db.fetchval("SELECT state FROM uploads WHERE id = $1", upload)
    assert state == "committed"
    await client.close()


async def test_a_resend_with_other_bytes_than_its_declaration_is_refused(server, alice, db):
    """The data matches the resend's own ``part``, but not the part the first attempt
    declared under the same id: nothing is stored, the upload stays as it was."""
    client = await SyncClient.connect(server.ws, alice["access"])
    user = client.welcome["user"]
    obj = (await client.put(client.put_frame(b"v1")))["object"]
    first = client.put_frame(b"what was declared", obj=obj, base=1)
    await _declared_only(db, user, obj, first)
    other = {**client.put_frame(b"other bytes", obj=obj, base=1), "upload": first["upload"]}
    refused = await client.put(other)
    assert refused["t"] == "error" and refused["code"] == "hash_mismatch", refused
    row = await db.fetchrow(
        "SELECT u.state, p.received FROM uploads u JOIN upload_parts p ON p.upload_id = u.id "
        "WHERE u.id = $1",
        first["upload"],
    )
    assert (row["state"], row["received"]) == ("open", False)
    assert await _stored_keys(server, f"staging/{user}/") == set()
    assert (await client.put({**first, "rid": client.rid()}))["rev"] == 2  # the right bytes
    await client.close()


async def test_other_users_objects_and_ids_are_out_of_reach(server, alice, bob, db):
    a = await SyncClient.connect(server.ws, alice["access"])
    b = await SyncClient.connect(server.ws, bob["access"])
    mine = await a.put(a.put_frame(b"alice's"))
    theirs = await b.put(b.put_frame(b"x", obj=mine["object"], base=1))
    assert theirs["t"] == "error" and theirs["code"] == "not_found", theirs
    # Alice's put id, used by Bob: refused, and it says nothing about Alice's object.
    frame = a.put_frame(b"alice again")
    assert (await a.put(frame))["t"] == "committed"
    taken = await b.put({**b.put_frame(b"bob's"), "upload": frame["upload"]})
    assert taken["t"] == "error" and taken["code"] == "conflict", taken
    assert "object" not in taken and "rev" not in taken
    bob_id = b.welcome["user"]
    assert await _count(db, "SELECT count(*) FROM objects WHERE owner_id = $1", bob_id) == 0
    await asyncio.sleep(0.3)  # refused partitions are deleted in the background
    assert await _stored_keys(server, f"partitions/{bob_id}/") == set()
    await a.close()
    await b.close()


async def test_put_over_the_quota_is_refused_and_keeps_nothing(make_server, db):
    server = make_server(default_quota=1000)
    tokens = await register_login(server.http, unique("putquota"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    user = client.welcome["user"]
    reserved = await client.start_upload([os.urandom(600)])  # reserves 600
    assert reserved["t"] == "upload_ok"
    over = await client.put(client.put_frame(os.urandom(500)))
    assert over["t"] == "error" and over["code"] == "quota_exceeded", over
    assert await _count(db, "SELECT used FROM users WHERE id = $1", user) == 0
    await asyncio.sleep(0.3)  # the refused partition is deleted in the background
    assert await _stored_keys(server, f"partitions/{user}/") == set()
    fits = await client.put(client.put_frame(os.urandom(400)))
    assert fits["t"] == "committed", fits
    assert await _count(db, "SELECT used FROM users WHERE id = $1", user) == 400
    await client.close()


async def test_a_put_cut_off_by_a_dropped_connection_is_resent_once(server, alice, db):
    user_client = await SyncClient.connect(server.ws, alice["access"])
    user = user_client.welcome["user"]
    frame = user_client.put_frame(os.urandom(30_000))
    await user_client.send(frame)
    user_client.ws.transport.abort()  # gone without a close handshake
    again = await SyncClient.connect(server.ws, alice["access"])
    done = await again.put({**frame, "rid": again.rid()})
    assert done["t"] == "committed", done
    assert await _count(db, "SELECT count(*) FROM objects WHERE owner_id = $1", user) == 1
    change = await again.wait_for(lambda f: f["t"] == "change" and f["object"] == done["object"])
    assert await again.download(change["parts"][0]["id"]) == frame["data"]
    await again.close()


async def test_puts_are_counted_as_commits(server, alice):
    client = await SyncClient.connect(server.ws, alice["access"])
    before = server.services.counters.commits
    for _ in range(3):
        assert (await client.put(client.put_frame(secrets.token_bytes(50))))["t"] == "committed"
    assert server.services.counters.commits == before + 3
    await client.close()


async def test_puts_refused_by_the_frame_rate_give_their_credit_back(make_server):
    window = 256 * 1024
    server = make_server(frame_rate=20, window=window, max_chunk=64 * 1024, max_frame=128 * 1024)
    tokens = await register_login(server.http, unique("putflood"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    frames = [client.put_frame(os.urandom(1024)) for _ in range(100)]
    for frame in frames:
        await client.wait_credit(len(frame["data"]))
        await client.send(frame)
    replies = [await client.wait_for(lambda f, r=f["rid"]: f.get("rid") == r) for f in frames]
    refused = [r for r in replies if r["t"] == "error"]
    assert refused and all(r["code"] == "rate_limited" and r["retry"] for r in refused)
    assert len(refused) < len(replies)
    await client.wait_credit(window)  # every byte is back, refused puts' too
    await client.close()


async def test_put_data_counts_against_the_byte_rate(make_server):
    rate = 256 * 1024
    server = make_server(byte_rate=rate, window=rate, max_chunk=64 * 1024, max_frame=128 * 1024)
    tokens = await register_login(server.http, unique("putslow"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    started = time.monotonic()
    for _ in range(12):  # 3 x rate in all: the burst, then >= 2 s
        assert (await client.put(client.put_frame(os.urandom(64 * 1024))))["t"] == "committed"
    elapsed = time.monotonic() - started
    assert elapsed >= 1.8, f"{12 * 64} KiB of puts in {elapsed:.2f}s at {rate} B/s"
    await client.close()


def _rest_put(frame: dict) -> dict:
    """A WebSocket ``put`` frame as the JSON body of ``POST /v1/put``."""

    def b64(value: bytes) -> str:
        return base64.b64encode(value).decode()

    body = {
        "upload": frame["upload"],
        "meta": {k: b64(v) for k, v in frame["meta"].items()},
        "part": {
            "size": frame["part"]["size"],
            **{k: b64(frame["part"][k]) for k in ("sha256", "key", "salt")},
        },
        "data": b64(frame["data"]),
    }
    for name in ("object", "base"):
        if name in frame:
            body[name] = frame[name]
    return body


async def test_put_over_rest_is_the_same_put(server, alice, db):
    client = await SyncClient.connect(server.ws, alice["access"])
    user = client.welcome["user"]
    headers = {"Authorization": f"Bearer {alice['access']}"}
    data = os.urandom(2000)
    frame = client.put_frame(data)
    async with httpx.AsyncClient(base_url=server.http, headers=headers) as http:
        r = await http.post("/v1/put", json=_rest_put(frame))
        assert r.status_code == 200, r.text
        done = r.json()
        assert done["rev"] == 1 and done["seq"] >= 1
        # The WebSocket session sees it as a change, and a resend on either side
        # (same id) gets the same answer.
        change = await client.wait_for(lambda f: f["t"] == "change" and f["seq"] == done["seq"])
        assert await client.download(change["parts"][0]["id"]) == data
        again = await http.post("/v1/put", json=_rest_put(frame))
        assert again.status_code == 200 and again.json() == done
        ws_again = await client.put({**frame, "rid": client.rid()})
        assert (ws_again["object"], ws_again["seq"]) == (done["object"], done["seq"])
        # A new revision over REST, then a stale one.
        rev2 = client.put_frame(b"second", obj=done["object"], base=1)
        r = await http.post("/v1/put", json=_rest_put(rev2))
        assert r.status_code == 200 and r.json()["rev"] == 2, r.text
        stale = client.put_frame(b"third", obj=done["object"], base=1)
        r = await http.post("/v1/put", json=_rest_put(stale))
        assert r.status_code == 409 and r.json()["error"]["rev"] == 2, r.text
        # Bad input: the same checks as the frame, as JSON errors.
        wrong = client.put_frame(data, spec={**part_spec(data), "sha256": bytes(32)})
        r = await http.post("/v1/put", json=_rest_put(wrong))
        assert r.status_code == 400 and r.json()["error"]["code"] == "hash_mismatch", r.text
        r = await http.post("/v1/put", json={**_rest_put(client.put_frame(data)), "upload": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_frame", r.text
        r = await http.post("/v1/put", json={**_rest_put(client.put_frame(data)), "data": "%%"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_frame", r.text
        big = os.urandom(client.welcome["limits"]["max_chunk"] + 1)
        r = await http.post("/v1/put", json=_rest_put(client.put_frame(big)))
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
    async with httpx.AsyncClient(base_url=server.http) as anonymous:
        r = await anonymous.post("/v1/put", json=_rest_put(client.put_frame(data)))
        assert r.status_code == 401, r.text
    assert await _count(db, "SELECT count(*) FROM objects WHERE owner_id = $1", user) == 1
    await client.close()


async def _pause_puts(server) -> None:
    async def pause() -> None:
        server.services.uploads.puts.concurrency = 0

    await asyncio.to_thread(server.call, pause)


async def _wait_pending(server, pending: int) -> None:
    async def count() -> int:
        return server.services.uploads.puts.pending

    deadline = time.monotonic() + 20
    while await asyncio.to_thread(server.call, count) < pending:
        assert time.monotonic() < deadline, "the puts never arrived"
        await asyncio.sleep(0.02)


async def _resume_puts_when(server, pending: int) -> None:
    """Once ``pending`` puts wait, let them go: they form batches of many users."""

    async def resume() -> bool:
        group = server.services.uploads.puts
        if group.pending < pending:
            return False
        group.concurrency = 2
        return True

    deadline = time.monotonic() + 20
    while not await asyncio.to_thread(server.call, resume):
        assert time.monotonic() < deadline, "the puts never arrived"
        await asyncio.sleep(0.02)


async def _users_connected(server, name: str, n: int) -> tuple[list[SyncClient], list[int]]:
    """``n`` new users, each with one connected device."""
    clients = []
    for i in range(n):
        tokens = await register_login(server.http, unique(f"{name}{i}"))
        clients.append(await SyncClient.connect(server.ws, tokens["access"]))
    return clients, [c.welcome["user"] for c in clients]


async def _send_together(server, clients: list[SyncClient], frames: list[dict]) -> None:
    """Send one put per client, held until all have arrived: they form one batch."""
    await _pause_puts(server)
    for client, frame in zip(clients, frames, strict=True):
        await client.wait_credit(len(frame["data"]))
        await client.send(frame)
    await _resume_puts_when(server, len(frames))


async def test_puts_of_many_users_share_a_statement_and_each_gets_its_own_answer(
    make_server, store_kind, db
):
    """New-object puts that wait together commit in one statement (group commit),
    yet each put is judged alone: over quota, a resend, another user's id."""
    server = make_server(store_kind, default_quota=50_000)
    clients, tokens = [], []
    for i in range(7):
        tokens.append(await register_login(server.http, unique(f"batch{i}")))
        clients.append(await SyncClient.connect(server.ws, tokens[i]["access"], device="a"))
    watcher = await SyncClient.connect(server.ws, tokens[4]["access"], device="b")
    users = [c.welcome["user"] for c in clients]
    earlier = await clients[0].put(clients[0].put_frame(os.urandom(700)))
    assert earlier["t"] == "committed", earlier
    resend = clients[0].put_frame(os.urandom(700))
    first = await clients[0].put(resend)
    before = server.services.uploads.puts.stats.batches

    await _pause_puts(server)
    sizes = [1000 + i for i in range(7)]
    frames = [c.put_frame(os.urandom(n)) for c, n in zip(clients, sizes, strict=True)]
    frames[0] = {**resend, "rid": clients[0].rid()}  # a resend of a committed put
    frames[5] = clients[5].put_frame(os.urandom(60_000))  # over the quota
    frames[6] = {**frames[6], "upload": resend["upload"]}  # another user's id
    second = clients[1].put_frame(os.urandom(50))  # the same user twice: two batches
    for client, frame in [*zip(clients, frames, strict=True), (clients[1], second)]:
        await client.wait_credit(len(frame["data"]))
        await client.send(frame)
    # 8 puts; user 0's resend and user 6's reused id never reach a statement's insert.
    await _resume_puts_when(server, 8)
    replies = [
        await c.wait_for(lambda f, r=f["rid"]: f.get("rid") == r)
        for c, f in [*zip(clients, frames, strict=True), (clients[1], second)]
    ]
    assert replies[0]["t"] == "committed" and replies[0]["object"] == first["object"]
    assert replies[0]["seq"] == first["seq"]
    for i in (1, 2, 3, 4):
        assert replies[i]["t"] == "committed", replies[i]
    assert [replies[i]["seq"] for i in (2, 3, 4)] == [1, 1, 1]
    assert replies[5]["t"] == "error" and replies[5]["code"] == "quota_exceeded", replies[5]
    assert replies[6]["t"] == "error" and replies[6]["code"] == "conflict", replies[6]
    # User 1's two puts went in either order (their store writes may end in either).
    assert replies[7]["t"] == "committed", replies[7]
    assert {replies[1]["seq"], replies[7]["seq"]} == {1, 2}
    stats = server.services.uploads.puts.stats
    # Users 0-5 in one statement; user 1's second put and user 6's (its id is user
    # 0's) in the next.
    assert stats.batches - before == 2
    assert stats.largest >= 6

    for i, user in enumerate(users):
        objects = await _count(db, "SELECT count(*) FROM objects WHERE owner_id = $1", user)
        used = await _count(db, "SELECT used FROM users WHERE id = $1", user)
        seqs = [
            r["seq"]
            for r in await db.fetch(
                "SELECT seq FROM access_list WHERE user_id = $1 ORDER BY seq", user
            )
        ]
        expected = {0: (2, 1400), 1: (2, 1001 + 50), 5: (0, 0), 6: (0, 0)}.get(i, (1, sizes[i]))
        assert (objects, used) == expected, (i, objects, used)
        assert seqs == list(range(1, objects + 1)), (i, seqs)  # gap-free
    change = await watcher.wait_for(lambda f: f["t"] == "change")
    assert (change["object"], change["seq"]) == (replies[4]["object"], 1)
    assert await watcher.download(change["parts"][0]["id"]) == frames[4]["data"]
    await asyncio.sleep(0.3)  # refused puts' partitions are deleted in the background
    for i in (5, 6):
        assert await _stored_keys(server, f"partitions/{users[i]}/") == set()
    for c in [*clients, watcher]:
        await c.close()


async def test_a_batch_refused_by_the_database_commits_its_puts_one_by_one(
    make_server, db, database_url
):
    """Another transaction takes a batched put's id while the batch runs: the batch's
    statement fails as a whole, then each put runs alone and gets its own answer."""
    server = make_server()
    clients, users = await _users_connected(server, "split", 3)
    frames = [c.put_frame(os.urandom(900 + i)) for i, c in enumerate(clients)]
    taken = db.transaction()
    await taken.start()
    await _open_upload(db, frames[0]["upload"], users[0], 1)
    await _pause_puts(server)
    for client, frame in zip(clients, frames, strict=True):
        await client.wait_credit(len(frame["data"]))
        await client.send(frame)
    await _resume_puts_when(server, 3)
    probe = await asyncpg.connect(database_url)
    await until_a_statement_waits_on_a_lock(probe, "%tessera_put_batch%", "on the uncommitted id")
    await probe.close()
    await taken.commit()
    replies = [
        await c.wait_for(lambda f, r=f["rid"]: f.get("rid") == r)
        for c, f in zip(clients, frames, strict=True)
    ]
    assert replies[0]["t"] == "error" and replies[0]["code"] == "conflict", replies[0]
    assert [r["t"] for r in replies[1:]] == ["committed", "committed"], replies
    assert server.services.uploads.puts.stats.split == 1
    for user, expected in zip(users, (0, 1, 1), strict=True):
        assert (
            await _count(db, "SELECT count(*) FROM objects WHERE owner_id = $1", user) == expected
        )
    for c in clients:
        await c.close()


async def test_a_batch_locks_its_users_in_id_order(make_server, db, database_url):
    """As ``record_change`` does: a transaction holding the lower user's row and
    then taking the higher one's must not deadlock with a batch of both users'
    puts (which, unordered, could hold the higher one and wait for the lower)."""
    server = make_server()
    clients = []
    for i in range(2):
        tokens = await register_login(server.http, unique(f"order{i}"))
        clients.append(await SyncClient.connect(server.ws, tokens["access"]))
    clients.sort(key=lambda c: c.welcome["user"], reverse=True)  # higher user first
    high, low = (c.welcome["user"] for c in clients)
    # The lower user's row now lies after the higher one's in the table, and comes
    # second in the batch: however the plan reads users, unordered locks come high
    # first.
    await db.execute("UPDATE users SET used = used WHERE id = $1", low)
    other = await asyncpg.connect(database_url)
    commit = other.transaction()
    await commit.start()
    # Shorter than deadlock_timeout (1 s): a deadlock fails here, not in the batch.
    await other.execute("SET LOCAL lock_timeout = '500ms'")
    await other.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", low)
    await _pause_puts(server)
    frames = [c.put_frame(os.urandom(300)) for c in clients]
    for n, (client, frame) in enumerate(zip(clients, frames, strict=True), 1):
        await client.send(frame)  # one at a time: the batch is [high, low]
        await _wait_pending(server, n)
    await _resume_puts_when(server, 2)
    await until_a_statement_waits_on_a_lock(db, "%tessera_put_batch%", "for the lower user's row")
    # The higher user's row is free: the batch took nothing out of order.
    await other.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", high)
    await commit.commit()
    await other.close()
    replies = [
        await c.wait_for(lambda f, r=f["rid"]: f.get("rid") == r)
        for c, f in zip(clients, frames, strict=True)
    ]
    assert [r["t"] for r in replies] == ["committed", "committed"], replies
    stats = server.services.uploads.puts.stats
    assert (stats.largest, stats.split) == (2, 0)
    for c in clients:
        await c.close()


async def test_a_put_waiting_for_its_users_row_sees_a_reservation_made_meanwhile(
    make_server, db, database_url
):
    """An upload declared while a put waits for the user's row lock: the put's
    quota check counts the reservation (its statement's snapshot is taken after
    the lock). In one statement it did not, and the quota was overrun."""
    server = make_server(default_quota=1000)
    tokens = await register_login(server.http, unique("putrace"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    user = client.welcome["user"]
    other = await asyncpg.connect(database_url)
    declare = other.transaction()
    await declare.start()  # what a declaration does: lock the user, reserve
    await other.execute("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE", user)
    await _open_upload(other, secrets.token_urlsafe(16), user, 600)
    frame = client.put_frame(os.urandom(500))
    await client.send(frame)
    await until_a_statement_waits_on_a_lock(db, "%tessera_put_batch%", "for the user's row")
    await declare.commit()
    await other.close()
    reply = await client.wait_for(lambda f: f.get("rid") == frame["rid"])
    assert reply["t"] == "error" and reply["code"] == "quota_exceeded", reply
    assert await _count(db, "SELECT used FROM users WHERE id = $1", user) == 0
    await client.close()


async def test_a_put_commits_only_once_its_data_is_stored(make_server, store_kind, db, monkeypatch):
    """The batch's statement runs while the data is still on its way to the store
    (a put waits for the longer of the two, not both), but the transaction commits
    only after the write: no committed row, and no change pushed, before the data
    is there."""
    server = make_server(store_kind)
    monkeypatch.setattr(uploads_module, "LOCKED_STORE_WAIT", 30.0)  # however slow the test
    tokens = await register_login(server.http, unique("putgate"))
    client = await SyncClient.connect(server.ws, tokens["access"], device="a")
    watcher = await SyncClient.connect(server.ws, tokens["access"], device="b")
    user = client.welcome["user"]
    gate = _gate_store_writes(server, monkeypatch)
    frame = client.put_frame(os.urandom(800))
    await client.send(frame)
    deadline = time.monotonic() + 20
    while not await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
        "AND datname = current_database() AND query LIKE '%tessera_put_batch%'"
    ):
        assert time.monotonic() < deadline, "the statement never ran before the write"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert await _count(db, "SELECT count(*) FROM objects WHERE owner_id = $1", user) == 0
    assert await _stored_keys(server, f"partitions/{user}/") == set()
    with pytest.raises(TimeoutError):
        await watcher.wait_for(lambda f: f["t"] == "change", timeout=0.2)
    gate.open()
    reply = await client.wait_for(lambda f: f.get("rid") == frame["rid"])
    assert reply["t"] == "committed", reply
    change = await watcher.wait_for(lambda f: f["t"] == "change")
    assert await watcher.download(change["parts"][0]["id"]) == frame["data"]
    for c in (client, watcher):
        await c.close()


async def test_a_put_whose_data_is_not_stored_fails_alone(make_server, db, monkeypatch):
    """One put of a batch fails to reach the store: the batch rolls back, the other
    puts commit one by one, and the failed one gets ``unavailable`` (retry) with
    no row referring to its data."""
    server = make_server()
    clients, users = await _users_connected(server, "nostore", 3)
    # Fails after the batch's statement ran.
    failing = _gate_store_writes(server, monkeypatch, f"partitions/{users[1]}/", fail=0.1)
    frames = [c.put_frame(os.urandom(600 + i)) for i, c in enumerate(clients)]
    await _send_together(server, clients, frames)
    replies = [
        await c.wait_for(lambda f, r=f["rid"]: f.get("rid") == r)
        for c, f in zip(clients, frames, strict=True)
    ]
    assert replies[1]["t"] == "error" and replies[1]["code"] == "unavailable", replies[1]
    assert replies[1]["retry"] is True, replies[1]
    assert [replies[0]["t"], replies[2]["t"]] == ["committed", "committed"], replies
    stats = server.services.uploads.puts.stats
    assert (stats.largest, stats.split) == (3, 1)
    for user, expected in zip(users, (1, 0, 1), strict=True):
        assert await _count(db, "SELECT count(*) FROM objects WHERE owner_id = $1", user) == (
            expected
        )
    assert await _count(db, "SELECT used FROM users WHERE id = $1", users[1]) == 0
    failing.remove()
    again = await clients[1].put({**frames[1], "rid": clients[1].rid()})  # the retry
    assert again["t"] == "committed" and again["seq"] == 1, again
    parts = await db.fetch("SELECT id FROM partitions WHERE object_id = $1", again["object"])
    assert [await clients[1].download(p["id"]) for p in parts] == [frames[1]["data"]]
    for c in clients:
        await c.close()


async def test_a_put_whose_store_write_stalls_gives_up_and_frees_its_user(
    make_server, db, monkeypatch
):
    """A write that never ends fails its put (``unavailable``) after
    ``STORE_WAIT``; the users row is locked only for ``LOCKED_STORE_WAIT`` of
    that, and is free again for the user's next put."""
    server = make_server()
    monkeypatch.setattr(uploads_module, "LOCKED_STORE_WAIT", 0.2)
    monkeypatch.setattr(uploads_module, "STORE_WAIT", 1.5)
    tokens = await register_login(server.http, unique("putstall"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    user = client.welcome["user"]
    gate = _gate_store_writes(server, monkeypatch)
    frame = client.put_frame(os.urandom(500))
    started = time.monotonic()
    await client.send(frame)
    await asyncio.sleep(0.6)  # past the locked wait: the row is free, the put waits on
    await _row_is_free(db, user)
    first = await client.wait_for(lambda f: f.get("rid") == frame["rid"])
    assert first["t"] == "error" and first["code"] == "unavailable", first
    assert 1.5 <= time.monotonic() - started < 10
    gate.remove()
    second = await client.put(client.put_frame(os.urandom(400)))
    assert second["t"] == "committed" and second["seq"] == 1, second
    assert await _count(db, "SELECT count(*) FROM objects WHERE owner_id = $1", user) == 1
    gate.open()  # the stalled write ends: its file is nobody's (janitor)
    await client.close()


async def test_a_slow_write_in_a_batch_holds_back_neither_the_others_nor_its_rows(
    make_server, db, monkeypatch
):
    """One put's write is slow: after ``LOCKED_STORE_WAIT`` the batch rolls back,
    the other puts commit alone and are answered at once, and the slow one waits
    for its data holding no lock, then commits."""
    server = make_server()
    monkeypatch.setattr(uploads_module, "LOCKED_STORE_WAIT", 0.2)
    clients, users = await _users_connected(server, "slowput", 3)
    gate = _gate_store_writes(server, monkeypatch, f"partitions/{users[1]}/")
    frames = [c.put_frame(os.urandom(700 + i)) for i, c in enumerate(clients)]
    await _send_together(server, clients, frames)
    for i in (0, 2):
        reply = await clients[i].wait_for(lambda f, r=frames[i]["rid"]: f.get("rid") == r)
        assert reply["t"] == "committed", reply
    stats = server.services.uploads.puts.stats
    assert (stats.largest, stats.split) == (3, 1)
    # The slow put waits for its data holding no lock: its user's row is free.
    await _row_is_free(db, users[1])
    assert await _count(db, "SELECT count(*) FROM objects WHERE owner_id = $1", users[1]) == 0
    gate.open()
    reply = await clients[1].wait_for(lambda f: f.get("rid") == frames[1]["rid"])
    assert reply["t"] == "committed" and reply["seq"] == 1, reply
    assert (
        await clients[1].download(
            await db.fetchval("SELECT id FROM partitions WHERE object_id = $1", reply["object"])
        )
        == frames[1]["data"]
    )
    for c in clients:
        await c.close()


async def test_puts_waiting_for_slow_writes_hold_no_batch_slot(make_server, monkeypatch):
    """Two puts whose writes hang (as many as there are batch slots) leave the
    slots free once late: a third user's put commits meanwhile."""
    server = make_server()
    monkeypatch.setattr(uploads_module, "LOCKED_STORE_WAIT", 0.2)
    monkeypatch.setattr(uploads_module, "STORE_WAIT", 60.0)
    clients, users = await _users_connected(server, "slotfree", 3)
    gates = [_gate_store_writes(server, monkeypatch, f"partitions/{u}/") for u in users[:2]]
    stalled = [c.put_frame(os.urandom(300)) for c in clients[:2]]
    for client, frame in zip(clients, stalled, strict=False):
        await client.send(frame)
    await asyncio.sleep(0.5)  # both late now
    started = time.monotonic()
    third = await clients[2].put(clients[2].put_frame(os.urandom(300)), timeout=20)
    assert third["t"] == "committed", third
    assert time.monotonic() - started < 10
    for gate in gates:
        gate.open()
    for client, frame in zip(clients, stalled, strict=False):
        reply = await client.wait_for(lambda f, r=frame["rid"]: f.get("rid") == r)
        assert reply["t"] == "committed", reply
    for c in clients:
        await c.close()


async def test_a_refused_put_is_answered_without_waiting_for_its_write(make_server, monkeypatch):
    """A put over its quota in a batch that rolled back for a slow write: its own
    data is no row's, so it gets its refusal at once, not after its write."""
    server = make_server(default_quota=1000)
    monkeypatch.setattr(uploads_module, "LOCKED_STORE_WAIT", 0.2)
    clients, _ = await _users_connected(server, "refusedslow", 2)
    gate = _gate_store_writes(server, monkeypatch, "partitions/")  # every put's write
    frames = [clients[0].put_frame(os.urandom(500)), clients[1].put_frame(os.urandom(5000))]
    await _send_together(server, clients, frames)
    refused = await clients[1].wait_for(lambda f: f.get("rid") == frames[1]["rid"], timeout=10)
    assert refused["t"] == "error" and refused["code"] == "quota_exceeded", refused
    stats = server.services.uploads.puts.stats
    assert (stats.largest, stats.split) == (2, 1)
    gate.open()
    first = await clients[0].wait_for(lambda f: f.get("rid") == frames[0]["rid"])
    assert first["t"] == "committed", first
    for c in clients:
        await c.close()


async def test_a_resent_put_whose_write_fails_gets_the_first_result(make_server, monkeypatch):
    """The resend's own copy of the data is not needed: the put committed, and
    the resend says so rather than ``unavailable``."""
    server = make_server()
    clients, users = await _users_connected(server, "resendfail", 1)
    frame = clients[0].put_frame(os.urandom(400))
    first = await clients[0].put(frame)
    assert first["t"] == "committed", first
    _gate_store_writes(server, monkeypatch, f"partitions/{users[0]}/", fail=0.0)
    again = await clients[0].put({**frame, "rid": clients[0].rid()})
    assert (again["t"], again["object"], again["seq"]) == ("committed", first["object"], 1)
    await clients[0].close()


class _StoreGate:
    """Holds the server's store writes of keys under a prefix until opened; or,
    with ``fail`` (seconds), fails them after that long."""

    def __init__(self, server, monkeypatch, prefix: str, fail: float | None = None) -> None:
        self._server = server
        self._monkeypatch = monkeypatch
        self._store = server.services.store
        self._put_bytes = self._store.put_bytes
        self._event: asyncio.Event = server.call(_new_event)

        async def gated(key: str, data: bytes, **kwargs: Any) -> None:
            if key.startswith(prefix) and fail is not None:
                await asyncio.sleep(fail)
                raise StoreError("disk full")
            if key.startswith(prefix):
                await self._event.wait()
            await self._put_bytes(key, data, **kwargs)

        monkeypatch.setattr(self._store, "put_bytes", gated)

    def open(self) -> None:
        """Let the held writes (and later ones) through."""

        async def set_it() -> None:
            self._event.set()

        self._server.call(set_it)

    def remove(self) -> None:
        """Later writes go straight to the store; held ones stay held."""
        self._monkeypatch.setattr(self._store, "put_bytes", self._put_bytes)


def _gate_store_writes(
    server, monkeypatch, prefix: str = "", fail: float | None = None
) -> _StoreGate:
    return _StoreGate(server, monkeypatch, prefix, fail)


async def _new_event() -> asyncio.Event:
    return asyncio.Event()  # made in the server's loop, to be waited for there


async def _row_is_free(db, user: int) -> None:
    """The user's users row is not locked (by a put waiting for its data, say)."""
    async with db.transaction():
        await db.execute("SET LOCAL lock_timeout = '100ms'")
        await db.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user)
