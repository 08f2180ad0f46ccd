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


@pytest.mark.parametrize("held", ["in its copies", "before its write"])
async def test_one_upload_committed_on_two_nodes_at_once(
    make_server: Any, monkeypatch: pytest.MonkeyPatch, db: asyncpg.Connection, held: str
) -> None:
    """A client commits on node A, loses the connection, and commits again on node B
    while A is still at work. Both answers are the same commit; exactly one object
    exists; A's copies are deleted and nothing else is left in the store.

    Held in its copies until B has committed and deleted the staged parts, A finds
    them gone and answers with B's result. Held before its metadata write, A
    loses in the transaction ('won' by B) and deletes its copies."""
    a, b = make_server("s3"), make_server("s3")
    user = await register_login(a.http, unique("twonodes"))
    on_a = await SyncClient.connect(a.ws, user["access"])
    on_b = await SyncClient.connect(b.ws, user["access"])
    uid = int(on_a.welcome["user"])
    upload, parts = await staged_upload(on_a, 3)
    gate = Gate()
    if held == "in its copies":
        gate_copies(monkeypatch, a, {upload}, gate)
    else:
        uploads = a.services.uploads
        write = uploads._commit_new

        async def gated_write(*args: Any) -> Any:
            await gate.wait()
            return await write(*args)

        monkeypatch.setattr(uploads, "_commit_new", gated_write)
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
    kept = await referenced(db, uid)
    assert len(kept) == len(parts)

    async def only_referenced() -> bool:
        return set(await store_keys(a, f"partitions/{uid}/")) == kept

    await eventually(only_referenced, "A's copies of a commit it lost are left in the store")
    change = await on_b.wait_for(lambda f: f["t"] == "change" and f["seq"] == won["seq"])
    assert [await on_b.download(p["id"]) for p in change["parts"]] == parts
    await on_a.close()
    await on_b.close()


async def test_upload_aborted_on_one_node_while_committed_on_another(
    make_server: Any, monkeypatch: pytest.MonkeyPatch, db: asyncpg.Connection
) -> None:
    """Node A is copying the parts when node B aborts the upload and deletes them:
    A answers not_found (the abort won), not "send the parts again", and leaves
    nothing in the store."""
    a, b = make_server("s3"), make_server("s3")
    user = await register_login(a.http, unique("abortrace"))
    on_a = await SyncClient.connect(a.ws, user["access"])
    on_b = await SyncClient.connect(b.ws, user["access"])
    uid = int(on_a.welcome["user"])
    upload, _ = await staged_upload(on_a, 3)
    gate = Gate()
    gate_copies(monkeypatch, a, {upload}, gate)
    rid = on_a.rid()
    await on_a.send({"t": "commit", "rid": rid, "upload": upload})
    await gate.until_waiting(1)

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
    await on_a.close()
    await on_b.close()
