"""Fuzzing a live session: hypothesis draws programs of valid and invalid frames.

A program is a list of operations (``tests/support/model.py``): declare,
put (a whole small file in one frame), chunk, send a part or all parts, commit,
resume, abort, delete, get, info, ping, an unknown frame type, a malformed
message, a dropped connection. Ids are selectors over what the model knows plus
a bogus id and another user's id, and two connection slots let an upload be
resumed on a second session while the first is still open. The driver runs the
program against one real server (one fresh user per example), checks every reply
against the model's prediction and every live connection with a ``ping``
barrier (no frame nobody asked for), and after every program asserts:

* the server is healthy (``/healthz``, a fresh session answers ``ping``);
* the database holds exactly the model's objects, uploads, received parts,
  quota usage and feed head, and no committed object changed unless a commit or
  delete said so: each downloads byte-identical with the model's rev and
  metadata (WebSocket ``get``/``info``, REST, and a catch-up feed from 0);
  every ``change`` any session saw was one a commit or delete reported;
* the staging area holds exactly the received parts of open uploads, no
  spool file of these uploads is left once every session has ended, no commit
  lock is still held, every partition row has its data, and after a janitor
  run with ``orphan_grace=0`` every partition blob has a row.

Seeds. Each run prints ``fuzz seed=N`` (and a failure repeats it); with
``TESSERA_FUZZ_SEED=N`` the run draws exactly the same programs again: every
byte sent derives from hypothesis's draws, and where timing decides an outcome
(a request cut off by a dropped connection, a part in flight), the model asks
the database once the server side of that session has ended.
``TESSERA_FUZZ_EXAMPLES=N`` runs N programs (default 250; long runs: more);
``TESSERA_FUZZ_TRACE=file`` appends every program's trace to a file. A run that
finds a bug goes into ``REGRESSION_SEEDS``, and its shrunk program becomes an
explicit ``test_regression_*`` below.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgpack
import pytest
import websockets
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from protocol.codec import encode
from server import keys
from server.janitor import Janitor
from server.session import Session
from tests.conftest import unique
from tests.support.client import register_login
from tests.support.model import (
    BOGUS_ID,
    BOGUS_UPLOAD,
    FLAWS,
    VIOLATIONS,
    Abort,
    Chunk,
    Commit,
    Declare,
    Delete,
    Drop,
    Get,
    Info,
    MObject,
    Model,
    MRecord,
    MSession,
    MUpload,
    Op,
    PartData,
    Ping,
    Put,
    Reply,
    Resume,
    SendAll,
    SendPart,
    Unknown,
    Violation,
    blob,
    drop_upload,
    make_meta,
    make_parts,
)
from tests.support.server import RunningServer

Frame = dict[str, Any]

MAX_CHUNK = 4096
LIMITS: dict[str, int] = {
    "max_chunk": MAX_CHUNK,
    "max_frame": MAX_CHUNK + 64 * 1024,
    "window": 16384,
    "max_partition": 16384,
    "max_parts": 8,
}
#: Small enough that multi-part uploads regularly hit it.
QUOTA = 48 * 1024

SEED = int(os.environ.get("TESSERA_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
EXAMPLES = int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "250"))
#: A file to append the trace of every program to (to see what the programs do).
TRACE = os.environ.get("TESSERA_FUZZ_TRACE", "")
#: Runs that found a bug, as (seed, programs): each replays the same programs, without
#: shrinking (the shrunk programs are the explicit ``test_regression_*`` below). The
#: programs are exact; where the bug is a race, a replay can still miss it.
REGRESSION_SEEDS: list[tuple[int, int]] = [
    # A commit lock still held after commits cut off by dropped connections
    # (test_regression_request_cut_off_by_a_disconnect_keeps_its_lock).
    (105, 5),
    # A part answered "unavailable" (File exists) while its upload's directory was
    # pruned (tests/test_stores.py test_local_put_meets_a_prune_of_its_directory).
    (777, 140),
    # An aborted upload's staged parts left behind: the abort was cut off after its
    # delete (test_regression_abort_cut_off_while_it_deletes_leaves_staged_parts).
    (1016603272, 92),
]

#: Ids of sessions whose server side has ended (filled by the patched Session.run).
FINISHED: set[str] = set()

NOISE = ("synced",)


# ------------------------------------------------------------------ strategies


def programs(max_size: int = 40) -> st.SearchStrategy[list[Op]]:
    slot = st.sampled_from((0, 0, 0, 1))
    # Selectors: 0 is the likeliest target (the newest open upload on this session, the
    # newest object, the newest part); -1 is a bogus id, -2 another user's.
    ref = st.sampled_from((0, 0, 0, 0, 1, 1, 2, 3, 5, -1, -2))
    part = st.integers(0, 8)
    # How long after a request its connection drops: the cut lands at different points
    # of the server's work (before the database, inside the transaction, after it).
    after = st.sampled_from((0.0, 0.0, 0.0005, 0.001, 0.002, 0.004, 0.008))
    chunk = st.sampled_from((MAX_CHUNK, 1000, 4095, 2048, 517))
    size = st.integers(1, LIMITS["max_partition"])
    sizes = st.lists(st.one_of(st.integers(1, 600), size), max_size=4).map(tuple)
    base = st.sampled_from(("right", "right", "stale", "ahead"))
    wait = st.sampled_from((True, True, False))
    resume = st.sampled_from((True, True, True, False))
    declare = st.builds(
        Declare,
        slot=slot,
        target=st.none() | ref,
        base=base,
        kind=st.sampled_from(("file", "file", "file", "dir", "flip")),
        sizes=sizes,
        seed=st.integers(0, 1 << 16),
        flaw=st.none() | st.none() | st.none() | st.sampled_from(FLAWS),
        drop=st.sampled_from((False,) * 7 + (True,)),
        after=after,
    )
    send_part = st.builds(
        SendPart,
        slot=slot,
        upload=ref,
        part=part,
        chunk=chunk,
        corrupt=st.sampled_from((False, False, False, True)),
        wait=wait,
        resume=resume,
    )
    send_all = st.builds(
        SendAll,
        slot=slot,
        upload=ref,
        chunk=chunk,
        corrupt=st.none() | st.none() | st.none() | part,
        wait=wait,
        resume=resume,
    )
    one_chunk = st.builds(
        Chunk,
        slot=slot,
        upload=ref,
        part=part,
        off=st.sampled_from(("right", "right", "zero", "ahead", "behind")),
        size=st.sampled_from((MAX_CHUNK, 1, 0, 100, MAX_CHUNK + 1, 1 << 14)),
        corrupt=st.booleans(),
    )
    rare_drop = st.sampled_from((False,) * 5 + (True,))
    put = st.builds(
        Put,
        slot=slot,
        target=st.none() | ref,
        base=base,
        size=st.sampled_from((1, 100, 1000, MAX_CHUNK)),
        seed=st.integers(0, 1 << 16),
        corrupt=st.sampled_from((False,) * 7 + (True,)),
        resend=st.sampled_from((False, False, True)),
        drop=st.sampled_from((False,) * 5 + (True,)),
        after=after,
    )
    weighted: list[tuple[int, st.SearchStrategy[Op]]] = [
        (4, declare),
        (3, put),
        (4, send_all),
        (1, st.builds(Violation, slot=slot, kind=st.sampled_from(sorted(VIOLATIONS)))),
        (2, send_part),
        (2, one_chunk),
        (1, st.builds(Drop, slot=slot, abrupt=st.booleans())),
        (4, st.builds(Commit, slot=slot, upload=ref, drop=rare_drop, after=after)),
        (2, st.builds(Resume, slot=slot, upload=ref, drop=rare_drop, after=after)),
        (1, st.builds(Abort, slot=slot, upload=ref, drop=rare_drop, after=after)),
        (2, st.builds(Delete, slot=slot, obj=ref, base=base, drop=rare_drop, after=after)),
        (
            2,
            st.builds(
                Get, slot=slot, part=ref, off=st.sampled_from(("zero", "mid", "end", "past"))
            ),
        ),
        (1, st.builds(Info, slot=slot, part=ref)),
        # Last: the draw of a branch leans to both ends of the list.
        (1, st.builds(Ping, slot=slot) | st.builds(Unknown, slot=slot, rid=st.booleans())),
    ]
    # (one_of would treat repeated branches as one: sample from the expanded list instead)
    op = st.sampled_from([s for weight, s in weighted for _ in range(weight)]).flatmap(lambda s: s)
    # Programs start by declaring something, so that most of them have work to do.
    start = st.lists(
        declare.map(lambda d: replace(d, drop=False, flaw=None)), min_size=1, max_size=2
    )
    body = st.integers(1, max_size).flatmap(lambda n: st.lists(op, min_size=n, max_size=n))
    return st.tuples(start, body).map(lambda t: [*t[0], *t[1]])


# ------------------------------------------------------------------ the wire


class Conn:
    """One WebSocket session: a reader task sorts frames into credit, feed and inbox."""

    def __init__(self, ws: Any, welcome: Frame) -> None:
        self.ws = ws
        self.session: str = welcome["session"]
        self.user: int = welcome["user"]
        self.credit: int = welcome["limits"]["window"]
        self.inbox: list[Frame] = []
        self.changes: list[Frame] = []
        self.problems: list[str] = []
        self.arrived = asyncio.Event()
        self.done = asyncio.Event()
        self.close_code: int | None = None
        self._rids = itertools.count(1)
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, token: str, device: str) -> Conn:
        ws = await websockets.connect(url, max_size=None, compression=None, ping_interval=None)
        await ws.send(encode({"t": "hello", "v": 1, "token": token, "device": device, "cursor": 0}))
        welcome = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 15), raw=False)
        assert welcome["t"] == "welcome", welcome
        conn = cls(ws, welcome)
        await conn.take(lambda f: f["t"] == "synced")
        return conn

    async def _read(self) -> None:
        last = 0
        try:
            async for raw in self.ws:
                if not isinstance(raw, bytes):
                    self.problems.append(f"server sent a text message {raw!r}")
                    continue
                frame = msgpack.unpackb(raw, raw=False)
                t = frame.get("t")
                if t == "credit":
                    self.credit += frame["bytes"]
                elif t == "change":
                    if frame["seq"] <= last:
                        self.problems.append(f"feed seq {frame['seq']} after {last}")
                    last = frame["seq"]
                    self.changes.append(frame)
                elif t != "expiring":
                    self.inbox.append(frame)
                self.arrived.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self.done.set()
            self.arrived.set()

    def rid(self) -> int:
        return next(self._rids)

    async def _wait(self, deadline: float, what: str) -> None:
        self.arrived.clear()
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {what}; inbox {self.inbox[-5:]}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.arrived.wait(), left)

    async def take(
        self, match: Callable[[Frame], bool], timeout: float = 10, what: str = ""
    ) -> Frame:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for i, frame in enumerate(self.inbox):
                if match(frame):
                    return self.inbox.pop(i)
            if self.done.is_set():
                raise AssertionError(
                    f"connection closed ({self.close_code}) while waiting for {what or 'a frame'}"
                )
            await self._wait(deadline, what or "a frame")

    async def send(self, frame: Frame) -> None:
        await self.ws.send(encode(frame))

    async def request(self, frame: Frame) -> tuple[int, Frame]:
        rid = self.rid()
        await self.send({**frame, "rid": rid})
        reply = await self.take(
            lambda f: f.get("rid") == rid and f["t"] != "data", what=f"reply to {frame['t']}"
        )
        return rid, reply

    async def chunk(self, upload: str, part: int, off: int, data: bytes) -> None:
        """Send a chunk within credit; one over max_chunk is not charged (§4.3)."""
        charged = len(data) <= MAX_CHUNK
        if charged:
            deadline = asyncio.get_running_loop().time() + 20
            while self.credit < len(data):
                await self._wait(deadline, "credit")
            self.credit -= len(data)
        await self.send({"t": "chunk", "upload": upload, "part": part, "off": off, "data": data})

    def abort(self) -> None:
        self.ws.transport.abort()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        await self.finished()

    async def finished(self, timeout: float = 10) -> int | None:
        await asyncio.wait_for(self.done.wait(), timeout)
        return self.close_code


# ------------------------------------------------------------------ the driver


def _append(path: Path, text: str) -> None:
    with path.open("a") as out:
        out.write(text)


@dataclass
class Pending:
    """A part whose last chunk was sent; its part_ok or error is still to come."""

    slot: int
    upload: str
    part: int
    matches: bool
    closed: bool


@dataclass
class Foreign:
    """Another user's committed object and open upload: never reachable by the fuzzed user."""

    token: str
    object: int
    part_ids: list[int]
    parts: list[bytes]
    upload: str


@dataclass
class FuzzEnv:
    server: RunningServer
    database_url: str
    foreign: Foreign
    examples: int = 0
    ops: int = 0
    foreign_user: int = 0
    seed: int | None = None
    times: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    stats: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def run(self, program: list[Op]) -> None:
        self.examples += 1
        self.ops += len(program)
        asyncio.run(Driver(self).run(program))


class Driver:
    def __init__(self, env: FuzzEnv) -> None:
        self.env = env
        self.server = env.server
        self.foreign = env.foreign
        self.model = Model(
            quota=QUOTA,
            max_chunk=MAX_CHUNK,
            max_parts=LIMITS["max_parts"],
            max_partition=LIMITS["max_partition"],
        )
        self.conns: dict[int, Conn] = {}
        self.sessions: dict[int, MSession] = {}
        self.pending: list[Pending] = []
        self.changes: list[Frame] = []
        #: (upload, part) sent on a session that still holds an upload now closed elsewhere:
        #: the server may refuse such chunks with not_found as well (docs §4.5).
        self.tolerated: set[tuple[str, int]] = set()
        self.trace: list[str] = []
        self.token = ""
        self.user = 0
        #: The last put sent (frame, part, corrupt), for a resend; and puts so far.
        self.last_put: tuple[Frame, PartData, bool] | None = None
        self.puts = 0

    # ----------------------------------------------------------- running

    async def run(self, program: list[Op]) -> None:
        # verify=False: plain http, and it spares loading the CA bundle for every client.
        self.http = httpx.AsyncClient(base_url=self.server.http, verify=False)
        name, password = unique("fuzz"), "correct horse battery"
        r = await self.http.post("/v1/auth/register", json={"username": name, "password": password})
        assert r.status_code == 201, r.text
        r = await self.http.post("/v1/auth/login", json={"username": name, "password": password})
        assert r.status_code == 200, r.text
        self.token = r.json()["access"]
        self.http.headers["Authorization"] = f"Bearer {self.token}"
        self.pg = await asyncpg.connect(self.env.database_url)
        try:
            self.user = (await self.http.get("/v1/account")).json()["user"]
            await self.pg.execute("UPDATE users SET quota = $2 WHERE id = $1", self.user, QUOTA)
            for i, op in enumerate(program):
                self.note(f"{i:02d} {op!r}")
                self.env.stats[type(op).__name__] += 1
                t0 = time.monotonic()
                await getattr(self, "do_" + type(op).__name__.lower())(op)
                self.env.times[type(op).__name__] += time.monotonic() - t0
            t0 = time.monotonic()
            await self.finish()
            self.env.times["finish"] += time.monotonic() - t0
            if TRACE:
                text = "\n".join(["--- program", *self.trace, ""])
                await asyncio.to_thread(_append, Path(TRACE), text)
        except BaseException as exc:
            trace = "\n  ".join(self.trace[-60:])
            where = f"fuzz seed={self.env.seed}, " if self.env.seed is not None else ""
            raise AssertionError(
                f"{exc!r}\n{where}user {self.user}, trace (last 60 lines):\n  {trace}"
            ) from exc
        finally:
            for conn in self.conns.values():
                conn.abort()
            await self.http.aclose()
            await self.pg.close()

    def note(self, line: str) -> None:
        self.trace.append(line)

    async def conn(self, slot: int) -> Conn:
        if slot not in self.conns:
            self.conns[slot] = await Conn.open(self.server.ws, self.token, f"device-{slot}")
            self.sessions[slot] = MSession()
        return self.conns[slot]

    # ------------------------------------------------------------ selectors

    def pick_upload(self, ref: int, slot: int) -> str:
        """Open uploads of this session first, then other open ones, then closed ones."""
        if ref == -1:
            return BOGUS_UPLOAD
        if ref == -2:
            return self.foreign.upload
        here = self.sessions[slot].records if slot in self.sessions else {}
        newest = list(reversed(self.model.uploads.values()))
        choices = [
            *(u.id for u in newest if u.state == "open" and u.id in here),
            *(u.id for u in newest if u.state == "open" and u.id not in here),
            *(u.id for u in newest if u.state != "open"),
        ]
        return choices[ref % len(choices)] if choices else BOGUS_UPLOAD

    def pick_object(self, ref: int) -> int:
        if ref == -1 or not self.model.objects:
            return BOGUS_ID
        if ref == -2:
            return self.foreign.object
        choices = list(reversed(self.model.objects))
        return choices[ref % len(choices)]

    def pick_part_id(self, ref: int) -> int:
        if ref == -1:
            return BOGUS_ID
        if ref == -2:
            return self.foreign.part_ids[0]
        choices = [*self.model.live_parts(), *reversed(self.model.retired)]
        return choices[ref % len(choices)] if choices else BOGUS_ID

    def part_index(self, upload: str, ref: int) -> int:
        up = self.model.uploads.get(upload)
        if up is None:
            return ref % LIMITS["max_parts"]
        n = len(up.parts)
        index = ref % (n + 1)  # n: one past the last part
        return index if index < LIMITS["max_parts"] else ref % n

    def base_for(self, obj: int, mode: str) -> int:
        o = self.model.objects.get(obj)
        rev = o.rev if o else 1
        if mode == "stale":
            return rev - 1 if rev > 1 else rev + 1
        return rev + 1 if mode == "ahead" else rev

    def true_part(self, upload: str, index: int, size: int) -> bytes:
        up = self.model.uploads.get(upload)
        if up is not None and index < len(up.parts):
            return up.parts[index].data
        return blob(index, 4242, size)

    # --------------------------------------------------------------- checks

    async def ask(self, conn: Conn, frame: Frame) -> tuple[int, Frame]:
        """A request and its reply; when none comes, say which upload locks are held
        and what the database connections are waiting on."""
        try:
            return await conn.request(frame)
        except AssertionError as exc:
            uploads = self.server.services.uploads

            async def held() -> list[str]:
                return uploads.serial.held()

            locks = await asyncio.to_thread(self.server.call, held)
            rows = await self.pg.fetch(
                "SELECT pid, state, wait_event_type, left(query, 60) AS query "
                "FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid() AND state <> 'idle'"
            )
            busy = [dict(r) for r in rows]
            raise AssertionError(
                f"{exc} (upload locks now: {locks}; busy connections: {busy})"
            ) from None

    def check(self, reply: Frame, expected: Reply, rid: int | None, what: str) -> None:
        self.env.stats[f"{what}->{reply.get('code', reply['t'])}"] += 1
        fields_ok = all(reply.get(k) == v for k, v in expected.fields.items())
        assert reply["t"] == expected.t and fields_ok, (
            f"{what}: expected {expected.t} {expected.fields}, got {reply}"
        )
        if reply["t"] == "error":
            assert reply.get("rid") == rid, f"{what}: error without its rid: {reply}"
            assert reply.get("retry") is False, f"{what}: {reply}"

    async def barrier(self, slot: int) -> None:
        """ping/pong on ``slot``: every frame sent before the pong was accounted for."""
        conn = self.conns.get(slot)
        if conn is None:
            return
        rid, reply = await self.ask(conn, {"t": "ping"})
        assert reply == {"t": "pong", "rid": rid}, reply
        waiting = {(p.upload, p.part) for p in self.pending if p.slot == slot}
        stray = [
            f
            for f in conn.inbox
            if f["t"] not in NOISE
            and not (f["t"] in ("part_ok", "error") and (f.get("upload"), f.get("part")) in waiting)
            and not (
                f["t"] == "error"
                and f["code"] in ("not_found", "bad_offset")
                and (f.get("upload"), f.get("part")) in self.tolerated
            )
        ]
        assert not stray, f"frames nobody asked for on slot {slot}: {stray}"
        assert not conn.problems, conn.problems

    async def resolve(self, p: Pending) -> None:
        conn = self.conns[p.slot]
        frame = await conn.take(
            lambda f: (
                f["t"] in ("part_ok", "error")
                and f.get("upload") == p.upload
                and f.get("part") == p.part
            ),
            what=f"completion of part {p.part}",
        )
        self.note(f"   part {p.part} of {p.upload[:8]}: {frame['t']} {frame.get('code', '')}")
        self.env.stats[
            f"part->{frame.get('code', frame['t'])}{'(closed)' if p.closed else ''}"
        ] += 1
        if p.closed:
            # docs §4.5/§4.6: once committed or aborted, chunks of an upload get not_found.
            codes = ("not_found",) if p.matches else ("not_found", "hash_mismatch")
            assert frame["t"] == "error" and frame["code"] in codes, (
                f"part {p.part} of an upload that is no longer open: expected "
                f"{' or '.join(codes)}, got {frame}"
            )
        elif p.matches:
            assert frame["t"] == "part_ok", f"expected part_ok for part {p.part}, got {frame}"
            self.model.part_stored(self.sessions[p.slot], p.upload, p.part)
        else:
            assert frame["t"] == "error" and frame["code"] == "hash_mismatch", (
                f"expected hash_mismatch for corrupted part {p.part}, got {frame}"
            )

    async def flush(self, keep: Callable[[Pending], bool] = lambda p: False) -> None:
        """Wait for every pending completion except those ``keep`` selects."""
        for p in [p for p in self.pending if not keep(p)]:
            self.pending.remove(p)
            await self.resolve(p)

    # -------------------------------------------------------- declarations

    async def do_declare(self, op: Declare) -> None:
        await self.flush(lambda p: op.drop and p.slot == op.slot)
        conn = await self.conn(op.slot)
        obj = base = None
        kind = "file" if op.kind == "flip" else op.kind
        if op.target is not None and (self.model.objects or op.target < 0):
            obj = self.pick_object(op.target)
            base = self.base_for(obj, op.base)
            o = self.model.objects.get(obj)
            if o is not None:
                kind = o.kind if op.kind != "flip" else ("dir" if o.kind == "file" else "file")
        parts = make_parts(op.seed, op.sizes) if kind == "file" else []
        meta = make_meta(op.seed)
        specs = [p.spec() for p in parts]
        if op.flaw == "too_many_parts":
            specs = [PartData(b"x", b"k", b"s").spec()] * (LIMITS["max_parts"] + 1)
        elif op.flaw == "part_too_big":
            specs = [*specs, {**PartData(b"x", b"k", b"s").spec(), "size": 16385}]
        elif op.flaw == "zero_part":
            specs = [{**PartData(b"x", b"k", b"s").spec(), "size": 0}, *specs]
        elif op.flaw == "name_too_big":
            meta = {**meta, "name": b"n" * (16 * 1024 + 1)}
        elif op.flaw == "key_too_big":
            meta = {**meta, "key": b"k" * 1025}
        frame: Frame = {"t": "upload", "kind": kind, "meta": meta, "parts": specs}
        if obj is not None:
            frame["object"], frame["base"] = obj, base
        expected = self.model.declare(obj, base, kind, parts, op.flaw)
        self.note(f"   object={obj} base={base} kind={kind} -> expect {expected}")
        if op.drop:
            await conn.send({**frame, "rid": conn.rid()})
            if op.after:  # (no yield at all for 0: the cut lands as early as it can)
                await asyncio.sleep(op.after)
            await self.settle(
                op.slot, abrupt=True, uncertain=("declare", (obj, base, kind, meta, parts))
            )
            return
        rid, reply = await self.ask(conn, frame)
        self.check(reply, expected, rid, "upload")
        if reply["t"] == "upload_ok":
            assert reply["upload"] not in self.model.uploads, "upload id reused"
            self.model.add_upload(
                MUpload(reply["upload"], obj, base, kind, meta, parts), self.sessions[op.slot]
            )
            self.note(f"   -> upload {reply['upload'][:8]}")
        await self.barrier(op.slot)

    # ----------------------------------------------------------------- put

    async def do_put(self, op: Put) -> None:
        await self.flush(lambda p: op.drop and p.slot == op.slot)
        conn = await self.conn(op.slot)
        if op.resend and self.last_put is not None:
            frame, part, corrupt = self.last_put
        else:
            obj = base = None
            if op.target is not None and (self.model.objects or op.target < 0):
                obj = self.pick_object(op.target)
                base = self.base_for(obj, op.base)
            part = make_parts(op.seed, (op.size,))[0]
            spec = part.spec()
            if op.corrupt:
                spec = {**spec, "sha256": bytes(32)}
            self.puts += 1
            frame = {
                "t": "put",
                # Unique in the database (the user is new), and drawn like every byte.
                "upload": f"put-{self.user:08d}-{op.seed:05d}-{self.puts:03d}",
                "meta": make_meta(op.seed),
                "part": spec,
                "data": part.data,
            }
            if obj is not None:
                frame["object"], frame["base"] = obj, base
            corrupt = op.corrupt
            self.last_put = (frame, part, corrupt)
        upload, obj, base = frame["upload"], frame.get("object"), frame.get("base")
        expected = self.model.put(upload, obj, base, part, corrupt)
        self.note(f"   put {upload} object={obj} base={base} -> expect {expected}")
        deadline = asyncio.get_running_loop().time() + 20
        while conn.credit < part.size:  # put data spends credit like a chunk (§4.10)
            await conn._wait(deadline, "credit")
        conn.credit -= part.size
        if op.drop:
            await conn.send({**frame, "rid": conn.rid()})
            if op.after:  # (no yield at all for 0: the cut lands as early as it can)
                await asyncio.sleep(op.after)
            await self.settle(op.slot, abrupt=True, uncertain=("put", (frame, part)))
            return
        rid, reply = await self.ask(conn, frame)
        self.check(reply, expected, rid, "put")
        up = self.model.uploads.get(upload)
        if reply["t"] == "committed" and (up is None or up.state != "committed"):
            if up is None or up.state == "aborted":
                self.model.add_upload(
                    MUpload(upload, obj, base, "file", frame["meta"], [part]), None
                )
            if obj is None:
                assert reply["object"] not in self.model.objects, reply
            o = self.model.apply_commit(upload, reply["object"], reply["rev"], reply["seq"])
            await self.learn(o)
        elif reply.get("code") == "conflict" and up is not None and up.state == "open":
            self.model.apply_abort(upload)  # a put that cannot commit reserves nothing
        await self.barrier(op.slot)

    # -------------------------------------------------------------- chunks

    async def send_chunks(
        self, slot: int, chunks: list[tuple[str, int, int, bytes]], wait: bool
    ) -> None:
        """Send chunks in order, predicting each; collect refusals and completions."""
        conn = self.conns[slot]
        sess = self.sessions[slot]
        refusals: list[Reply] = []
        completions: list[Pending] = []
        for upload, part, off, data in chunks:
            up = self.model.uploads.get(upload)
            if up is not None and up.state != "open" and upload in sess.records:
                self.tolerated.add((upload, part))
            outcome = self.model.chunk(sess, upload, part, off, data)
            await conn.chunk(upload, part, off, data)
            if outcome.error is not None:
                refusals.append(outcome.error)
            elif outcome.complete:
                completions.append(Pending(slot, upload, part, outcome.matches, outcome.closed))
        self.note(
            f"   {len(chunks)} chunks: refused {[r.fields for r in refusals]}, "
            f"completing {[(p.part, p.matches, p.closed) for p in completions]}"
        )
        for expected in refusals:
            frame = await conn.take(
                lambda f, e=expected: (
                    f["t"] == "error"
                    and f.get("upload") == e.fields["upload"]
                    and f.get("part") == e.fields["part"]
                ),
                what=f"refusal {expected.fields}",
            )
            pair = (expected.fields["upload"], expected.fields["part"])
            if pair in self.tolerated and frame.get("code") == "not_found":
                continue
            self.check(frame, expected, None, "chunk")
        if wait:
            for p in completions:
                await self.resolve(p)
        else:
            self.pending.extend(completions)

    def next_offset(self, slot: int, upload: str, part: int) -> int:
        rec = self.sessions[slot].records.get(upload)
        up = self.model.uploads.get(upload)
        if rec is None or up is None or part >= len(up.parts):
            return 0
        if part in rec.received:
            return up.parts[part].size
        return len(rec.writers.get(part, b""))

    async def do_chunk(self, op: Chunk) -> None:
        await self.flush()
        await self.conn(op.slot)
        upload = self.pick_upload(op.upload, op.slot)
        part = self.part_index(upload, op.part)
        expected = self.next_offset(op.slot, upload, part)
        off = {
            "right": expected,
            "zero": 0,
            "ahead": expected + 1,
            "behind": max(0, expected - 1),
        }[op.off]
        data = self.true_part(upload, part, op.size)[off : off + op.size]
        data += blob(op.size, 77, op.size - len(data))  # past the part's end: overflow
        if op.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        await self.send_chunks(op.slot, [(upload, part, off, data)], wait=True)
        await self.barrier(op.slot)

    def part_chunks(
        self, slot: int, upload: str, part: int, step: int, corrupt: bool
    ) -> list[tuple[str, int, int, bytes]]:
        """The chunks that finish ``part`` from where this session is (or one refused chunk)."""
        up = self.model.uploads.get(upload)
        rec = self.sessions[slot].records.get(upload)
        full = self.true_part(upload, part, step)
        if up is None or rec is None or part >= len(up.parts) or part in rec.received:
            return [(upload, part, 0, full[:step])]
        off = self.next_offset(slot, upload, part)
        out = []
        for start in range(off, len(full), step):
            data = full[start : start + step]
            if corrupt and not out:
                data = bytes([data[0] ^ 0x5A]) + data[1:]
            out.append((upload, part, start, data))
        return out

    async def resume_first(self, slot: int, upload: str) -> None:
        """What a client does before sending parts of an upload opened elsewhere."""
        up = self.model.uploads.get(upload)
        if up is not None and up.state == "open" and upload not in self.sessions[slot].records:
            await self.do_resume(Resume(slot=slot, upload=0), upload)

    async def do_sendpart(self, op: SendPart) -> None:
        await self.flush()
        await self.conn(op.slot)
        upload = self.pick_upload(op.upload, op.slot)
        if op.resume:
            await self.resume_first(op.slot, upload)
        part = self.part_index(upload, op.part)
        chunks = self.part_chunks(op.slot, upload, part, op.chunk, op.corrupt)
        await self.send_chunks(op.slot, chunks, op.wait)
        await self.barrier(op.slot)

    async def do_sendall(self, op: SendAll) -> None:
        await self.flush()
        await self.conn(op.slot)
        upload = self.pick_upload(op.upload, op.slot)
        if op.resume:
            await self.resume_first(op.slot, upload)
        up = self.model.uploads.get(upload)
        rec = self.sessions[op.slot].records.get(upload)
        if up is None or rec is None or not up.parts:
            chunks = self.part_chunks(op.slot, upload, 0, op.chunk, False)
        else:
            bad = None if op.corrupt is None else op.corrupt % len(up.parts)
            queues = [
                self.part_chunks(op.slot, upload, i, op.chunk, i == bad)
                for i in range(len(up.parts))
                if i not in rec.received
            ]
            chunks = [c for row in itertools.zip_longest(*queues) for c in row if c is not None]
        await self.send_chunks(op.slot, chunks, op.wait)
        await self.barrier(op.slot)

    # ------------------------------------------------------------ requests

    async def do_commit(self, op: Commit) -> None:
        upload = self.pick_upload(op.upload, op.slot)
        await self.flush(lambda p: p.slot == op.slot and (op.drop or p.upload == upload))
        conn = await self.conn(op.slot)
        if op.drop:
            await conn.send({"t": "commit", "rid": conn.rid(), "upload": upload})
            if op.after:  # (no yield at all for 0: the cut lands as early as it can)
                await asyncio.sleep(op.after)
            await self.settle(op.slot, abrupt=True, uncertain=("commit", upload))
            return
        rid, reply = await self.ask(conn, {"t": "commit", "upload": upload})
        # The server stored this session's complete parts before it answered (§4.5).
        for p in [p for p in self.pending if p.slot == op.slot and p.upload == upload]:
            self.pending.remove(p)
            await self.resolve(p)
        expected = self.model.commit(upload)
        self.note(f"   commit {upload[:8]}: expect {expected}, got {reply}")
        self.check(reply, expected, rid, "commit")
        if reply["t"] == "committed":
            up = self.model.uploads[upload]
            if up.state == "open":
                if up.obj is None:
                    assert reply["object"] not in self.model.objects, reply
                o = self.model.apply_commit(upload, reply["object"], reply["rev"], reply["seq"])
                await self.learn(o)
            drop_upload(self.sessions[op.slot], upload)
        await self.barrier(op.slot)

    async def do_resume(self, op: Resume, upload: str | None = None) -> None:
        await self.flush(lambda p: op.drop and p.slot == op.slot)
        conn = await self.conn(op.slot)
        upload = upload or self.pick_upload(op.upload, op.slot)
        if op.drop:
            await conn.send({"t": "resume", "rid": conn.rid(), "upload": upload})
            if op.after:  # (no yield at all for 0: the cut lands as early as it can)
                await asyncio.sleep(op.after)
            await self.settle(op.slot, abrupt=True, uncertain=None)
            return
        rid, reply = await self.ask(conn, {"t": "resume", "upload": upload})
        sess = self.sessions[op.slot]
        up = self.model.uploads.get(upload)
        if up is None or up.state != "open":
            self.check(reply, Reply.error("not_found", upload=upload), rid, "resume")
        else:
            rec = sess.records.setdefault(upload, MRecord())
            rec.received |= up.received
            self.check(
                reply,
                Reply("upload_ok", {"upload": upload, "have": sorted(rec.received)}),
                rid,
                "resume",
            )
        await self.barrier(op.slot)

    async def do_abort(self, op: Abort) -> None:
        await self.flush(lambda p: op.drop and p.slot == op.slot)
        conn = await self.conn(op.slot)
        upload = self.pick_upload(op.upload, op.slot)
        if op.drop:
            await conn.send({"t": "abort", "rid": conn.rid(), "upload": upload})
            if op.after:  # (no yield at all for 0: the cut lands as early as it can)
                await asyncio.sleep(op.after)
            await self.settle(op.slot, abrupt=True, uncertain=("abort", upload))
            return
        rid, reply = await self.ask(conn, {"t": "abort", "upload": upload})
        drop_upload(self.sessions[op.slot], upload)
        up = self.model.uploads.get(upload)
        if up is not None and up.state == "open":
            self.check(reply, Reply("ok"), rid, "abort")
            self.model.apply_abort(upload)
        else:
            self.check(reply, Reply.error("not_found"), rid, "abort")
        await self.barrier(op.slot)

    async def do_delete(self, op: Delete) -> None:
        await self.flush(lambda p: op.drop and p.slot == op.slot)
        conn = await self.conn(op.slot)
        obj = self.pick_object(op.obj)
        base = self.base_for(obj, op.base)
        if op.drop:
            await conn.send({"t": "delete", "rid": conn.rid(), "object": obj, "base": base})
            if op.after:  # (no yield at all for 0: the cut lands as early as it can)
                await asyncio.sleep(op.after)
            await self.settle(op.slot, abrupt=True, uncertain=("delete", obj))
            return
        rid, reply = await self.ask(conn, {"t": "delete", "object": obj, "base": base})
        expected = self.model.delete(obj, base)
        self.note(f"   delete {obj}@{base}: expect {expected}, got {reply}")
        self.check(reply, expected, rid, "delete")
        if reply["t"] == "committed":
            self.model.apply_delete(obj, reply["rev"], reply["seq"])
        await self.barrier(op.slot)

    # --------------------------------------------------------------- reads

    async def download(self, conn: Conn, pid: int, off: int) -> tuple[Frame | None, bytes]:
        """``get``: (the error, if one ended it; the bytes received)."""
        rid = conn.rid()
        await conn.send({"t": "get", "rid": rid, "part": pid, "off": off})
        out = bytearray()
        while True:
            frame = await conn.take(lambda f: f.get("rid") == rid, what=f"data of {pid}")
            if frame["t"] == "error":
                return frame, bytes(out)
            assert frame["t"] == "data", frame
            assert frame["off"] == off + len(out), (frame["off"], off, len(out))
            assert len(frame["data"]) <= MAX_CHUNK
            out += frame["data"]
            if frame.get("end"):
                assert frame["end"] is True
                return None, bytes(out)
            assert frame["data"], "an empty data frame that is not the end"

    async def do_get(self, op: Get) -> None:
        await self.flush()
        conn = await self.conn(op.slot)
        pid = self.pick_part_id(op.part)
        found = self.model.find_part(pid)
        size = found[0].parts[found[1]].size if found else 1
        off = {"zero": 0, "mid": size // 2, "end": size, "past": size + 1}[op.off]
        error, data = await self.download(conn, pid, off)
        self.note(f"   get {pid}@{off}: {error or len(data)}")
        self.env.stats[f"get->{error['code'] if error else 'data'}"] += 1
        if found is None:
            assert error is not None and error["code"] == "not_found", (pid, error, len(data))
        elif off > size:
            assert error is not None and (error["code"], error.get("expected")) == (
                "bad_offset",
                size,
            ), error
        else:
            assert error is None, error
            assert data == found[0].parts[found[1]].data[off:], f"partition {pid} differs"
        await self.barrier(op.slot)

    async def do_info(self, op: Info) -> None:
        await self.flush()
        conn = await self.conn(op.slot)
        pid = self.pick_part_id(op.part)
        found = self.model.find_part(pid)
        rid, reply = await self.ask(conn, {"t": "info", "part": pid})
        if found is None:
            self.check(reply, Reply.error("not_found"), rid, "info")
        else:
            o, i = found
            p = o.parts[i]
            nxt = o.part_ids[i + 1] if i + 1 < len(o.part_ids) else None
            expected = {"id": pid, "object": o.id, "size": p.size, "sha256": p.sha256}
            self.check(
                reply,
                Reply("part_info", {**expected, "key": p.key, "salt": p.salt, "next": nxt}),
                rid,
                "info",
            )
        await self.barrier(op.slot)

    async def do_ping(self, op: Ping) -> None:
        await self.flush()
        await self.conn(op.slot)
        await self.barrier(op.slot)

    async def do_unknown(self, op: Unknown) -> None:
        await self.flush()
        conn = await self.conn(op.slot)
        frame: Frame = {"t": "frobnicate", "object": 1}
        rid = None
        if op.rid:
            rid = frame["rid"] = conn.rid()
        await conn.send(frame)
        reply = await conn.take(
            lambda f: f["t"] == "error" and f.get("code") == "unknown_type", what="unknown_type"
        )
        assert reply.get("rid") == rid, reply
        await self.barrier(op.slot)

    # -------------------------------------------------------------- faults

    async def do_violation(self, op: Violation) -> None:
        await self.flush(lambda p: p.slot == op.slot)
        conn = await self.conn(op.slot)
        part = PartData(b"x", b"k", b"s").spec()
        meta = make_meta(0)
        upload: Frame = {"t": "upload", "rid": 1, "kind": "file", "meta": meta, "parts": [part]}
        chunk: Frame = {"t": "chunk", "upload": "x", "part": 0, "off": 0, "data": b"x"}
        messages: dict[str, bytes | str] = {
            "not_msgpack": b"\xc1\x00",
            "not_a_map": msgpack.packb([1, 2, 3]),
            "no_t": encode({"rid": 1}),
            "int_key": msgpack.packb({"t": "ping", "rid": 1, 7: 1}),
            "float_rid": encode({"t": "ping", "rid": 1.0}),
            "bool_rid": encode({"t": "ping", "rid": True}),
            "missing_field": encode({"t": "commit", "rid": 1}),
            "second_hello": encode(
                {"t": "hello", "v": 1, "token": self.token, "device": "x", "cursor": 0}
            ),
            "ext_type": msgpack.packb({"t": "ping", "rid": 1, "x": msgpack.ExtType(5, b"x")}),
            "str_for_bin": encode({**upload, "meta": {**meta, "name": "plain"}}),
            "short_sha": encode({**upload, "parts": [{**part, "sha256": b"\x00" * 31}]}),
            "dir_with_parts": encode({**upload, "kind": "dir"}),
            "object_without_base": encode({**upload, "object": 1}),
            "negative_off": encode({**chunk, "off": -1}),
            "part_index": encode({**chunk, "part": LIMITS["max_parts"]}),
            "over_credit": encode({**chunk, "data": b"x" * (LIMITS["window"] + 1)}),
            "text": '{"t": "ping", "rid": 1}',
            "oversize": encode({"t": "ping", "rid": 1, "pad": b"\x00" * LIMITS["max_frame"]}),
        }
        await conn.ws.send(messages[op.kind])
        code = await conn.finished()
        assert code == VIOLATIONS[op.kind], f"{op.kind}: closed with {code}"
        await self.settle(op.slot, abrupt=False, uncertain=None)

    async def do_drop(self, op: Drop) -> None:
        if op.slot not in self.conns:
            return
        await self.flush(lambda p: p.slot == op.slot)
        await self.settle(op.slot, abrupt=op.abrupt, uncertain=None)

    async def settle(self, slot: int, *, abrupt: bool, uncertain: tuple[str, Any] | None) -> None:
        """End ``slot``'s connection and wait until the server side of its session is gone;
        then what timing decided (parts in flight, a request cut off) is read from the
        database, and everything else must match the model exactly."""
        conn = self.conns.pop(slot)
        self.sessions.pop(slot)
        if abrupt:
            conn.abort()
        await conn.close()
        deadline = time.monotonic() + 40
        while conn.session not in FINISHED:
            assert time.monotonic() < deadline, f"session {conn.session} never ended"
            await asyncio.sleep(0.005)
        assert not conn.problems, conn.problems
        self.changes.extend(conn.changes)
        maybe = [p for p in self.pending if p.slot == slot]
        self.pending = [p for p in self.pending if p.slot != slot]
        await self.reconcile(uncertain, maybe)

    # ------------------------------------------------------ the database

    async def reconcile(self, uncertain: tuple[str, Any] | None, maybe: list[Pending]) -> None:
        m = self.model
        uploads = {
            r["id"]: r
            for r in await self.pg.fetch(
                "SELECT id, state, result_object, result_rev, result_seq FROM uploads "
                "WHERE user_id = $1",
                self.user,
            )
        }
        received: dict[str, set[int]] = defaultdict(set)
        for r in await self.pg.fetch(
            "SELECT p.upload_id, p.idx FROM upload_parts p JOIN uploads u ON u.id = p.upload_id "
            "WHERE u.user_id = $1 AND p.received",
            self.user,
        ):
            received[r["upload_id"]].add(r["idx"])
        objects = {
            r["id"]: r
            for r in await self.pg.fetch(
                "SELECT id, kind, rev, status, size FROM objects WHERE owner_id = $1", self.user
            )
        }
        head = await self.pg.fetchrow("SELECT used, change_seq FROM users WHERE id = $1", self.user)

        kind, what = uncertain or (None, None)
        if kind == "declare":
            new = [u for u, r in uploads.items() if u not in m.uploads and r["state"] == "open"]
            assert len(new) <= 1, new
            if new:
                obj, base, k, meta, parts = what
                m.add_upload(MUpload(new[0], obj, base, k, meta, parts), None)
                self.note(f"   the cut-off upload was declared: {new[0][:8]}")
            self.env.stats[f"drop: declare {'happened' if new else 'lost'}"] += 1
        elif kind == "commit":
            up = m.uploads.get(what)
            row = uploads.get(what)
            if up is not None and up.state == "open" and row and row["state"] == "committed":
                # It committed, so this session's parts in flight were stored first
                # (§4.5); a committed upload's part rows are gone, so say so here.
                for p in [p for p in maybe if p.upload == what and p.matches and not p.closed]:
                    m.part_stored(None, p.upload, p.part)
                    maybe.remove(p)
                await self.committed_meanwhile(what, row, "commit")
                self.env.stats["drop: commit happened"] += 1
        elif kind == "put":
            frame, part = what
            pid = frame["upload"]
            up, row = m.uploads.get(pid), uploads.get(pid)
            if row is not None and (up is None or up.state == "aborted"):
                obj, base = frame.get("object"), frame.get("base")
                m.add_upload(MUpload(pid, obj, base, "file", frame["meta"], [part]), None)
                up = m.uploads[pid]
                self.note(f"   the cut-off put reached the database: {pid} {row['state']}")
            if up is not None and up.state == "open" and row is not None:
                # Committed, it had stored its part (a new object's leaves no part row).
                if row["state"] == "committed" or 0 in received.get(pid, set()):
                    m.part_stored(None, pid, 0)
                if row["state"] == "committed":
                    await self.committed_meanwhile(pid, row, "put")
            elif up is not None and up.state == "open" and row is None:
                m.apply_abort(pid)  # its commit met a conflict, and it was aborted
            self.env.stats[f"drop: put {row['state'] if row else 'lost'}"] += 1
        elif kind == "abort":
            up = m.uploads.get(what)
            if up is not None and up.state == "open" and what not in uploads:
                m.apply_abort(what)
                self.note("   the cut-off abort happened")
                self.env.stats["drop: abort happened"] += 1
        elif kind == "delete":
            o = m.objects.get(what)
            row = objects.get(what)
            if o is not None and row is not None and row["rev"] != o.rev:
                expected = m.delete(what, o.rev)
                assert expected.t == "committed", (expected, dict(row))
                assert row["status"] == "deleted", dict(row)
                assert row["rev"] == expected.fields["rev"], (expected, dict(row))
                assert head["change_seq"] == expected.fields["seq"]
                m.apply_delete(what, row["rev"], head["change_seq"])
                self.note("   the cut-off delete happened")
                self.env.stats["drop: delete happened"] += 1
        for p in maybe:
            if p.matches and not p.closed and p.part in received.get(p.upload, set()):
                m.part_stored(None, p.upload, p.part)
                self.note(f"   part {p.part} of {p.upload[:8]} was stored before the drop")
                self.env.stats["drop: part stored anyway"] += 1
            elif p.matches and not p.closed:
                self.env.stats["drop: part lost"] += 1

        # Everything else is certain.
        live = {u for u, up in m.uploads.items() if up.state != "aborted"}
        assert set(uploads) == live, f"uploads in the database {set(uploads)} != model {live}"
        for u in live:
            up, row = m.uploads[u], uploads[u]
            assert row["state"] == up.state, (u, row["state"], up.state)
            if up.state == "open":
                assert received.get(u, set()) == up.received, (u, received.get(u), up.received)
            else:
                got = (row["result_object"], row["result_rev"], row["result_seq"])
                assert got == up.result, (u, got, up.result)
        assert set(objects) == set(m.objects), (set(objects), set(m.objects))
        for oid, o in m.objects.items():
            row = objects[oid]
            got = (row["kind"], row["rev"], row["status"], row["size"])
            assert got == (o.kind, o.rev, o.status, o.size), (oid, got, o)
        assert (head["used"], head["change_seq"]) == (m.used, m.seq), (dict(head), m.used, m.seq)

    async def committed_meanwhile(self, upload: str, row: asyncpg.Record, what: str) -> None:
        """A cut-off request committed ``upload``: the database's result must be what
        the model predicts for a commit now; then the model takes it."""
        expected = self.model.commit(upload)
        assert expected.t == "committed", (expected, dict(row))
        got = {"object": row["result_object"], "rev": row["result_rev"]}
        got["seq"] = row["result_seq"]
        assert all(got[k] == v for k, v in expected.fields.items()), (expected, got)
        o = self.model.apply_commit(upload, *got.values())
        await self.learn(o)
        self.note(f"   the cut-off {what} committed: {got}")

    async def learn(self, o: MObject) -> None:
        """The part ids of a new revision (REST), checked against the model on the way."""
        body = await self.rest_object(o.id)
        o.part_ids = [p["id"] for p in body["parts"]]

    async def rest_object(self, oid: int) -> dict[str, Any]:
        r = await self.http.get(f"/v1/object/{oid}")
        assert r.status_code == 200, r.text
        body = r.json()
        o = self.model.objects[oid]
        got = (body["kind"], body["rev"], body["status"], body["size"])
        assert got == (o.kind, o.rev, o.status, o.size), (oid, got, o)
        assert {k: base64.b64decode(v) for k, v in body["meta"].items()} == o.meta, body
        parts = [
            (
                p["size"],
                base64.b64decode(p["sha256"]),
                base64.b64decode(p["key"]),
                base64.b64decode(p["salt"]),
            )
            for p in body["parts"]
        ]
        assert parts == [(p.size, p.sha256, p.key, p.salt) for p in o.parts], (oid, parts)
        return body

    # ------------------------------------------------------------ the end

    async def finish(self) -> None:
        """After every program: healthy, nothing changed that no commit said, nothing leaked."""
        await self.flush()
        for slot in sorted(self.conns):
            await self.barrier(slot)
            await self.settle(slot, abrupt=False, uncertain=None)
        await self.reconcile(None, [])
        m = self.model

        r = await self.http.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text
        fresh = await Conn.open(self.server.ws, self.token, "checker")
        await self.barrier_on(fresh)
        # The catch-up feed from 0: every object once, in its latest state.
        feed = {c["object"]: c for c in fresh.changes}
        assert len(feed) == len(fresh.changes), "catch-up sent an object twice"
        assert set(feed) == set(m.objects), (set(feed), set(m.objects))
        for oid, o in m.objects.items():
            c = feed[oid]
            assert (c["kind"], c["rev"], c["status"], c["size"]) == (
                o.kind,
                o.rev,
                o.status,
                o.size,
            )
            assert [p["id"] for p in c["parts"]] == o.part_ids, (oid, c["parts"], o.part_ids)
            assert c["meta"] == o.meta
            body = await self.rest_object(oid)
            assert [p["id"] for p in body["parts"]] == o.part_ids
            for i, pid in enumerate(o.part_ids):
                error, data = await self.download(fresh, pid, 0)
                assert error is None and data == o.parts[i].data, (oid, pid, error)
        r = await self.http.get("/v1/object", params={"limit": 1000})
        listed = {o["object"] for o in r.json()["objects"]}
        assert listed == {oid for oid, o in m.objects.items() if o.status == "active"}, listed
        await fresh.close()
        self.changes.extend(fresh.changes)
        deadline = time.monotonic() + 40
        while fresh.session not in FINISHED:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        for c in self.changes:
            assert (c["object"], c["rev"], c["status"]) in m.history, (
                f"a change no commit made: {c}"
            )

        t0 = time.monotonic()
        await self.check_foreign()
        await self.check_locks()
        self.env.times["finish:foreign"] += time.monotonic() - t0
        t0 = time.monotonic()
        await self.check_store()
        self.env.times["finish:store"] += time.monotonic() - t0

    async def barrier_on(self, conn: Conn) -> None:
        rid, reply = await self.ask(conn, {"t": "ping"})
        assert reply == {"t": "pong", "rid": rid}, reply

    async def check_locks(self) -> None:
        """Every session has ended: no commit or abort may still hold (or wait for)
        its upload's lock."""
        uploads = self.server.services.uploads

        async def held() -> list[str]:
            return uploads.serial.held()

        left = await asyncio.to_thread(self.server.call, held)
        assert not left, f"upload locks still held after every session ended: {left}"

    async def check_foreign(self) -> None:
        f = self.foreign
        auth = {"Authorization": f"Bearer {f.token}"}
        r = await self.http.get(f"/v1/object/{f.object}", headers=auth)
        assert r.status_code == 200 and r.json()["rev"] == 1, r.text
        for pid, data in zip(f.part_ids, f.parts, strict=True):
            # (an S3 store answers 307 to a presigned URL; the Authorization header is
            # not sent on to the other origin)
            r = await self.http.get(f"/v1/partition/{pid}", headers=auth, follow_redirects=True)
            assert r.status_code == 200 and r.content == data, pid
        state = await self.pg.fetchval("SELECT state FROM uploads WHERE id = $1", f.upload)
        assert state == "open", state

    async def check_store(self) -> None:
        """Staging holds exactly the received parts of open uploads; the spool holds no
        file of these uploads; every partition row has its data, and after a janitor
        run with ``orphan_grace=0`` every partition blob has a row.

        Only this program's user and the other user are looked at: an earlier
        program's leak must not fail every later one (which would defeat shrinking).
        The server deletes some store objects in background tasks after it has
        answered, so the store checks are given a moment to come true.
        """
        store = self.server.services.store
        users = [self.user, self.env.foreign_user]

        async def listing(area: str) -> set[str]:
            async def run() -> set[str]:
                return {info.key for u in users async for info in store.list(f"{area}/{u}/")}

            return await asyncio.to_thread(self.server.call, run)

        async def staging_problems() -> list[str]:
            staged = await listing("staging")
            owned = {
                keys.staging_key(r["user_id"], r["id"], r["idx"])
                for r in await self.pg.fetch(
                    "SELECT u.user_id, u.id, p.idx FROM uploads u JOIN upload_parts p "
                    "ON p.upload_id = u.id WHERE u.state = 'open' AND p.received "
                    "AND u.user_id = ANY($1::bigint[])",
                    users,
                )
            }
            problems = []
            if staged - owned:
                problems.append(f"staging holds what no open upload owns: {staged - owned}")
            if owned - staged:
                problems.append(f"received parts missing from staging: {owned - staged}")
            return problems

        async def partition_problems(after_janitor: bool = False) -> list[str]:
            blobs = await listing("partitions")
            rows = {
                r["store_key"]
                for r in await self.pg.fetch(
                    "SELECT p.store_key FROM partitions p JOIN objects o ON o.id = p.object_id "
                    "WHERE o.owner_id = ANY($1::bigint[])",
                    users,
                )
            }
            prefixes = tuple(f"partitions/{u}/" for u in users)
            garbage = {
                r["store_key"]
                for r in await self.pg.fetch("SELECT store_key FROM garbage")
                if r["store_key"].startswith(prefixes)
            }
            problems = []
            if rows - blobs:
                what = "the janitor removed live data" if after_janitor else "rows without data"
                problems.append(f"partition {what}: {rows - blobs}")
            # Data without a row (a commit cut off after its copies) is the janitor's
            # to remove, by design: only after a janitor run must there be none.
            if after_janitor and blobs - rows - garbage:
                problems.append(f"partition data without rows: {blobs - rows - garbage}")
            return problems

        async def eventually(check: Callable[[], Any], timeout: float = 3.0) -> None:
            deadline = time.monotonic() + timeout
            while (problems := await check()) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            assert not problems, "; ".join(problems)

        await eventually(staging_problems)
        spool = Path(self.server.services.spool_dir)
        ours = {*self.model.uploads, self.foreign.upload}
        names = await asyncio.to_thread(lambda: [p.name for p in spool.iterdir()])
        left = sorted(n for n in names if n.endswith(".part") and n.split(".")[0] in ours)
        assert not left, f"spool files left after every session ended: {left}"
        await eventually(partition_problems)
        t0 = time.monotonic()
        services = self.server.services
        janitor = Janitor(services.settings.replace(orphan_grace=0), services.pool, store)
        await asyncio.to_thread(self.server.call, janitor.run_once)
        self.env.times["finish:janitor"] += time.monotonic() - t0
        problems = await partition_problems(after_janitor=True)
        assert not problems, "; ".join(problems)


# ------------------------------------------------------------------ fixtures


def fuzz_env(make_server, database_url, monkeypatch, **overrides: Any) -> Iterator[FuzzEnv]:
    """One server for a whole fuzz run (a fresh user per program)."""
    original = Session.run

    async def run(self: Session) -> None:
        try:
            await original(self)
        finally:
            FINISHED.add(self.id)

    # Only records that a session's server side has ended (see Driver.settle).
    monkeypatch.setattr(Session, "run", run)
    server = make_server(**LIMITS, **overrides)
    foreign, foreign_user = asyncio.run(make_foreign(server))
    env = FuzzEnv(server, database_url, foreign, foreign_user=foreign_user)
    started = time.monotonic()
    yield env
    print(
        f"\nfuzz: {env.examples} programs, {env.ops} operations in "
        f"{time.monotonic() - started:.1f}s"
    )
    print("\n".join(f"  {k}: {v}" for k, v in sorted(env.stats.items())))
    print("\n".join(f"  {k}: {v:.2f}s" for k, v in sorted(env.times.items())))


@pytest.fixture
def fuzz(make_server, database_url, monkeypatch) -> Iterator[FuzzEnv]:
    yield from fuzz_env(make_server, database_url, monkeypatch)


@pytest.fixture
def fuzz_s3(make_server, database_url, monkeypatch) -> Iterator[FuzzEnv]:
    yield from fuzz_env(make_server, database_url, monkeypatch, store="s3")


async def make_foreign(server: RunningServer) -> tuple[Foreign, int]:
    tokens = await register_login(server.http, unique("other"))  # once per run
    conn = await Conn.open(server.ws, tokens["access"], "other-device")
    parts = [blob(1, i, 3000 + i) for i in range(2)]
    specs = [PartData(p, b"k", b"s").spec() for p in parts]
    _, ok = await conn.request(
        {"t": "upload", "kind": "file", "meta": make_meta(1), "parts": specs}
    )
    for i, data in enumerate(parts):
        await conn.chunk(ok["upload"], i, 0, data[:MAX_CHUNK])
        frame = await conn.take(lambda f: f["t"] in ("part_ok", "error"))
        assert frame["t"] == "part_ok", frame
    _, done = await conn.request({"t": "commit", "upload": ok["upload"]})
    assert done["t"] == "committed", done
    _, pending = await conn.request(
        {"t": "upload", "kind": "file", "meta": make_meta(2), "parts": specs}
    )
    await conn.chunk(pending["upload"], 0, 0, parts[0][:MAX_CHUNK])
    frame = await conn.take(lambda f: f["t"] in ("part_ok", "error"))
    assert frame["t"] == "part_ok", frame
    await conn.close()
    async with httpx.AsyncClient(base_url=server.http, verify=False) as http:
        r = await http.get(
            f"/v1/object/{done['object']}", headers={"Authorization": f"Bearer {tokens['access']}"}
        )
        body = r.json()
    foreign = Foreign(
        tokens["access"], done["object"], [p["id"] for p in body["parts"]], parts, pending["upload"]
    )
    return foreign, conn.user


def fuzz_run(env: FuzzEnv, seed_value: int, examples: int, *, shrink: bool = True) -> None:
    """``examples`` programs drawn from ``seed_value``: the same ones on every run."""
    phases = list(Phase) if shrink else [Phase.explicit, Phase.reuse, Phase.generate]
    env.seed = seed_value

    @seed(seed_value)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,  # a replay must depend on the seed alone
        derandomize=False,
        print_blob=True,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        phases=phases,
    )
    @given(program=programs())
    def check(program: list[Op]) -> None:
        env.run(program)

    check()


# ------------------------------------------------------------------ tests


@pytest.mark.timeout(900)
def test_fuzz_session(fuzz: FuzzEnv) -> None:
    print(
        f"fuzz seed={SEED} examples={EXAMPLES} "
        f"(replay: TESSERA_FUZZ_SEED={SEED} TESSERA_FUZZ_EXAMPLES={EXAMPLES})"
    )
    fuzz_run(fuzz, SEED, EXAMPLES)


@pytest.mark.timeout(900)
def test_fuzz_session_s3(fuzz_s3: FuzzEnv) -> None:
    """The same programs against the S3 store (moto, or TESSERA_TEST_S3_ENDPOINT)."""
    examples = max(1, EXAMPLES // 8)
    print(f"fuzz seed={SEED} examples={examples} store=s3 (replay: TESSERA_FUZZ_SEED={SEED})")
    fuzz_run(fuzz_s3, SEED, examples)


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("seed_value", "examples"), REGRESSION_SEEDS)
def test_fuzz_regression_seed(fuzz: FuzzEnv, seed_value: int, examples: int) -> None:
    print(f"fuzz seed={seed_value} examples={examples} (a replay, without shrinking)")
    fuzz_run(fuzz, seed_value, examples, shrink=False)


def test_model_smoke_program(fuzz: FuzzEnv) -> None:
    """A hand-written program through every kind of operation: the driver itself works."""
    fuzz.run(
        [
            Declare(sizes=(5000, 10)),
            SendAll(),
            Commit(),
            Declare(target=0, sizes=(100,), seed=1),
            SendPart(part=0, wait=False),
            Commit(),
            Get(part=0, off="mid"),
            Info(part=0),
            Declare(sizes=(3000, 3000), seed=2),
            Chunk(part=1, size=1000),
            Chunk(part=1, off="zero", size=100),
            Resume(slot=1),
            SendPart(slot=1, part=0),
            Commit(slot=1),
            Drop(slot=0),
            Resume(),
            SendAll(),
            Commit(),
            Delete(obj=1),
            Get(part=3),
            Unknown(),
            Violation(kind="not_msgpack"),
            Abort(upload=3),
            Ping(),
        ]
    )


# ------------------------------------------------------------------ regressions
# Failures the fuzz found, as explicit programs (the shrunk one, made to hit every
# time where the bug is a race). Each was a server bug while it failed.


def test_regression_spool_file_left_by_a_part_complete_at_disconnect(fuzz: FuzzEnv) -> None:
    """Shrunk: ``[Declare(sizes=(474, 11)), SendAll(wait=False), Drop(abrupt=False)]``,
    then a spool file of the upload is still on disk.

    The last chunk of a part arrives and the client goes away before the server has
    started storing the part. Shutdown cancelled the part's lane, then discarded only
    parts still incomplete (``accepted < size``), so the complete part's spool file
    stayed on disk, its file still open, until a restart (server/session.py
    ``Session._shutdown``). Fixed since (``PartWriter.storing``). Four parts in small
    chunks hit the window on every run.
    """
    for attempt in range(3):
        fuzz.run(
            [
                Declare(sizes=(4000, 4000, 4000, 11), seed=attempt),
                SendAll(chunk=1000, wait=False),
                Drop(abrupt=False),
            ]
        )


@pytest.mark.parametrize("closer", ["abort", "commit"])
def test_regression_part_of_an_upload_closed_on_another_session(fuzz: FuzzEnv, closer: str) -> None:
    """An upload is open on two sessions (declared on one, resumed on the other); the
    second aborts or commits it; the first, which still holds it, sends a part.

    The server answered ``part_ok`` and kept the part in staging, though the upload
    was closed (docs §4.5: after a commit, chunks get ``not_found``): a staged object
    no open upload owns, until the janitor's orphan sweep. ``Uploads.store_part``
    ignored that its flip of ``upload_parts.received`` matched no open upload, and
    ``Session._on_chunk`` trusts the session's own record. Fixed since: ``not_found``
    and the object is removed.
    """
    program: list[Op] = [Declare(sizes=(100,)), Resume(slot=1)]
    if closer == "abort":
        program.append(Abort(slot=1))
    else:
        program += [SendAll(slot=1), Commit(slot=1)]
    program.append(SendAll(slot=0, resume=False))
    fuzz.run(program)


async def _one_part_upload(
    server: RunningServer, name: str, seed: int, size: int
) -> tuple[Conn, str, bytes]:
    """A new user's session with one declared upload of one part (not sent yet)."""
    tokens = await register_login(server.http, unique(name))
    conn = await Conn.open(server.ws, tokens["access"], "device")
    data = blob(seed, 0, size)
    spec = PartData(data, b"k", b"s").spec()
    _, ok = await conn.request(
        {"t": "upload", "kind": "file", "meta": make_meta(seed), "parts": [spec]}
    )
    return conn, ok["upload"], data


class _SlowReplies:
    """``Uploads.pool`` whose answers to one statement (found by a fragment of its
    text) arrive late, as over a slow network to the database: the statement has
    run while its caller still waits, so a cut-off lands in that window."""

    def __init__(self, pool: Any, delay: float, statement: str) -> None:
        self.pool, self.delay, self.statement = pool, delay, statement

    def acquire(self) -> Any:
        outer = self

        class Acquire:
            async def __aenter__(self) -> Any:
                self.inner = outer.pool.acquire()
                return _SlowConnection(await self.inner.__aenter__(), outer)

            async def __aexit__(self, *exc: object) -> Any:
                return await self.inner.__aexit__(*exc)

        return Acquire()

    async def answer(self, query: str, result: Any) -> Any:
        if self.statement in query:
            await asyncio.sleep(self.delay)
        return result

    async def execute(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self.answer(query, await self.pool.execute(query, *args, **kw))

    async def fetch(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self.answer(query, await self.pool.fetch(query, *args, **kw))

    async def fetchrow(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self.answer(query, await self.pool.fetchrow(query, *args, **kw))

    async def fetchval(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self.answer(query, await self.pool.fetchval(query, *args, **kw))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


class _SlowConnection:
    def __init__(self, conn: Any, slow: _SlowReplies) -> None:
        self.conn, self.slow = conn, slow

    async def fetchrow(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self.slow.answer(query, await self.conn.fetchrow(query, *args, **kw))

    async def fetch(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self.slow.answer(query, await self.conn.fetch(query, *args, **kw))

    async def execute(self, query: str, *args: Any, **kw: Any) -> Any:
        return await self.slow.answer(query, await self.conn.execute(query, *args, **kw))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


#: A fragment of the first statement of a commit (its read) and of an abort.
_FIRST_STATEMENT = {"commit": "LEFT JOIN objects o ON o.id = u.object_id", "abort": "DELETE FROM"}


@pytest.mark.parametrize("request_type", [Commit, Abort])
def test_regression_request_cut_off_by_a_disconnect_keeps_its_lock(
    fuzz: FuzzEnv, monkeypatch: pytest.MonkeyPatch, request_type: type[Commit] | type[Abort]
) -> None:
    """Found by the fuzz from its first runs (seed 105 replays one): an upload's commit
    lock was still held after every session had ended, so a later commit or abort
    of that upload waited for ever. Shrunk: ``[Declare(sizes=(1, 628, 70)),
    Commit(drop=True), SendAll(), Commit()]``.

    The lock was then a PostgreSQL advisory lock on a pooled connection: a commit
    cut off while ``pg_advisory_lock`` was answered returned the connection to the
    pool still holding it. Commits and aborts now take an in-process lock per
    upload, which nothing but the holder's own exit releases. A cut-off still
    lands where this bug was: here every first statement of the request is
    answered 0.3 s late, and the driver's final checks find a lock still held."""
    uploads = fuzz.server.services.uploads
    fragment = _FIRST_STATEMENT[request_type.__name__.lower()]
    monkeypatch.setattr(uploads, "pool", _SlowReplies(uploads.pool, 0.3, fragment))
    fuzz.run([Declare(sizes=(100,)), request_type(drop=True, after=0.1)])


def test_regression_abort_cut_off_by_a_disconnect_leaves_staged_parts(
    fuzz: FuzzEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shrunk: ``Abort(drop=True)`` of an upload with stored parts; afterwards the upload
    is gone but its staged parts are not.

    ``Uploads.abort`` deleted the upload's row and then awaited the deletion of its
    staged parts inside the request; a disconnect in between cancelled the request
    (server/session.py ``_shutdown``) and the parts stayed, owned by no upload, until
    the janitor's orphan sweep. Commit handed that clean-up to a background task;
    abort now does too. A store that takes half a second to delete (a loaded object
    store) opens the window wide enough to hit every time.
    """
    server = fuzz.server
    store = server.services.store
    delete_many = store.delete_many

    async def slow_delete_many(store_keys: list[str]) -> None:
        await asyncio.sleep(0.5)  # an object store under load
        await delete_many(store_keys)

    monkeypatch.setattr(store, "delete_many", slow_delete_many)

    async def scenario() -> None:
        conn, upload, data = await _one_part_upload(server, "abort", 5, 100)
        await conn.chunk(upload, 0, 0, data)
        stored = await conn.take(lambda f: f["t"] in ("part_ok", "error"))
        assert stored["t"] == "part_ok", stored
        await conn.send({"t": "abort", "rid": conn.rid(), "upload": upload})
        await asyncio.sleep(0.2)  # the row is deleted; the staged part is being deleted
        conn.abort()
        await conn.finished()
        deadline = time.monotonic() + 10
        while conn.session not in FINISHED:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)  # more than the store needs for a deletion
        pg = await asyncpg.connect(fuzz.database_url)
        try:
            row = await pg.fetchval("SELECT state FROM uploads WHERE id = $1", upload)
        finally:
            await pg.close()
        assert row is None, "the abort did not happen (this test needs it to)"

        async def staged() -> list[str]:
            return [i.key async for i in store.list(keys.staging_prefix(conn.user, upload))]

        left = await asyncio.to_thread(server.call, staged)
        assert not left, f"an aborted upload's staged parts are left: {left}"

    asyncio.run(scenario())


def test_regression_abort_cut_off_while_it_deletes_leaves_staged_parts(
    fuzz: FuzzEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by seed 1016603272 (after 92 programs): an aborted upload's staged parts
    were left, owned by no upload, until the janitor's orphan sweep.

    The abort deleted the upload's row, then released its lock, then started the
    deletion of the staged parts; a disconnect that cancelled it in between
    skipped the deletion. It now starts as soon as the row is gone, and an abort
    cut off before it knows whether the row is gone finds out later (``_settle``).
    The reply to the abort's statement arrives 0.3 s late, so the cut lands
    after the row is deleted and before the abort hears of it."""
    uploads = fuzz.server.services.uploads
    monkeypatch.setattr(uploads, "pool", _SlowReplies(uploads.pool, 0.3, "DELETE FROM uploads"))
    fuzz.run([Declare(sizes=(100, 200)), SendAll(), Abort(drop=True, after=0.15)])


@pytest.mark.parametrize("store_delay", [0.2, 0.0])
def test_regression_part_stored_while_its_upload_is_aborted_is_left_staged(
    fuzz: FuzzEnv, monkeypatch: pytest.MonkeyPatch, store_delay: float
) -> None:
    """Found by seed 3404236709 (after 236 programs): a part of an aborted upload was
    left in staging, owned by no upload, until the janitor's orphan sweep.

    ``Uploads.abort`` read which parts were received, then deleted the upload. A
    part completing in between was marked received after the read, so the abort
    did not delete it, and its own clean-up (for a part whose upload is gone) did
    not run either. The abort is now one statement and deletes the staged copy of
    every declared part; a part that lands in staging after it finds its upload
    gone and deletes its own copy. Here the abort arrives while the part is on
    its way into staging, which takes 0.2 s (the part lands after the delete) or
    no time at all (it is marked received first, as a rule)."""
    server = fuzz.server
    store = server.services.store
    put_bytes = store.put_bytes

    async def slow_put_bytes(key: str, data: bytes, **kwargs: Any) -> None:
        await asyncio.sleep(store_delay)
        await put_bytes(key, data, **kwargs)

    monkeypatch.setattr(store, "put_bytes", slow_put_bytes)

    async def scenario() -> None:
        conn, upload, data = await _one_part_upload(server, "abortrace", 6, 300)
        await conn.chunk(upload, 0, 0, data)  # complete: on its way into staging
        await asyncio.sleep(0.05 if store_delay else 0)
        rid = conn.rid()
        await conn.send({"t": "abort", "rid": rid, "upload": upload})
        stored = await conn.take(lambda f: f.get("upload") == upload and f.get("part") == 0)
        if stored["t"] == "error":  # landed after the delete: the part cleaned up itself
            assert stored["code"] == "not_found", stored
        else:
            assert stored["t"] == "part_ok", stored
        if store_delay:
            assert stored["t"] == "error", "the part landed before the abort (test needs after)"
        aborted = await conn.take(lambda f: f.get("rid") == rid)
        assert aborted["t"] == "ok", aborted
        await asyncio.sleep(0.5)  # the deletion runs in the background

        async def staged() -> list[str]:
            return [i.key async for i in store.list(keys.staging_prefix(conn.user, upload))]

        left = await asyncio.to_thread(server.call, staged)
        await conn.close()
        assert not left, f"an aborted upload's staged parts are left: {left}"

    asyncio.run(scenario())
