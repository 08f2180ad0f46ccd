"""The live change feed: push to every device, catch-up, ordering, long-poll."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from tests.conftest import unique
from tests.support.client import SyncClient, register_login


async def next_change(client: SyncClient, timeout: float = 10) -> dict:
    return await client.wait_for(lambda f: f["t"] == "change", timeout)


async def test_commit_on_one_device_reaches_the_others_and_itself(server, alice):
    a = await SyncClient.connect(server.ws, alice["access"], device="phone")
    b = await SyncClient.connect(server.ws, alice["access"], device="laptop")
    done = await a.push([b"hello"], name=b"n1")
    for client in (a, b):
        change = await next_change(client)
        assert change["seq"] == done["seq"] and change["object"] == done["object"]
        assert change["origin"] == "phone" and change["status"] == "active"
        assert change["rev"] == 1 and change["size"] == 5 and change["kind"] == "file"
        assert change["meta"]["name"] == b"n1" and len(change["parts"]) == 1
    gone = await b.request({"t": "delete", "object": done["object"], "base": 1})
    assert gone["t"] == "committed"
    for client in (a, b):
        change = await next_change(client)
        assert change["status"] == "deleted" and change["rev"] == 2 and change["parts"] == []
        assert change["origin"] == "laptop" and change["seq"] == gone["seq"]
    await a.close()
    await b.close()


async def test_ack_records_the_device_cursor(server, alice, db):
    a = await SyncClient.connect(server.ws, alice["access"], device="acker")
    done = await a.push([b"x"])
    await next_change(a)
    await a.send({"t": "ack", "cursor": done["seq"]})
    await a.request({"t": "ping"})  # the ack has no reply; a round trip orders it
    for _ in range(50):
        acked = await db.fetchval(
            "SELECT acked FROM devices WHERE id = 'acker' AND user_id = $1", a.welcome["user"]
        )
        if acked == done["seq"]:
            break
        await asyncio.sleep(0.05)
    assert acked == done["seq"]
    await a.close()


async def test_long_poll_returns_on_commit_and_times_out_empty(server, alice):
    auth = {"Authorization": f"Bearer {alice['access']}"}
    writer = await SyncClient.connect(server.ws, alice["access"])
    head = writer.welcome["head"]
    async with httpx.AsyncClient(base_url=server.http, headers=auth, timeout=30) as http:
        empty = await http.get("/v1/changes", params={"since": head, "wait": 0.3})
        assert empty.status_code == 200
        assert empty.json() == {"changes": [], "cursor": head, "more": False}

        poll = asyncio.create_task(http.get("/v1/changes", params={"since": head, "wait": 20}))
        await asyncio.sleep(0.3)
        assert not poll.done()
        loop = asyncio.get_running_loop()
        started = loop.time()
        done = await writer.push([os.urandom(10)])
        r = await poll
        waited = loop.time() - started
        assert r.status_code == 200
        body = r.json()
        assert [c["seq"] for c in body["changes"]] == [done["seq"]]
        assert body["cursor"] == done["seq"]
        assert waited < 5, f"long-poll answered {waited:.1f}s after the commit"
        bad = await http.get("/v1/changes", params={"since": 0, "wait": 10_000})
        assert bad.status_code == 400
    await writer.close()


def _sessions(server, user: int) -> dict[str, object]:
    """The live sessions of ``user`` on the in-process server, by device."""
    from server.session import Session

    return {s.device: s for s in server.services.hub._subs.get(user, ()) if isinstance(s, Session)}


async def test_one_read_serves_every_caught_up_session_of_the_user(server, alice):
    """A commit wakes every session of its user; the caught-up ones share one
    database read and one encoded frame instead of reading the feed each."""
    clients = [
        await SyncClient.connect(server.ws, alice["access"], device=f"d{i}") for i in range(12)
    ]
    feed = server.services.feed
    before = feed.reads
    done = await clients[0].push([b"shared"])
    changes = [await next_change(c) for c in clients]
    assert {c["seq"] for c in changes} == {done["seq"]}
    assert all(c == changes[0] for c in changes)
    reads = feed.reads - before
    assert reads <= 2, f"{reads} feed reads for one commit to 12 sessions"
    for c in clients:
        await c.close()


async def test_pushes_to_many_users_share_a_read_and_each_gets_only_its_own(server):
    """Commits by several users at once: the pushes for all of them are one read of
    the feed (one statement for many (user, cursor) pairs), and no session gets a
    row of another user."""
    writers, readers = [], []
    for i in range(6):
        tokens = await register_login(server.http, unique(f"fanin{i}"))
        writers.append(await SyncClient.connect(server.ws, tokens["access"], device="w"))
        readers.append(await SyncClient.connect(server.ws, tokens["access"], device="r"))
    feed = server.services.feed
    before = 0

    def hold(n: int) -> Callable[[], Awaitable[bool]]:
        async def set_concurrency() -> bool:
            if n and feed.push_reads.pending < len(writers):
                return False
            nonlocal before
            before = feed.push_reads.stats.batches
            feed.push_reads.concurrency = n
            return True

        return set_concurrency

    await asyncio.to_thread(server.call, hold(0))
    done = [await w.push([os.urandom(100 + i)]) for i, w in enumerate(writers)]
    # Each user's two idle sessions share one push; all six wait for a read.
    deadline = asyncio.get_running_loop().time() + 20
    while not await asyncio.to_thread(server.call, hold(2)):
        assert asyncio.get_running_loop().time() < deadline, "the pushes never waited"
        await asyncio.sleep(0.02)
    for writer, reader, mine in zip(writers, readers, done, strict=True):
        for client in (writer, reader):
            change = await next_change(client)
            assert (change["object"], change["seq"]) == (mine["object"], mine["seq"])
    stats = feed.push_reads.stats
    assert (stats.batches - before, stats.largest) == (1, 6), "one read for six users"
    for client in writers + readers:  # nothing else arrives: no other user's rows
        with pytest.raises(TimeoutError):
            await client.wait_for(lambda f: f["t"] == "change", timeout=0.2)
        await client.close()


async def test_one_read_of_many_pairs_is_each_pair_read_alone(server):
    """``_READ_MANY`` (push reads grouped) returns for each (user, cursor) pair the
    rows ``_READ`` returns for it: same order, same per-pair limit, none for a
    user without changes, and never another user's row."""
    from server.changes import _READ, _READ_MANY

    busy = await SyncClient.connect(
        server.ws, (await register_login(server.http, unique("many")))["access"]
    )
    quiet = await SyncClient.connect(
        server.ws, (await register_login(server.http, unique("quiet")))["access"]
    )
    for i in range(4):
        await busy.push([os.urandom(50 + i)])
    a, b = busy.welcome["user"], quiet.welcome["user"]
    pairs = [(a, 0), (b, 0), (a, 1), (a, 4)]

    async def read_both() -> tuple[list[Any], list[list[Any]]]:
        pool = server.services.pool
        users, cursors = zip(*pairs, strict=True)
        many = await pool.fetch(_READ_MANY, users, cursors, 2)  # at most 2 per pair
        alone = [await pool.fetch(_READ, u, c, 2) for u, c in pairs]
        return many, alone

    many, alone = await asyncio.to_thread(server.call, read_both)
    grouped: list[list[dict[str, Any]]] = [[] for _ in pairs]
    for row in many:
        grouped[row["n"] - 1].append({k: v for k, v in row.items() if k != "n"})
    assert grouped == [[dict(r) for r in rows] for rows in alone]
    assert [len(g) for g in grouped] == [2, 0, 2, 0]
    assert [r["seq"] for r in grouped[2]] == [2, 3]
    await busy.close()
    await quiet.close()


def _slow_once(read: Callable[[int, int], Awaitable[Any]], seconds: float):
    """``read``, and an event: the first read that finishes while it is set returns
    ``seconds`` late (and clears it)."""
    armed = asyncio.Event()  # only set/clear/is_set: usable from the server's loop too

    async def read_slowly(user: int, after: int) -> Any:
        rows = await read(user, after)
        if armed.is_set():
            armed.clear()
            await asyncio.sleep(seconds)
        return rows

    return read_slowly, armed


async def test_a_shared_read_that_began_before_the_commit_is_not_the_last_word(server, alice):
    """Session A's read began before a commit and is still in flight when the commit
    is announced; session B, woken by the announcement, joins that read and gets
    nothing new. B must read again (the commit was announced to it once, and only
    once), not wait for a next change that may never come."""
    a = await SyncClient.connect(server.ws, alice["access"], device="a")
    b = await SyncClient.connect(server.ws, alice["access"], device="b")
    writer = await SyncClient.connect(server.ws, alice["access"], device="writer")
    feed = server.services.feed
    original = feed._read
    # The read's snapshot is taken; the commit lands during the second that follows.
    read_slowly, armed = _slow_once(original, 1.0)

    async def start_a_read_on_a() -> None:
        feed._read = read_slowly
        armed.set()
        _sessions(server, a.welcome["user"])["a"].poke(None)

    await asyncio.to_thread(server.call, start_a_read_on_a)
    await asyncio.sleep(0.2)
    try:
        done = await writer.push([b"late"])
        for client in (b, a):
            change = await next_change(client, timeout=5)
            assert change["seq"] == done["seq"]
    finally:
        feed._read = original
    for client in (a, b, writer):
        await client.close()


async def test_a_push_overtaken_by_the_sessions_own_read_is_sent_once(server, alice):
    """An idle session is handed a commit's rows by a shared push read; if its own
    feed loop wakes meanwhile (here: a listener-reconnect poke), the loop reads and
    the push must not send the same rows again."""
    b = await SyncClient.connect(server.ws, alice["access"], device="b")
    writer = await SyncClient.connect(server.ws, alice["access"], device="w")
    feed = server.services.feed
    original = feed._read
    read_slowly, slow = _slow_once(original, 0.8)  # the push is pending this long

    async def arm() -> None:
        feed._read = read_slowly
        slow.set()

    async def wake_bs_loop() -> None:
        _sessions(server, b.welcome["user"])["b"].poke(None)

    await asyncio.to_thread(server.call, arm)
    try:
        done = await writer.push([b"once"])
        await asyncio.sleep(0.2)  # the push read for b (and w) is in flight
        await asyncio.to_thread(server.call, wake_bs_loop)
        change = await next_change(b, timeout=5)
        assert change["seq"] == done["seq"]
        await asyncio.sleep(1.0)  # the push lands after the loop's own read
        assert (await b.request({"t": "ping"}))["t"] == "pong"
        again = [f for f in b.buffer if f["t"] == "change" and f["seq"] == done["seq"]]
        assert not again, f"sent twice: {again}"
    finally:
        feed._read = original
    for client in (b, writer):
        await client.close()
