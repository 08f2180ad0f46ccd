"""The live change feed: push to every device, catch-up, ordering, long-poll."""

from __future__ import annotations

import asyncio
import os

import httpx

from tests.support.client import SyncClient


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
