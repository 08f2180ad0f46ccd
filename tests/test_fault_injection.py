"""Fault injection: a TCP proxy between the server and PostgreSQL and another
between the server and the object store stall or cut connections at chosen
moments (when a CopyObject or the commit's COMMIT passes), and a real server
process is SIGKILLed between the store copy and the database commit.

The outcome is checked like a Jepsen history: every commit the server
acknowledged is readable with the declared hashes, every object a client can see
has all its data, nothing unacknowledged became visible, and after the janitor
(orphan_grace=0) the store holds nothing that no row references.

The randomized test prints its seed; ``TESSERA_FAULT_SEEDS=1,2,3`` replays those.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import asyncpg
import httpx
import pytest
import websockets

from server import keys
from server.janitor import Janitor, JanitorReport
from server.settings import Settings
from server.stores.s3 import S3Store
from tests.conftest import unique
from tests.support.client import SyncClient, register_login
from tests.support.nodes import Node, node_args
from tests.support.proxy import FaultProxy, Upstream
from tests.support.s3 import S3Buckets, S3Config
from tests.support.server import RunningServer

Frame = dict[str, Any]
KiB = 1024

#: Small limits keep many parts (and so many concurrent copies) cheap.
LIMITS: dict[str, Any] = {
    "max_chunk": 64 * KiB,
    "max_frame": 128 * KiB,
    "window": 256 * KiB,
    "max_partition": 64 * KiB,
}
#: Seconds a commit may take to answer while the store or database is down.
ANSWER_BOUND = 70.0


def commit_statement(uid: int) -> bytes:
    """Bytes only the commit's statement of a new object of user ``uid`` sends: its
    partitions' store keys, bound as parameters of ``tessera_commit_new`` (whose
    text goes on the wire once per connection; after that, only its name)."""
    return f"partitions/{uid}/".encode()


#: Writes per device in the randomized history (four devices, two users).
OPS_PER_WORKER = int(os.environ.get("TESSERA_FAULT_OPS", "12"))


# ------------------------------------------------------------------ the rig


def pg_upstream(url: str) -> Upstream:
    """Where the proxy connects: the Unix socket file of a socket URL, else host:port."""
    parts = urlsplit(url)
    host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
    port = parts.port or 5432
    if host.startswith("/"):
        return os.path.join(host, f".s.PGSQL.{port}")
    return (host, port)


def via_proxy(url: str, port: int) -> str:
    """The same database, reached over TCP through the proxy on ``port``."""
    parts = urlsplit(url)
    auth = quote(parts.username or "postgres")
    if parts.password:
        auth += ":" + quote(parts.password)
    return f"postgresql://{auth}@127.0.0.1:{port}{parts.path}"


@dataclass
class Rig:
    """Both proxies, plus a direct (unproxied) view of the database and the store."""

    pg: FaultProxy
    s3: FaultProxy
    pg_url: str  # through the proxy
    s3_proxied: S3Config
    buckets: S3Buckets
    store: S3Store  # direct
    pool: asyncpg.Pool  # direct

    def heal(self) -> None:
        self.pg.heal()
        self.s3.heal()

    async def keys(self, prefix: str) -> set[str]:
        return {info.key async for info in self.store.list(prefix)}

    async def janitor(self) -> JanitorReport:
        """One pass with orphan_grace=0: only safe while no commit is under way."""
        return await Janitor(Settings(orphan_grace=0.0), self.pool, self.store).run_once()


@pytest.fixture
async def rig(database_url: str, s3_config: S3Config, s3_buckets: S3Buckets) -> AsyncIterator[Rig]:
    host, port = s3_config.endpoint.rsplit(":", 1)
    pg = FaultProxy(pg_upstream(database_url), "pg-proxy").start()
    s3 = FaultProxy((host, int(port)), "s3-proxy").start()
    store = s3_config.store(s3_buckets)
    await store.start()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert pool is not None
    proxied = S3Config(
        s3.address, s3_config.access_key, s3_config.secret_key, s3_config.secure, s3_config.region
    )
    yield Rig(pg, s3, via_proxy(database_url, pg.port), proxied, s3_buckets, store, pool)
    await pool.close()
    await store.close()
    pg.close()
    s3.close()


@pytest.fixture
def proxied_server(rig: Rig, make_server: Callable[..., RunningServer]) -> Iterator[Any]:
    """Start in-process servers whose database and store are both behind the proxies."""

    def start(**overrides: Any) -> RunningServer:
        return make_server(
            "s3",
            s3_endpoint=rig.s3.address,
            database_url=rig.pg_url,
            **{**LIMITS, **overrides},
        )

    yield start
    rig.heal()  # before make_server's teardown stops the servers


# ------------------------------------------------------------------ helpers


def chunks_of(rng: random.Random, count: int, low: int, high: int) -> list[bytes]:
    return [rng.randbytes(rng.randint(low, high)) for _ in range(count)]


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def staged(client: SyncClient, parts: list[bytes], name: bytes = b"n") -> str:
    """Declare an upload and send every part; return its id (not committed)."""
    ok = await client.start_upload(parts, name=name)
    assert ok["t"] == "upload_ok", ok
    await client.send_parts(ok["upload"], parts)
    return str(ok["upload"])


async def timed_commit(client: SyncClient, upload: str, timeout: float) -> tuple[Frame, float]:
    started = time.monotonic()
    reply = await client.request({"t": "commit", "upload": upload}, timeout=timeout)
    return reply, time.monotonic() - started


def rest(server: RunningServer | Node, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.http,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        follow_redirects=True,  # S3 downloads are presigned redirects (to the proxy)
    )


async def all_objects(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        r = await http.get("/v1/object", params={"after": after, "limit": 1000})
        assert r.status_code == 200, r.text
        body = r.json()
        out += body["objects"]
        if body["next"] is None:
            return out
        after = body["next"]


async def all_changes(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    since = 0
    while True:
        r = await http.get("/v1/changes", params={"since": since, "limit": 1000})
        assert r.status_code == 200, r.text
        body = r.json()
        out += body["changes"]
        since = body["cursor"]
        if not body["more"]:
            return out


def b64sha(part: dict[str, Any]) -> bytes:
    return base64.b64decode(part["sha256"])


async def audit(
    rig: Rig, server: RunningServer | Node, tokens: list[str]
) -> tuple[dict[int, Any], list[str]]:
    """The invariants that hold after any history, once faults are healed.

    Every object a client sees (object list and change feed) downloads completely
    with its declared sha256; every partition row has its store object; after the
    janitor no store object lacks a row, and no staging is left for uploads that
    are gone. Returns {object id: object map} of everything visible (for history
    checks) and the problems found.
    """
    problems: list[str] = []
    visible: dict[int, Any] = {}
    user_ids: list[int] = []
    for token in tokens:
        async with rest(server, token) as http:
            r = await http.get("/v1/account")
            assert r.status_code == 200, r.text
            user_ids.append(r.json()["user"])
            listed = {o["object"]: o for o in await all_objects(http)}
            mine: dict[int, Any] = {}
            feed = await all_changes(http)
            seqs = [c["seq"] for c in feed]
            if seqs != sorted(set(seqs)):
                problems.append(f"feed seqs not strictly ascending: {seqs}")
            for change in feed:
                oid = change["object"]
                r = await http.get(f"/v1/object/{oid}")
                if r.status_code != 200:
                    problems.append(f"object {oid} in the feed but GET says {r.status_code}")
                    continue
                obj = r.json()
                mine[oid] = obj
                if obj["status"] != change["status"] or obj["rev"] != change["rev"]:
                    problems.append(f"feed shows {oid} as {change}, GET as {obj}")
                if (obj["status"] == "active") != (oid in listed):
                    problems.append(f"object {oid} ({obj['status']}) listed={oid in listed}")
            for oid in listed:
                if oid not in mine:
                    problems.append(f"object {oid} is listed but not in the feed")
            visible.update(mine)
            for oid, obj in mine.items():
                if obj["status"] != "active":
                    continue
                total = sum(part["size"] for part in obj["parts"])
                if total != obj["size"]:
                    problems.append(f"object {oid}: parts add up to {total}, size {obj['size']}")
                for part in obj["parts"]:
                    r = await http.get(f"/v1/partition/{part['id']}")
                    if r.status_code != 200:
                        problems.append(
                            f"object {oid} rev {obj['rev']}: partition {part['id']} "
                            f"does not download: {r.status_code} {r.text[:200]}"
                        )
                        continue
                    if len(r.content) != part["size"] or sha(r.content) != b64sha(part):
                        problems.append(
                            f"object {oid}: partition {part['id']} has {len(r.content)} bytes "
                            f"that do not match its declared size {part['size']} / sha256"
                        )

    # The store and the rows agree, in both directions.
    rows = await rig.pool.fetch(
        """SELECT p.store_key, p.size FROM partitions p JOIN objects o ON o.id = p.object_id
           WHERE o.owner_id = ANY($1::bigint[])""",
        user_ids,
    )
    for row in rows:
        info = await rig.store.stat(row["store_key"])
        if info is None or info.size != row["size"]:
            problems.append(f"partition row {row['store_key']} points at {info} (missing data)")
    report = await rig.janitor()
    print(f"janitor at the end: {report}")
    stored = await rig.keys("partitions/")
    referenced = {
        r["store_key"]
        for r in await rig.pool.fetch(
            "SELECT store_key FROM partitions WHERE store_key = ANY($1) "
            "UNION SELECT store_key FROM garbage WHERE store_key = ANY($1)",
            list(stored),
        )
    }
    if stored - referenced:
        problems.append(f"store objects without a row after the janitor: {stored - referenced}")
    staging = await rig.keys("staging/")
    parsed = {k: keys.parse_staging_key(k) for k in staging}
    if strays := sorted(k for k, p in parsed.items() if p is None):
        problems.append(f"staging objects that are no upload's part: {strays}")
    uploads = {p[1] for p in parsed.values() if p is not None}
    open_ = {
        r["id"]
        for r in await rig.pool.fetch(
            "SELECT id FROM uploads WHERE id = ANY($1) AND state = 'open'", list(uploads)
        )
    }
    if uploads - open_:
        problems.append(f"staging left for uploads that are not open: {uploads - open_}")
    return visible, problems


async def count_objects(rig: Rig, uid: int) -> int:
    return int(await rig.pool.fetchval("SELECT count(*) FROM objects WHERE owner_id = $1", uid))


async def user_id(client: SyncClient) -> int:
    return int(client.welcome["user"])


# ------------------------------------------------ 1. the store fails mid-commit


async def test_store_cut_mid_commit(rig: Rig, proxied_server: Any) -> None:
    """The store goes away after some of the commit's CopyObjects went through."""
    server = proxied_server()
    user = await register_login(server.http, unique("s3cut"))
    client = await SyncClient.connect(server.ws, user["access"], device="s3cut")
    uid = await user_id(client)
    rng = random.Random(1)
    kept = chunks_of(rng, 2, 1000, 20 * KiB)
    before = await client.push(kept, name=b"committed before")
    parts = chunks_of(rng, 14, 1000, 60 * KiB)
    upload = await staged(client, parts, b"interrupted")
    problems: list[str] = []

    # Eight copies run at once: the tenth starts after some have finished. Then the
    # store is gone, so the server cannot clean up its copies either.
    copies = 0

    def on_copy() -> None:  # runs on the proxy's thread
        nonlocal copies
        copies += 1
        if copies == 10:
            rig.s3.refuse()
            rig.s3.cut()

    rig.s3.watch(b"x-amz-copy-source", on_copy, once=False)
    reply, took = await timed_commit(client, upload, ANSWER_BOUND + 10)
    print(f"store cut mid-commit answered in {took:.2f}s: {reply}")
    assert reply["t"] == "error", reply
    if (reply["code"], reply.get("retry")) != ("unavailable", True):
        problems.append(
            f"a commit whose store copies failed answered {reply['code']}/retry="
            f"{reply.get('retry')}, not unavailable/retry=true: {reply}"
        )
    assert took < ANSWER_BOUND

    # Nothing of it is visible: not listed, not in the feed, no object row.
    async with rest(server, user["access"]) as http:
        assert [o["object"] for o in await all_objects(http)] == [before["object"]]
        assert [c["object"] for c in await all_changes(http)] == [before["object"]]
    assert await count_objects(rig, uid) == 1
    await asyncio.sleep(0.5)  # a copy whose answer was cut may still land in the store
    committed = {r["store_key"] for r in await rig.pool.fetch("SELECT store_key FROM partitions")}
    orphans = await rig.keys(f"partitions/{uid}/") - committed
    print(f"partition copies the failed attempt left behind: {len(orphans)}")
    assert orphans, "the fault came too late or too early to leave copies behind"

    # The same upload commits once the store is back, and downloads intact.
    rig.s3.heal()
    again = await client.request({"t": "commit", "upload": upload})
    assert again["t"] == "committed", again
    change = await client.wait_for(lambda f: f["t"] == "change" and f["seq"] == again["seq"])
    for spec, data in zip(change["parts"], parts, strict=True):
        assert spec["sha256"] == sha(data)
        assert await client.download(spec["id"]) == data
    report = await rig.janitor()
    print(f"janitor: {report}")
    assert report.partition_orphans >= len(orphans)
    assert not orphans & await rig.keys("partitions/"), "the janitor left orphans behind"
    visible, found = await audit(rig, server, [user["access"]])
    assert sorted(visible) == sorted([before["object"], again["object"]])
    await client.close()
    assert not problems + found, "\n".join(problems + found)


async def test_store_stall_mid_commit_is_answered_in_bounded_time(
    rig: Rig, proxied_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store stops answering (a hung endpoint, sockets open) during the copies.

    The store gives up on a silent endpoint after READ_TIMEOUT (60 s). To keep the
    test short it is scaled down here; the commit must then answer within about
    one READ_TIMEOUT, not a multiple of it.
    """
    from server.stores import s3 as s3_module

    read_timeout = float(os.environ.get("TESSERA_FAULT_READ_TIMEOUT", "3"))
    monkeypatch.setattr(s3_module, "READ_TIMEOUT", read_timeout)
    server = proxied_server()
    user = await register_login(server.http, unique("s3stall"))
    client = await SyncClient.connect(server.ws, user["access"], device="s3stall")
    parts = chunks_of(random.Random(2), 3, 1000, 20 * KiB)
    upload = await staged(client, parts)
    rig.s3.watch(b"x-amz-copy-source", "stall")
    reply, took = await timed_commit(client, upload, 10 * read_timeout + 30)
    scaled = took * 60.0 / read_timeout
    print(
        f"store stalled mid-commit: answered after {took:.2f}s with READ_TIMEOUT="
        f"{read_timeout}s (~{scaled:.0f}s at the real 60 s): {reply}"
    )
    problems: list[str] = []
    if (reply["t"], reply.get("code"), reply.get("retry")) != ("error", "unavailable", True):
        problems.append(f"a stalled store answered {reply}, not unavailable/retry=true")
    if took > read_timeout * 1.5 + 0.5:  # two timeouts (6 s at 3 s) must fail
        problems.append(
            f"a stalled store held the commit for {took:.1f}s = {took / read_timeout:.1f} x "
            f"READ_TIMEOUT: at the real 60 s that is ~{scaled:.0f} s, over the "
            f"{ANSWER_BOUND:.0f} s bound"
        )
    rig.s3.heal()
    again = await client.request({"t": "commit", "upload": upload})
    assert again["t"] == "committed", again
    _, found = await audit(rig, server, [user["access"]])
    await client.close()
    assert not problems + found, "\n".join(problems + found)


# --------------------------------------------- 2. the database fails mid-commit


@pytest.mark.parametrize(
    "moment",
    [
        "statement-lost",  # the commit's statement never arrives: nothing is written
        "answer-lost",  # the statement ran, its answer is lost: committed, the server can't know
        "read-lost",  # the commit's first statement, its read, never arrives
    ],
)
async def test_database_cut_mid_commit(rig: Rig, proxied_server: Any, moment: str) -> None:
    server = proxied_server()
    user = await register_login(server.http, unique("pgcut"))
    client = await SyncClient.connect(server.ws, user["access"], device="pgcut")
    uid = await user_id(client)
    parts = chunks_of(random.Random(3), 5, 1000, 40 * KiB)
    upload = await staged(client, parts, b"interrupted")
    if moment == "statement-lost":
        trigger = rig.pg.watch(commit_statement(uid), "cut")
    elif moment == "answer-lost":
        trigger = rig.pg.watch(commit_statement(uid), "cut_after")
    else:  # the parts are staged: the next statement naming the upload is the read
        trigger = rig.pg.watch(upload.encode(), "cut")
    reply, took = await timed_commit(client, upload, ANSWER_BOUND + 10)
    print(f"database cut {moment}: answered in {took:.2f}s: {reply}")
    assert trigger.fired.is_set(), "the fault never happened"
    assert took < ANSWER_BOUND
    problems: list[str] = []
    exists = await count_objects(rig, uid)
    # Truthful either way: committed means it exists; an error means it does not,
    # unless a retry of the same commit returns that result (commit is idempotent).
    if reply["t"] == "committed":
        assert exists == 1
    elif (reply["code"], reply.get("retry")) != ("unavailable", True):
        problems.append(f"a database cut answered {reply}, not unavailable/retry=true")
    # The session survived the database cut.
    assert (await client.request({"t": "ping"}))["t"] == "pong"

    results = [reply]
    deadline = time.monotonic() + 30
    while results[-1]["t"] != "committed":
        assert time.monotonic() < deadline, f"the commit never went through: {results}"
        await asyncio.sleep(0.2)
        results.append(await client.request({"t": "commit", "upload": upload}))
    done = results[-1]
    print(
        f"commit answers: {[(r['t'], r.get('code')) for r in results]}; the first attempt "
        f"{'had' if exists else 'had not'} committed"
    )
    assert await count_objects(rig, uid) == 1
    again = await client.request({"t": "commit", "upload": upload})
    assert (again["t"], again["object"], again["rev"]) == ("committed", done["object"], done["rev"])

    # Acknowledged: every byte downloads with the declared sha256.
    async with rest(server, user["access"]) as http:
        obj = (await http.get(f"/v1/object/{done['object']}")).json()
    lost = []
    for spec, data in zip(obj["parts"], parts, strict=True):
        assert b64sha(spec) == sha(data)
        try:
            got = await client.download(spec["id"])
        except AssertionError as exc:
            lost.append(f"partition {spec['id']}: {exc}")
            continue
        if got != data:
            lost.append(f"partition {spec['id']}: {len(got)} bytes, not the committed data")
    if lost:
        problems.append(
            f"acknowledged commit {done} lost its data after a database cut {moment}:\n  "
            + "\n  ".join(lost)
        )
    _, found = await audit(rig, server, [user["access"]])
    await client.close()
    assert not problems + found, "\n".join(problems + found)


@pytest.mark.parametrize(
    "moment",
    [
        "statement-lost",  # the put's statement never arrives
        "before-commit",  # it ran in its transaction; the connection ends before COMMIT
        "commit-lost",  # COMMIT never arrives: rolled back
        "answer-lost",  # COMMIT ran, its answer is lost: committed, the server can't know
    ],
)
async def test_database_cut_mid_put(rig: Rig, proxied_server: Any, moment: str) -> None:
    """A put's batch runs its statement in a transaction that commits once the
    data is stored. Cut anywhere in it, the put is answered truthfully (committed,
    or unavailable and retryable), and resending it commits exactly one object
    whose data downloads."""
    server = proxied_server()
    user = await register_login(server.http, unique("putcut"))
    client = await SyncClient.connect(server.ws, user["access"], device="putcut")
    uid = await user_id(client)
    statement = commit_statement(uid)  # the put's partition key, a bound parameter
    trigger = {
        "statement-lost": lambda: rig.pg.watch(statement, "cut"),
        "before-commit": lambda: rig.pg.watch(statement, "cut_after"),
        "commit-lost": lambda: rig.pg.watch(b"COMMIT", "cut", after=statement),
        "answer-lost": lambda: rig.pg.watch(b"COMMIT", "cut_after", after=statement),
    }[moment]()
    data = random.Random(5).randbytes(3000)
    frame = client.put_frame(data)
    started = time.monotonic()
    reply = await client.put(frame, timeout=ANSWER_BOUND + 10)
    took = time.monotonic() - started
    print(f"database cut {moment} mid-put: answered in {took:.2f}s: {reply}")
    assert trigger.fired.is_set(), "the fault never happened"
    assert took < ANSWER_BOUND
    exists = await count_objects(rig, uid)
    if reply["t"] == "committed":
        assert exists == 1
    else:
        assert (reply["code"], reply.get("retry")) == ("unavailable", True), reply
        assert exists == (1 if moment == "answer-lost" else 0)
    results = [reply]
    deadline = time.monotonic() + 30
    while results[-1]["t"] != "committed":
        assert time.monotonic() < deadline, f"the put never went through: {results}"
        await asyncio.sleep(0.2)
        results.append(await client.put({**frame, "rid": client.rid()}))
    done = results[-1]
    again = await client.put({**frame, "rid": client.rid()})
    assert (again["t"], again["object"], again["seq"]) == ("committed", done["object"], done["seq"])
    assert await count_objects(rig, uid) == 1
    async with rest(server, user["access"]) as http:
        obj = (await http.get(f"/v1/object/{done['object']}")).json()
    assert [await client.download(spec["id"]) for spec in obj["parts"]] == [data]
    _, found = await audit(rig, server, [user["access"]])
    await client.close()
    assert not found, "\n".join(found)


async def test_database_stall_mid_commit_is_answered_in_bounded_time(
    rig: Rig, proxied_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL stops answering inside the commit's transaction (sockets stay open).

    The pool's command_timeout (60 s) is what ends the wait; it is scaled down here
    (TESSERA_FAULT_COMMAND_TIMEOUT=60 for the real thing). The commit must answer
    unavailable within about one command_timeout, and go through once PostgreSQL is back.
    """
    import server.app

    timeout = float(os.environ.get("TESSERA_FAULT_COMMAND_TIMEOUT", "3"))
    real_create_pool = asyncpg.create_pool

    async def create_pool(url: str, **kw: int) -> asyncpg.Pool:  # server.db.create_pool, scaled
        kw = {"min_size": 2, "max_size": 20, **kw}
        pool = await real_create_pool(url, command_timeout=timeout, **kw)
        assert pool is not None
        return pool

    monkeypatch.setattr(server.app, "create_pool", create_pool)
    server_ = proxied_server()
    user = await register_login(server_.http, unique("pgstall"))
    client = await SyncClient.connect(server_.ws, user["access"], device="pgstall")
    uid = await user_id(client)
    parts = chunks_of(random.Random(5), 3, 1000, 20 * KiB)
    upload = await staged(client, parts)
    trigger = rig.pg.watch(commit_statement(uid), "stall")
    reply, took = await timed_commit(client, upload, 10 * timeout + 60)
    scaled = took * 60.0 / timeout
    print(
        f"database stalled mid-commit: answered after {took:.2f}s with command_timeout="
        f"{timeout}s (~{scaled:.0f}s at the real 60 s): {reply}"
    )
    assert trigger.fired.is_set()
    problems: list[str] = []
    if (reply["t"], reply.get("code"), reply.get("retry")) != ("error", "unavailable", True):
        problems.append(f"a stalled database answered {reply}, not unavailable/retry=true")
    if took > timeout * 1.5 + 0.5:  # two timeouts (6 s at 3 s) must fail
        problems.append(
            f"a stalled database held the commit for {took:.1f}s = {took / timeout:.1f} x "
            f"command_timeout: at the real 60 s that is ~{scaled:.0f} s, over the "
            f"{ANSWER_BOUND:.0f} s bound"
        )
    rig.pg.heal()
    results = [reply]
    deadline = time.monotonic() + 30 + 4 * timeout
    while results[-1]["t"] != "committed" and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        results.append(await client.request({"t": "commit", "upload": upload}, 4 * timeout + 10))
    print(f"commit answers after the stall: {[(r['t'], r.get('code')) for r in results]}")
    assert results[-1]["t"] == "committed", results
    assert await count_objects(rig, uid) == 1
    _, found = await audit(rig, server_, [user["access"]])
    await client.close()
    assert not problems + found, "\n".join(problems + found)


# --------------------------------- 3. SIGKILL between the copy and the commit


@pytest.mark.parametrize(
    "moment",
    [
        "after-copies",  # every copy is in the store, the transaction never completes
        "commit-in-flight",  # the commit's statement is on the wire when the process dies
    ],
)
async def test_sigkill_between_copy_and_commit(rig: Rig, tmp_path: Path, moment: str) -> None:
    """A real server process is SIGKILLed in the middle of a commit; a fresh one takes over."""
    nodes: list[Node] = []

    def node(name: str) -> Node:
        data_dir = tmp_path / name
        data_dir.mkdir()
        args = node_args(data_dir, rig.pg_url, rig.s3_proxied, rig.buckets, None)
        args += [f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items()]
        started = Node(args, tmp_path / f"{name}.log")
        nodes.append(started)
        return started.start()

    try:
        first = await asyncio.to_thread(node, "killed")
        user = await register_login(first.http, unique("sigkill"))
        client = await SyncClient.connect(first.ws, user["access"], device="sigkill")
        uid = await user_id(client)
        kept = [os.urandom(3000)]
        before = await client.push(kept, name=b"before")
        parts = chunks_of(random.Random(4), 6, 1000, 50 * KiB)
        upload = await staged(client, parts, b"killed mid-commit")
        held = await rig.keys(f"partitions/{uid}/")

        if moment == "after-copies":
            # At the first CopyObject, hold the database: the copies finish, the
            # transaction cannot.
            rig.s3.watch(b"x-amz-copy-source", lambda: rig.pg.stall())
        else:  # hold the commit's statement itself, undelivered
            commit = rig.pg.watch(commit_statement(uid), "stall")
        await client.send({"t": "commit", "rid": 999, "upload": upload})
        deadline = time.monotonic() + 30
        while len(await rig.keys(f"partitions/{uid}/")) < len(held) + len(parts) or (
            moment == "commit-in-flight" and not commit.fired.is_set()
        ):
            assert time.monotonic() < deadline, "the commit never got that far"
            await asyncio.sleep(0.05)
        assert first.proc is not None
        first.proc.kill()
        first.proc.wait()
        if moment == "after-copies":
            rig.pg.cut()  # the dead process's connections go with it
        # commit-in-flight: the held statement is delivered late, after the process died.
        rig.heal()
        client.ws.transport.abort()
        copies = await rig.keys(f"partitions/{uid}/") - held
        print(f"killed ({moment}) with {len(copies)} partition copies in the store")
        assert len(copies) == len(parts)

        second = await asyncio.to_thread(node, "fresh")
        if moment == "after-copies":
            # Nothing of the killed commit is visible.
            assert await count_objects(rig, uid) == 1
            assert await rig.pool.fetchval("SELECT state FROM uploads WHERE id = $1", upload) == (
                "open"
            )
        client = await SyncClient.connect(second.ws, user["access"], device="sigkill")
        resumed = await client.request({"t": "resume", "upload": upload})
        print(f"resume on the fresh node: {resumed}")
        if moment == "after-copies":
            assert resumed["t"] == "upload_ok", resumed
            assert resumed["have"] == list(range(len(parts))), resumed
        done = await client.request({"t": "commit", "upload": upload})
        assert done["t"] == "committed", done
        assert await count_objects(rig, uid) == 2
        report = await rig.janitor()
        print(f"janitor after the kill: {report}")
        survivors = await rig.keys(f"partitions/{uid}/")
        if moment == "after-copies":
            assert report.partition_orphans == len(parts)
            assert not survivors & copies
        else:  # the late COMMIT won: those copies are the object's data now
            assert report.partition_orphans == 0
            assert survivors == held | copies
        visible, found = await audit(rig, second, [user["access"]])
        assert sorted(visible) == sorted([before["object"], done["object"]])
        change = await client.wait_for(lambda f: f["t"] == "change" and f["seq"] == done["seq"])
        for spec, data in zip(change["parts"], parts, strict=True):
            assert await client.download(spec["id"]) == data
        await client.close()
        assert not found, "\n".join(found)
    finally:
        rig.heal()
        for n in nodes:
            await asyncio.to_thread(n.stop)


# -------------------------------------------------- 4. a randomized history


def fault_seeds() -> list[int]:
    raw = os.environ.get("TESSERA_FAULT_SEEDS", "")
    if raw.strip():
        return [int(s) for s in raw.replace(",", " ").split()]
    return [random.SystemRandom().randrange(10**9) for _ in range(5)]


@dataclass
class Op:
    """One write in the history, with every answer the server gave to it."""

    id: int
    worker: int
    kind: str  # create, overwrite, delete
    object: int | None = None
    base: int | None = None
    parts: list[bytes] = field(default_factory=list)
    upload: str | None = None
    commit_sent: bool = False
    answers: list[Frame | str] = field(default_factory=list)  # "lost": no answer

    @property
    def result(self) -> Frame | None:
        for answer in self.answers:
            if isinstance(answer, dict) and answer["t"] == "committed":
                return answer
        return None

    @property
    def definitive(self) -> bool:
        last = self.answers[-1] if self.answers else None
        return isinstance(last, dict) and (
            last["t"] == "committed" or last.get("code") not in ("unavailable", None)
        )

    @property
    def indeterminate(self) -> bool:
        """A delete whose only answer was unavailable or lost: it may have happened.

        (Deletes are not idempotent: asking again after a lost answer is a new
        request, which says not_found or conflict if the first one went through.
        Commits are asked again until definitive: the upload id makes them idempotent.)
        """
        return self.kind == "delete" and self.commit_sent and not self.definitive


class Worker:
    """One device: a sequence of writes, reconnecting whenever its session dies."""

    def __init__(self, index: int, server: RunningServer, token: str, seed: int) -> None:
        self.index = index
        self.server = server
        self.token = token
        self.rng = random.Random(seed)
        self.client: SyncClient | None = None

    async def session(self) -> SyncClient:
        if self.client is None:
            self.client = await SyncClient.connect(
                self.server.ws, self.token, device=f"worker-{self.index}", synced=False
            )
        return self.client

    async def drop(self) -> None:
        if self.client is not None:
            self.client.ws.transport.abort()
            self.client = None

    async def ask(self, frame: Frame, timeout: float = 20) -> Frame | str:
        """A request's answer, or "lost" when the session died without one."""
        try:
            client = await self.session()
            return await client.request(frame, timeout=timeout)
        except (websockets.WebSocketException, TimeoutError, OSError, AssertionError) as exc:
            await self.drop()
            return f"lost: {type(exc).__name__}"

    async def stage(self, op: Op) -> bool:
        """Declare and send the parts (resuming after failures); True when all are stored."""
        for _ in range(6):
            if op.upload is None:
                frame: Frame = {"t": "upload", "kind": "file", "meta": meta_of(op), "parts": []}
                frame["parts"] = [spec_of(op, i, p) for i, p in enumerate(op.parts)]
                if op.kind == "overwrite":
                    frame["object"], frame["base"] = op.object, op.base
                answer = await self.ask(frame)
                if isinstance(answer, str) or answer["t"] != "upload_ok":
                    if isinstance(answer, dict) and answer.get("code") != "unavailable":
                        op.answers.append(answer)  # conflict, not found: a definitive no
                        return False
                    await asyncio.sleep(0.2)
                    continue
                op.upload, have = answer["upload"], []
            else:
                answer = await self.ask({"t": "resume", "upload": op.upload})
                if isinstance(answer, str) or answer["t"] != "upload_ok":
                    await asyncio.sleep(0.2)
                    continue
                have = answer["have"]
            missing = [i for i in range(len(op.parts)) if i not in have]
            if not missing:
                return True
            try:
                client = await self.session()
                await asyncio.wait_for(client.send_parts(op.upload, op.parts, missing), 20)
                return True
            except (websockets.WebSocketException, TimeoutError, OSError, AssertionError):
                await self.drop()  # a part failed (e.g. store down): resume and resend
                await asyncio.sleep(0.2)
        return False

    async def commit(self, op: Op, attempts: int) -> None:
        for _ in range(1 if op.kind == "delete" else attempts):
            if op.kind == "delete":
                frame: Frame = {"t": "delete", "object": op.object, "base": op.base}
            else:
                frame = {"t": "commit", "upload": op.upload}
            op.commit_sent = True
            op.answers.append(await self.ask(frame))
            if op.definitive:
                return
            await asyncio.sleep(0.2)


def meta_of(op: Op) -> dict[str, bytes]:
    return {"name": b"op-%d" % op.id, "mtime": b"m", "key": b"k", "salt": bytes(16)}


def spec_of(op: Op, index: int, data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": sha(data), "key": b"k%d" % index, "salt": bytes(12)}


async def fault_schedule(rig: Rig, rng: random.Random, stop: asyncio.Event, log: list[str]) -> None:
    """Short faults, one after another, chosen by the seed."""
    started = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.05, 0.4))
        proxy_name = rng.choice(["pg", "s3"])
        proxy = rig.pg if proxy_name == "pg" else rig.s3
        action = rng.choice(["stall", "cut", "refuse", "cut-on-write"])
        window = rng.uniform(0.1, 1.0)
        log.append(f"{time.monotonic() - started:6.2f}s {proxy_name} {action} {window:.2f}s")
        if action == "stall":
            proxy.stall()
        elif action == "cut":
            proxy.cut()
        elif action == "refuse":
            proxy.refuse()
            proxy.cut()
        else:  # at the next COMMIT / CopyObject: the riskiest moment of a commit
            # (a new object's commit is one statement, binding its partition keys)
            pattern = (
                rng.choice([b"COMMIT;", b"partitions/"])
                if proxy_name == "pg"
                else b"x-amz-copy-source"
            )
            proxy.watch(pattern, "cut_after" if proxy_name == "pg" else "cut")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), window)
        proxy.heal()


async def run_worker(
    worker: Worker, ops: list[Op], known: dict[int, tuple[int, str]], count: int, next_id: Any
) -> None:
    rng = worker.rng
    for _ in range(count):
        live = sorted(known)
        roll = rng.random()
        op = Op(id=next(next_id), worker=worker.index, kind="create")
        if live and roll < 0.45:
            obj = rng.choice(live)
            op.object, op.base = obj, known[obj][0]
            op.kind = "delete" if rng.random() < 0.3 and known[obj][1] == "active" else "overwrite"
        if op.kind != "delete":
            op.parts = chunks_of(rng, rng.randint(1, 3), 1, 40 * KiB)
        ops.append(op)
        if op.kind != "delete" and not await worker.stage(op):
            continue
        await worker.commit(op, attempts=3)
        done = op.result
        if done is not None:
            status = "deleted" if op.kind == "delete" else "active"
            if done["object"] not in known or known[done["object"]][0] < done["rev"]:
                known[done["object"]] = (done["rev"], status)


@pytest.mark.parametrize("seed", fault_seeds(), ids=lambda s: f"seed={s}")
async def test_randomized_history_under_faults(rig: Rig, proxied_server: Any, seed: int) -> None:
    print(f"fault history seed {seed} (replay: TESSERA_FAULT_SEEDS={seed})")
    rng = random.Random(seed)
    server = proxied_server()
    users = [await register_login(server.http, unique(f"h{i}")) for i in range(2)]
    workers = [Worker(i, server, users[i % 2]["access"], rng.randrange(2**32)) for i in range(4)]
    ops: list[Op] = []
    known: list[dict[int, tuple[int, str]]] = [{}, {}]  # per user: object -> (rev, status)
    ids = iter(range(1, 10**6))
    stop = asyncio.Event()
    faults: list[str] = []
    schedule = asyncio.create_task(fault_schedule(rig, random.Random(rng.random()), stop, faults))
    try:
        await asyncio.wait_for(
            asyncio.gather(
                *(run_worker(w, ops, known[w.index % 2], OPS_PER_WORKER, ids) for w in workers)
            ),
            90,
        )
    finally:
        stop.set()
        await schedule
        rig.heal()
    print("faults:\n  " + "\n  ".join(faults))

    # Settle: every commit that was sent is asked again until the answer is definitive.
    for op in ops:
        if op.commit_sent and not op.definitive and op.kind != "delete":
            await workers[op.worker].commit(op, attempts=10)
    for w in workers:
        await w.drop()
    outcomes = Counter(outcome(op) for op in ops)
    print(f"{len(ops)} ops: {dict(outcomes)}")

    visible, problems = await audit(rig, server, [u["access"] for u in users])
    problems += check_history(ops, visible)
    if problems:
        print("history:\n  " + "\n  ".join(describe(op) for op in ops))
    assert not problems, f"seed {seed} (replay: TESSERA_FAULT_SEEDS={seed}):\n" + "\n".join(
        problems
    )


def describe(op: Op) -> str:
    def short(answer: Frame | str) -> str:
        if isinstance(answer, str):
            return answer
        if answer["t"] == "committed":
            return f"committed {answer['object']}@{answer['rev']}"
        return f"{answer['t']} {answer.get('code', '')}"

    target = f" {op.object}@{op.base}" if op.object else ""
    return (
        f"op {op.id} worker {op.worker}: {op.kind}{target} parts={len(op.parts)} "
        f"upload={op.upload} -> {[short(a) for a in op.answers]}"
    )


def outcome(op: Op) -> str:
    last = op.answers[-1] if op.answers else "not attempted"
    if isinstance(last, str):
        return last
    return f"{op.kind} {last['t']} {last.get('code', '')}".strip()


def check_history(ops: list[Op], visible: dict[int, Any]) -> list[str]:
    """Jepsen-style: each visible (object, rev) is accounted for by exactly one write.

    A revision comes from an acknowledged write, or (only) from a delete whose
    answer was lost; the final state holds exactly what that write declared;
    every acknowledged write is visible at its revision or was superseded.
    """
    problems: list[str] = []
    acked: dict[tuple[int, int], Op] = {}
    maybe: dict[tuple[int, int], list[Op]] = {}  # deletes that may have happened
    for op in ops:
        answers = [a for a in op.answers if isinstance(a, dict)]
        results = {(a["object"], a["rev"]) for a in answers if a["t"] == "committed"}
        if len(results) > 1:
            problems.append(f"op {op.id} was acknowledged as different commits: {results}")
        if results and any(a["t"] == "error" and a["code"] != "unavailable" for a in answers):
            problems.append(f"op {op.id} was both refused and committed: {answers}")
        if op.commit_sent and not op.definitive and not op.indeterminate:
            problems.append(f"op {op.id} never got a definitive answer: {op.answers}")
        if op.indeterminate and op.object is not None and op.base is not None:
            maybe.setdefault((op.object, op.base + 1), []).append(op)
        for key in results:
            if key in acked:
                problems.append(f"ops {acked[key].id} and {op.id} were both acked as {key}")
            acked[key] = op
    for oid, obj in visible.items():
        for rev in range(1, obj["rev"] + 1):
            if (oid, rev) not in acked and (oid, rev) not in maybe:
                problems.append(
                    f"object {oid} rev {rev} (now at rev {obj['rev']}, {obj['status']}) was "
                    "never acknowledged and no write whose answer was lost can explain it"
                )
        lost = sorted(rev for (o, rev) in acked if o == oid and rev > obj["rev"])
        if lost:
            problems.append(f"object {oid} is at rev {obj['rev']}; acked revs {lost} are lost")
        op = acked.get((oid, obj["rev"]))
        if op is None:
            if (oid, obj["rev"]) in maybe and obj["status"] != "deleted":
                problems.append(f"object {oid} rev {obj['rev']} should be a tombstone: {obj}")
            continue
        if op.kind == "delete":
            if obj["status"] != "deleted":
                problems.append(f"object {oid}: acked delete (op {op.id}) but {obj['status']}")
        elif obj["status"] != "active" or [b64sha(p) for p in obj["parts"]] != [
            sha(p) for p in op.parts
        ]:
            problems.append(f"object {oid} rev {obj['rev']} is not what op {op.id} committed")
    for (oid, rev), op in acked.items():
        if oid not in visible:
            problems.append(f"op {op.id}: acked object {oid} rev {rev} is not visible at all")
    return problems
