"""The feed under concurrency: writers race, devices flap, everyone converges.

Each run is driven by a seed (printed, and in the test id): the writers'
choices and the devices' connect/disconnect schedule come from it. The
interleaving of real sockets and transactions is still the machine's; that is
the point of running many seeds. ``TESSERA_FEED_SEEDS=N`` runs N of them.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field

import asyncpg
import pytest

from tests.conftest import unique
from tests.support.client import SyncClient, register_login
from tests.support.db import share

SEEDS = int(os.environ.get("TESSERA_FEED_SEEDS", "8"))


@dataclass
class DeviceLog:
    """What one device saw, across all its sessions."""

    name: str
    cursor: int = 0
    seqs: list[int] = field(default_factory=list)
    view: dict[int, tuple[int, str]] = field(default_factory=dict)
    sessions: int = 0

    def apply(self, change: dict) -> None:
        assert change["seq"] > self.cursor, (
            f"{self.name}: seq {change['seq']} after {self.cursor} (seen {self.seqs[-5:]})"
        )
        self.cursor = change["seq"]
        self.seqs.append(change["seq"])
        self.view[change["object"]] = (change["rev"], change["status"])


async def writer(
    client: SyncClient, rng: random.Random, known: dict[int, int], shared: int, ops: int
) -> None:
    """Create, edit and delete objects; stale bases are expected and retried."""
    for _ in range(ops):
        roll = rng.random()
        live = [o for o, rev in known.items() if rev > 0]
        if roll < 0.35 or not live:
            done = await client.push([os.urandom(rng.randint(1, 3000))])
            known[done["object"]] = done["rev"]
            continue
        obj = shared if roll < 0.55 else rng.choice(live)
        base = known.get(obj, 1)
        if roll > 0.9 and obj != shared:
            reply = await client.request({"t": "delete", "object": obj, "base": base})
            if reply["t"] == "committed":
                known[obj] = 0
            else:
                assert reply["code"] in ("conflict", "not_found"), reply
                if reply["code"] == "conflict":
                    known[obj] = reply["rev"]
            continue
        data = os.urandom(rng.randint(1, 2000))
        ok = await client.start_upload([data], obj=obj, base=base)
        if ok["t"] == "error":
            assert ok["code"] in ("conflict", "not_found"), ok
            if ok["code"] == "conflict":
                known[obj] = ok["rev"]
            continue
        await client.send_parts(ok["upload"], [data])
        done = await client.request({"t": "commit", "upload": ok["upload"]})
        if done["t"] == "committed":
            known[obj] = done["rev"]
        else:
            assert done["code"] == "conflict", done
            known[obj] = done["rev"]
            # The loser's data is kept in its upload until the client decides.
            kept = await client.request({"t": "resume", "upload": ok["upload"]})
            assert kept["t"] == "upload_ok" and kept["have"] == [0], kept
            await client.request({"t": "abort", "upload": ok["upload"]})


async def flapping_device(
    url: str, token: str, log: DeviceLog, rng: random.Random, stop: asyncio.Event
) -> None:
    """Connect with the cursor, read for a random while, drop the connection, repeat."""
    while not stop.is_set():
        client = await SyncClient.connect(
            url, token, device=log.name, cursor=log.cursor, synced=False
        )
        log.sessions += 1
        assert client.welcome["head"] >= log.cursor
        loop = asyncio.get_running_loop()
        until = loop.time() + rng.uniform(0.005, 0.12)
        try:
            while (left := until - loop.time()) > 0:
                try:
                    frame = await client.next(timeout=left)
                except TimeoutError:
                    break
                if frame["t"] == "change":
                    log.apply(frame)
                elif frame["t"] == "synced":
                    assert frame["cursor"] == log.cursor
        finally:
            if rng.random() < 0.5:
                client.ws.transport.abort()  # a dropped network, not a clean close
            else:
                await client.close()


async def final_view(url: str, token: str, log: DeviceLog) -> None:
    client = await SyncClient.connect(url, token, device=log.name, cursor=log.cursor, synced=False)
    while True:
        frame = await client.next()
        if frame["t"] == "change":
            log.apply(frame)
        elif frame["t"] == "synced":
            break
    await client.close()


async def truth(db: asyncpg.Connection, user: int) -> dict[int, tuple[int, str]]:
    rows = await db.fetch(
        """SELECT o.id, o.rev,
                  CASE WHEN o.status = 'deleted' OR a.status = 'deleted'
                       THEN 'deleted' ELSE 'active' END AS status
           FROM access_list a JOIN objects o ON o.id = a.object_id WHERE a.user_id = $1""",
        user,
    )
    return {r["id"]: (r["rev"], r["status"]) for r in rows}


@pytest.mark.parametrize("seed", range(SEEDS))
async def test_writers_race_devices_flap_everyone_converges(server, db, seed):
    print(f"feed concurrency seed={seed} (replay: -k 'converges and {seed}]')")
    rng = random.Random(seed)
    a_tokens = await register_login(server.http, unique("alice"))
    b_tokens = await register_login(server.http, unique("bob"))
    writers = [
        await SyncClient.connect(server.ws, a_tokens["access"], device=f"a-writer-{i}")
        for i in range(3)
    ]
    alice_id = writers[0].welcome["user"]
    shared = (await writers[0].push([b"shared v1"]))["object"]
    bob_writer = await SyncClient.connect(server.ws, b_tokens["access"], device="b-writer")
    bob_id = bob_writer.welcome["user"]
    await share(db, shared, bob_id)

    devices = [DeviceLog(f"a-device-{i}") for i in range(3)] + [DeviceLog("b-device")]
    tokens = [a_tokens["access"]] * 3 + [b_tokens["access"]]
    stop = asyncio.Event()
    readers = [
        asyncio.create_task(flapping_device(server.ws, tok, log, random.Random(rng.random()), stop))
        for tok, log in zip(tokens, devices, strict=True)
    ]
    known_a: dict[int, int] = {shared: 1}
    known_b: dict[int, int] = {shared: 1}
    await asyncio.gather(
        *(writer(w, random.Random(rng.random()), known_a, shared, 10) for w in writers),
        writer(bob_writer, random.Random(rng.random()), known_b, shared, 6),
    )
    stop.set()
    await asyncio.gather(*readers)

    expected = {alice_id: await truth(db, alice_id), bob_id: await truth(db, bob_id)}
    assert shared in expected[bob_id]
    for tok, log in zip(tokens, devices, strict=True):
        await final_view(server.ws, tok, log)
        user = bob_id if log.name.startswith("b-") else alice_id
        assert log.view == expected[user], f"seed {seed}: {log.name} diverged"
        assert log.seqs == sorted(set(log.seqs))
        assert log.sessions >= 1
    print({log.name: (log.sessions, len(log.seqs)) for log in devices}, known_a)
    head = await db.fetchval("SELECT change_seq FROM users WHERE id = $1", alice_id)
    assert devices[0].cursor == head
    for w in [*writers, bob_writer]:
        await w.close()
