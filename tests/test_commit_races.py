"""Commits that wait on the store, and commits and aborts of one upload on two nodes.

A commit holds no database connection while it copies its parts, and nothing in
the database serialises the commits of one upload across nodes: each copies
under partition ids of its own, and the metadata transaction lets one win.
These tests hold a commit at a chosen step (a gate in its store copy or before
its metadata write) while another node acts on the same upload, then let it go
and check the answers and what is left in the database and the store.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from server import keys
from tests.conftest import unique
from tests.support.client import SyncClient, register_login
from tests.support.server import RunningServer


class Gate:
    """Holds callers on a server's loop until opened from the test's loop (the two
    run in different threads, so a threading.Event, polled)."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.waiting = 0

    async def wait(self) -> None:
        self.waiting += 1
        while not self.opened.is_set():  # noqa: ASYNC110 - set from another thread
            await asyncio.sleep(0.01)

    async def until_waiting(self, n: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while self.waiting < n:
            assert time.monotonic() < deadline, f"{self.waiting} of {n} callers reached the gate"
            await asyncio.sleep(0.01)


def gate_copies(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, uploads: set[str], gate: Gate
) -> None:
    """Copies of the staged parts of ``uploads`` on ``server`` wait for ``gate``."""
    store = server.services.store
    copy = store.copy

    async def gated(src: str, dst: str) -> None:
        parsed = keys.parse_staging_key(src)
        if parsed is not None and parsed[1] in uploads:
            await gate.wait()
        await copy(src, dst)

    monkeypatch.setattr(store, "copy", gated)


def gate_write(
    monkeypatch: pytest.MonkeyPatch, server: RunningServer, name: str, gate: Gate, cut: bool = False
) -> None:
    """The metadata write (``Uploads._commit_new`` or ``_commit_revision``) on
    ``server`` waits for ``gate``; with ``cut``, it then fails as a connection that
    dropped before the statement reached PostgreSQL (an ambiguous failure)."""
    uploads = server.services.uploads
    write = getattr(uploads, name)

    async def gated(*args: Any) -> Any:
        await gate.wait()
        if cut:
            raise ConnectionResetError("connection to the database cut")
        return await write(*args)

    monkeypatch.setattr(uploads, name, gated)


class TwoNodes:
    """Two servers on one database and one S3 store, and a session of one user on each."""

    def __init__(self, a: RunningServer, on_a: SyncClient, on_b: SyncClient) -> None:
        self.a, self.on_a, self.on_b = a, on_a, on_b
        self.uid = int(on_a.welcome["user"])

    @classmethod
    async def start(cls, make_server: Any, name: str) -> TwoNodes:
        a, b = make_server("s3"), make_server("s3")
        user = await register_login(a.http, unique(name))
        on_a = await SyncClient.connect(a.ws, user["access"])
        on_b = await SyncClient.connect(b.ws, user["access"])
        return cls(a, on_a, on_b)

    async def close(self) -> None:
        await self.on_a.close()
        await self.on_b.close()


async def staged_upload(client: SyncClient, n: int = 2) -> tuple[str, list[bytes]]:
    parts = [os.urandom(3000 + i) for i in range(n)]
    ok = await client.start_upload(parts)
    assert ok["t"] == "upload_ok", ok
    await client.send_parts(ok["upload"], parts)
    return ok["upload"], parts


async def store_keys(server: RunningServer, prefix: str) -> list[str]:
    store = server.services.store

    async def listed() -> list[str]:
        return [info.key async for info in store.list(prefix)]

    return await asyncio.to_thread(server.call, listed)


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 10) -> Any:
    """``check()`` once it is truthy (background clean-ups run after the reply)."""
    deadline = time.monotonic() + timeout
    while not (got := await check()):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)
    return got


async def referenced(db: asyncpg.Connection, uid: int) -> set[str]:
    rows = await db.fetch(
        "SELECT p.store_key FROM partitions p JOIN objects o ON o.id = p.object_id "
        "WHERE o.owner_id = $1",
        uid,
    )
    return {r["store_key"] for r in rows}


async def test_commits_waiting_on_the_store_hold_no_connection_and_no_one_up(
    make_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More commits stuck in their store copies than the database pool has
    connections (each used to hold a lock connection, 16 at most per node): none
    holds a connection, and another upload's commit goes through meanwhile."""
    server = make_server()
    user = await register_login(server.http, unique("slowcopy"))
    client = await SyncClient.connect(server.ws, user["access"])
    stuck = [await staged_upload(client, 1) for _ in range(24)]
    gate = Gate()
    gate_copies(monkeypatch, server, {upload for upload, _ in stuck}, gate)
    rids = [client.rid() for _ in stuck]
    for rid, (upload, _) in zip(rids, stuck, strict=True):
        await client.send({"t": "commit", "rid": rid, "upload": upload})
    await gate.until_waiting(len(stuck))

    pool = server.services.pool

    async def in_use() -> int:
        return pool.get_size() - pool.get_idle_size()

    async def none_in_use() -> bool:
        return await asyncio.to_thread(server.call, in_use) == 0

    await eventually(none_in_use, "pooled connections stay in use while commits wait")

    upload, parts = await staged_upload(client, 2)
    done = await client.request({"t": "commit", "upload": upload}, timeout=15)
    assert done["t"] == "committed", done
    assert gate.waiting == len(stuck), "a stuck commit went on before the gate opened"

    gate.opened.set()
    replies = [await client.wait_for(lambda f, r=rid: f.get("rid") == r, 30) for rid in rids]
    assert [r["t"] for r in replies] == ["committed"] * len(stuck), replies
    assert len({r["object"] for r in replies} | {done["object"]}) == len(stuck) + 1
    change = await client.wait_for(lambda f: f["t"] == "change" and f["seq"] == done["seq"])
    assert [await client.download(p["id"]) for p in change["parts"]] == parts
    await client.close()


async def revision_upload(client: SyncClient) -> tuple[str, list[bytes], str]:
    """A committed object and an upload of its next revision, staged."""
    first = [os.urandom(2000)]
    ok = await client.start_upload(first)
    await client.send_parts(ok["upload"], first)
    v1 = await client.request({"t": "commit", "upload": ok["upload"]})
    assert v1["t"] == "committed", v1
    parts = [os.urandom(3000 + i) for i in range(3)]
    ok = await client.start_upload(parts, obj=v1["object"], base=v1["rev"])
    assert ok["t"] == "upload_ok", ok
    await client.send_parts(ok["upload"], parts)
    return ok["upload"], parts, "_commit_revision"


@pytest.mark.parametrize("kind", ["new object", "revision"])
@pytest.mark.parametrize("held", ["in its copies", "before its write"])
async def test_one_upload_committed_on_two_nodes_at_once(
    make_server: Any, monkeypatch: pytest.MonkeyPatch, db: asyncpg.Connection, held: str, kind: str
) -> None:
    """A client commits on node A, loses the connection, and commits again on node B
    while A is still at work. Both answers are the same commit; exactly one object
    (or revision) exists, its quota charged once; A's copies are deleted and
    nothing else is left in the store.

    Held in its copies until B has committed and deleted the staged parts, A finds
    them gone and answers with B's result. Held before its metadata write, A
    loses in the transaction ('won' by B) and deletes its copies."""
    nodes = await TwoNodes.start(make_server, "twonodes")
    a, on_a, on_b, uid = nodes.a, nodes.on_a, nodes.on_b, nodes.uid
    if kind == "new object":
        upload, parts = await staged_upload(on_a, 3)
        write = "_commit_new"
    else:
        upload, parts, write = await revision_upload(on_a)
    gate = Gate()
    if held == "in its copies":
        gate_copies(monkeypatch, a, {upload}, gate)
    else:
        gate_write(monkeypatch, a, write, gate)
    rid = on_a.rid()
    await on_a.send({"t": "commit", "rid": rid, "upload": upload})
    await gate.until_waiting(1)

    won = await on_b.request({"t": "commit", "upload": upload})
    assert won["t"] == "committed", won
    staging = keys.staging_prefix(uid, upload)

    async def staging_gone() -> bool:
        return not await store_keys(a, staging)

    await eventually(staging_gone, "B's commit left its staged parts")
    gate.opened.set()
    late = await on_a.wait_for(lambda f: f.get("rid") == rid, 30)
    assert late["t"] == "committed", late
    assert (late["object"], late["rev"], late["seq"]) == (won["object"], won["rev"], won["seq"])

    assert await db.fetchval("SELECT count(*) FROM objects WHERE owner_id = $1", uid) == 1
    rev = await db.fetchval("SELECT rev FROM objects WHERE id = $1", won["object"])
    assert rev == won["rev"] == (1 if kind == "new object" else 2)
    used = await db.fetchval("SELECT used FROM users WHERE id = $1", uid)
    assert used == sum(map(len, parts)), "the quota was charged more than once"
    kept = await referenced(db, uid)
    assert len(kept) == len(parts)
    retired = {
        r["store_key"]
        for r in await db.fetch(
            "SELECT store_key FROM garbage WHERE store_key LIKE $1", f"partitions/{uid}/%"
        )
    }

    async def only_referenced() -> bool:
        return set(await store_keys(a, f"partitions/{uid}/")) == kept | retired

    await eventually(only_referenced, "A's copies of a commit it lost are left in the store")
    change = await on_b.wait_for(lambda f: f["t"] == "change" and f["seq"] == won["seq"])
    assert [await on_b.download(p["id"]) for p in change["parts"]] == parts
    await nodes.close()


async def test_commit_cut_from_the_database_after_another_node_committed_it(
    make_server: Any, monkeypatch: pytest.MonkeyPatch, db: asyncpg.Connection
) -> None:
    """Node A's metadata write is lost with its connection after node B committed the
    same upload. A reads the upload again, finds it committed, but not with its own
    copies: it answers with B's result and deletes its copies (it used to take B's
    commit for its own and leave them to the partition sweep, an hour later)."""
    nodes = await TwoNodes.start(make_server, "ambiguous")
    a, on_a, on_b, uid = nodes.a, nodes.on_a, nodes.on_b, nodes.uid
    upload, parts = await staged_upload(on_a, 3)
    gate = Gate()
    gate_write(monkeypatch, a, "_commit_new", gate, cut=True)
    rid = on_a.rid()
    await on_a.send({"t": "commit", "rid": rid, "upload": upload})
    await gate.until_waiting(1)
    won = await on_b.request({"t": "commit", "upload": upload})
    assert won["t"] == "committed", won
    gate.opened.set()
    late = await on_a.wait_for(lambda f: f.get("rid") == rid, 30)
    assert (late["t"], late.get("object"), late.get("seq")) == (
        "committed",
        won["object"],
        won["seq"],
    ), late
    kept = await referenced(db, uid)
    assert len(kept) == len(parts)

    async def only_referenced() -> bool:
        return set(await store_keys(a, f"partitions/{uid}/")) == kept

    await eventually(only_referenced, "A's copies are left for the partition sweep")
    await nodes.close()


@pytest.mark.parametrize("held", ["all copies", "all but the first copy", "before its write"])
async def test_upload_aborted_on_one_node_while_committed_on_another(
    make_server: Any, monkeypatch: pytest.MonkeyPatch, db: asyncpg.Connection, held: str
) -> None:
    """Node B aborts the upload while node A's commit is held in its copies (none
    made, or the first made and the others held) or before its metadata write.
    The abort wins: A answers not_found (not "send the parts again"), and
    deletes every copy it made; nothing is left in the store."""
    nodes = await TwoNodes.start(make_server, "abortrace")
    a, on_a, on_b, uid = nodes.a, nodes.on_a, nodes.on_b, nodes.uid
    upload, _ = await staged_upload(on_a, 3)
    gate = Gate()
    if held == "before its write":
        gate_write(monkeypatch, a, "_commit_new", gate)
    else:
        store = a.services.store
        copy = store.copy

        async def gated(src: str, dst: str) -> None:
            parsed = keys.parse_staging_key(src)
            ours = parsed is not None and parsed[1] == upload
            if ours and (held == "all copies" or parsed[2] > 0):
                await gate.wait()
            await copy(src, dst)

        monkeypatch.setattr(store, "copy", gated)
    rid = on_a.rid()
    await on_a.send({"t": "commit", "rid": rid, "upload": upload})
    await gate.until_waiting(1)
    if held == "all but the first copy":

        async def first_copied() -> bool:
            return bool(await store_keys(a, f"partitions/{uid}/"))

        await eventually(first_copied, "the first part was not copied")

    aborted = await on_b.request({"t": "abort", "upload": upload})
    assert aborted["t"] == "ok", aborted
    gate.opened.set()
    late = await on_a.wait_for(lambda f: f.get("rid") == rid, 30)
    assert (late["t"], late.get("code")) == ("error", "not_found"), late

    assert await db.fetchval("SELECT count(*) FROM objects WHERE owner_id = $1", uid) == 0

    async def store_empty() -> bool:
        left = await store_keys(a, f"partitions/{uid}/") + await store_keys(
            a, keys.staging_prefix(uid, upload)
        )
        return not left

    await eventually(store_empty, "an aborted upload left objects in the store")
    await nodes.close()


async def test_abort_deletes_staged_parts_not_yet_marked_received(
    make_server: Any, store_kind: str
) -> None:
    """A part's staged copy exists before the part is marked received (the store
    write comes first). An abort in between must delete it too: the abort deletes
    the staged copy of every part declared, not only of those marked received."""
    server = make_server(store_kind)
    user = await register_login(server.http, unique("abortall"))
    client = await SyncClient.connect(server.ws, user["access"])
    uid = int(client.welcome["user"])
    parts = [os.urandom(1000), os.urandom(2000)]
    ok = await client.start_upload(parts)
    upload = ok["upload"]
    await client.send_parts(upload, parts[:1], indexes=[0])
    store = server.services.store

    async def stage_second() -> None:  # in staging, not marked received
        await store.put_bytes(keys.staging_key(uid, upload, 1), parts[1])

    await asyncio.to_thread(server.call, stage_second)
    assert len(await store_keys(server, keys.staging_prefix(uid, upload))) == 2
    aborted = await client.request({"t": "abort", "upload": upload})
    assert aborted["t"] == "ok", aborted
    assert await store_keys(server, keys.staging_prefix(uid, upload)) == []
    await client.close()
