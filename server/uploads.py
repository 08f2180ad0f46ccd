"""Uploads: declared, received part by part into staging, then committed.

The path of a byte: chunk -> spool file on local disk (hashed as it is
written, in a thread) -> when the part is complete and its sha256 matches,
one PUT to ``staging/<user>/<upload>.<index>`` -> at commit, a server-side copy
to ``partitions/<user>/<partition id>`` -> metadata in one transaction ->
staging copies deleted. A crash after the copy and before the transaction
leaves only unreferenced partition objects, which the janitor removes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import asyncpg

from protocol.errors import ErrorCode, RequestError
from protocol.frames import PartSpec, Put, Upload
from server import keys
from server.feed import record_change
from server.groupcommit import GroupCommit
from server.ingest import IngestThreads
from server.locks import KeyedLocks
from server.settings import Settings
from server.spool import SpoolFile
from server.stores import BlobNotFound, BlobStore, StoreError

log = logging.getLogger(__name__)
T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")

_Fail = Callable[..., RequestError]

#: Tries of an abort that PostgreSQL failed to break a deadlock.
ABORT_ATTEMPTS = 3

#: Concurrent store copies during one commit.
COPY_CONCURRENCY = 8

#: Partition ids a server takes from the sequence at a time for puts.
ID_BATCH = 64

#: New-object puts per statement, at most, and statements running at once.
PUT_BATCH = 64
PUT_BATCHES = 2

#: How long a put batch's transaction waits for its data to be stored, its users
#: rows locked: a write takes ~10 ms, and one slower than this is waited for
#: holding nothing (the put then runs again alone).
LOCKED_STORE_WAIT = 1.0
#: How long a put waits for its data to be stored at all: as long as a
#: statement may run (server/db.py's command_timeout).
STORE_WAIT = 60.0

#: Errors PostgreSQL refuses a statement with, after which nothing of its
#: transaction committed, so a batch refused so may run again put by put. Not
#: every asyncpg.PostgresError: a connection error (class 08, 57P01) may come
#: after the COMMIT took effect, and running the puts again would find their
#: own ids taken.
REFUSED: tuple[type[BaseException], ...] = (
    asyncpg.DataError,  # e.g. a NUL in a client's text: that write's alone
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.TransactionRollbackError,
    asyncpg.LockNotAvailableError,
)


@dataclass(slots=True)
class UploadRecord:
    """What a session needs to accept chunks for one upload."""

    id: str
    user: int
    sizes: list[int]
    hashes: list[bytes]
    received: set[int] = field(default_factory=set)

    @property
    def have(self) -> list[int]:
        return sorted(self.received)


class _NotStored(Exception):
    """Some puts of a batch failed to reach the store: the batch rolled back, and
    its puts run again one by one (each with its own outcome)."""


#: A put batch rolls back on these: answered by PostgreSQL (nothing committed, the
#: connection is sound), or a write to the store that failed or is late.
_PUT_ROLLBACK: tuple[type[BaseException], ...] = (asyncpg.PostgresError, StoreError, _NotStored)


class _NewPut(NamedTuple):
    """A new object's put, in the order of ``_PUT_BATCH``'s arrays."""

    user: int
    upload: str
    size: int
    name: bytes
    mtime: bytes
    key: bytes
    salt: bytes
    pid: int
    device: str | None
    store_key: str
    sha256: bytes
    part_salt: bytes
    part_key: bytes


class _Late:
    """A put's write is still running: wait for it, then submit the put again."""


_LATE = _Late()

#: What a put's batch gives each put: (object, change seq); None when refused
#: (quota short, id taken); ``_LATE``.
_PutOutcome = tuple[int, int] | _Late | None


@dataclass(slots=True)
class _PutWrite:
    row: _NewPut
    #: The write of the put's data to the store, running while its batch does.
    stored: asyncio.Task[None]
    #: A batch gave up waiting for the write (``LOCKED_STORE_WAIT``).
    late: bool = False


class _Declare(NamedTuple):
    """A declaration, in the order of ``_DECLARE_BATCH``'s arrays (its parts last)."""

    id: str
    user: int
    payer: int
    device: str | None
    object: int | None
    base: int | None
    kind: str
    name: bytes
    mtime: bytes
    key: bytes
    salt: bytes
    size: int
    replaced: int
    sizes: list[int]
    hashes: list[bytes]
    keys: list[bytes]
    salts: list[bytes]


class _CommitNew(NamedTuple):
    """The commit of a new object, in the order of ``_COMMIT_NEW_BATCH``'s arrays."""

    upload: str
    user: int
    kind: str
    size: int
    name: bytes
    mtime: bytes
    key: bytes
    salt: bytes
    device: str | None
    ids: list[int]
    idxs: list[int]
    store_keys: list[str]
    sizes: list[int]
    hashes: list[bytes]
    salts: list[bytes]
    keys: list[bytes]


@dataclass(frozen=True, slots=True)
class CommitResult:
    object: int
    rev: int
    seq: int

    @classmethod
    def recorded(cls, row: asyncpg.Record) -> CommitResult:
        """The result an upload row records once committed."""
        return cls(row["result_object"], row["result_rev"], row["result_seq"])


#: Parts up to this size are received in memory: no spool file, no worker thread
#: per chunk, one store write. Each thread hop costs the event loop GIL hand-offs,
#: which for small files cost more than the work itself. (The credit window still
#: bounds the bytes in memory.)
SMALL_PART = 64 * 1024


class PartWriter:
    """One part on its way in: a spool file (or, when small, a buffer) and a running
    sha256.

    Blocking methods (``*_blocking``) are called from worker threads for spooled
    parts; hashlib and file writes release the GIL, so large parts don't stall the
    event loop. For in-memory parts they are cheap enough to call on the loop.
    """

    def __init__(
        self,
        spool_dir: Path,
        upload: str,
        index: int,
        size: int,
        sha256: bytes,
        lane: int = 0,
        direct: bool = True,
    ) -> None:
        self.upload = upload
        self.index = index
        self.size = size
        self.expected = sha256
        self.in_memory = size <= SMALL_PART
        #: The ingest thread a session writes this part on (``Uploads.ingest``).
        self.lane = lane
        #: Spool with ``O_DIRECT`` (see ``BlobStore.spool_direct``).
        self._direct = direct
        self._spool_dir = spool_dir
        self._path: Path | None = None
        #: Bytes accepted so far (advanced by the caller before the write runs).
        self.accepted = 0
        self.discarded = False
        #: Handed to store_part, which owns the spool file from then on.
        self.storing = False
        self._file: SpoolFile | None = None
        self._buffer = bytearray()
        self._hash = hashlib.sha256()
        self._written = 0

    @property
    def path(self) -> Path:
        """The spool file (named on first use: not every part needs one)."""
        if self._path is None:
            name = f"{self.upload}.{self.index}.{secrets.token_hex(4)}.part"
            self._path = self._spool_dir / name
        return self._path

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run one of the ``*_blocking`` methods: inline for an in-memory part (cheaper
        than a thread hop), in a worker thread for a spooled one."""
        if self.in_memory:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    @property
    def data(self) -> bytes:
        """An in-memory part's bytes."""
        return bytes(self._buffer)

    def write_blocking(self, data: bytes | memoryview) -> None:
        if self.discarded:
            return
        if self.in_memory:
            self._buffer += data
        else:
            if self._file is None:
                self._file = SpoolFile(self.path, self._direct)  # closed in finish/discard
            self._file.write(data)
        self._hash.update(data)
        self._written += len(data)

    def finish_blocking(self) -> bool:
        """Close the spool file; True when size and sha256 match the declaration."""
        if not self.in_memory:
            if self._file is None:
                self._file = SpoolFile(self.path, self._direct)
            self._file.close()
        return self._written == self.size and self._hash.digest() == self.expected

    def discard_blocking(self) -> None:
        self.discarded = True
        self._buffer = bytearray()
        if self._file is not None:
            self._file.abort()
        if self._path is not None:
            self._path.unlink(missing_ok=True)


class Uploads:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        store: BlobStore,
        spool_dir: Path,
    ) -> None:
        self.settings = settings
        self.pool = pool
        #: Commits and aborts of one upload, one at a time in this process.
        self.serial = KeyedLocks()
        self.store = store
        self.spool_dir = spool_dir
        self._tasks: set[asyncio.Task[None]] = set()
        #: Threads that write and hash the chunks of sessions' spooled parts.
        self.ingest = IngestThreads(settings.ingest_threads or min(8, os.cpu_count() or 2))
        #: Partition ids taken from the sequence and not used yet (``put``).
        self._ids: collections.deque[int] = collections.deque()
        #: New-object puts, committed several users' at a time.
        self.puts: GroupCommit[_PutWrite, _PutOutcome] = GroupCommit(
            self._put_batch,
            self._put_one,
            self._spawn,
            split_on=(*REFUSED, _NotStored),
            max_batch=PUT_BATCH,
            concurrency=PUT_BATCHES,
        )
        #: The three-step upload's statements, several uploads' at a time: one
        #: round trip and one transaction for the statements that arrived
        #: meanwhile, where each took its own.
        self.declares = self._group(self._declare_batch, self._declare_one)
        self.received = self._group(self._received_batch, self._received_one)
        self.reads = self._group(self._read_batch, self._read_one)
        self.commits = self._group(self._commit_new_batch, self._commit_new_one)

    def _group(
        self,
        run_batch: Callable[[list[A]], Awaitable[Sequence[R]]],
        run_one: Callable[[A], Awaitable[R]],
    ) -> GroupCommit[A, R]:
        # One statement, autocommitted: a refusal leaves nothing committed.
        return GroupCommit(
            run_batch,
            run_one,
            self._spawn,
            split_on=REFUSED,
            max_batch=PUT_BATCH,
            concurrency=PUT_BATCHES,
        )

    async def close(self, grace: float = 2.0) -> None:
        """Give background clean-ups a moment, then stop them (the janitor finishes)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for group in (self.puts, self.declares, self.received, self.reads, self.commits):
            group.close()
        await asyncio.to_thread(self.ingest.close)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def writer(self, rec: UploadRecord, index: int) -> PartWriter:
        return PartWriter(
            self.spool_dir,
            rec.id,
            index,
            rec.sizes[index],
            rec.hashes[index],
            lane=self.ingest.lane(),
            direct=self.store.spool_direct,
        )

    # ------------------------------------------------------------- create

    async def create(
        self, user: int, device: str | None, frame: Upload, upload_id: str | None = None
    ) -> UploadRecord:
        """Declare an upload; ``upload_id`` is a put's client-chosen id (a duplicate
        raises asyncpg.UniqueViolationError)."""
        replaced, payer = 0, user
        if frame.object is not None:
            row = await self.pool.fetchrow(
                """SELECT o.rev, o.size, o.kind, o.status, o.owner_id, a.role FROM objects o
                   JOIN access_list a ON a.object_id = o.id AND a.user_id = $2
                   WHERE o.id = $1""",
                frame.object,
                user,
            )
            if row is None:
                raise RequestError(ErrorCode.NOT_FOUND, "no such object", rid=frame.rid)
            if row["role"] == "viewer":
                raise RequestError(ErrorCode.FORBIDDEN, "read-only object", rid=frame.rid)
            if row["kind"] != frame.kind:
                raise RequestError(
                    ErrorCode.CONFLICT,
                    f"object is a {row['kind']}, not a {frame.kind}",
                    rid=frame.rid,
                    rev=row["rev"],
                )
            if row["rev"] != frame.base:
                raise RequestError(
                    ErrorCode.CONFLICT, "base revision is stale", rid=frame.rid, rev=row["rev"]
                )
            # The owner's quota pays for a shared object, whoever edits it.
            replaced = row["size"] if row["status"] == "active" else 0
            payer = row["owner_id"]
        upload_id = upload_id or secrets.token_urlsafe(16)
        declare = _Declare(
            upload_id,
            user,
            payer,
            device,
            frame.object,
            frame.base,
            frame.kind,
            frame.meta.name,
            frame.meta.mtime,
            frame.meta.key,
            frame.meta.salt,
            frame.size,
            replaced,
            [p.size for p in frame.parts],
            [p.sha256 for p in frame.parts],
            [p.key for p in frame.parts],
            [p.salt for p in frame.parts],
        )
        # The payer's row is locked by the declaration: one per batch.
        verdict = await self.declares.submit(declare, frozenset({payer, user}), settle=True)
        self._refuse_over_limits(verdict, frame)
        return UploadRecord(
            id=upload_id,
            user=user,
            sizes=[p.size for p in frame.parts],
            hashes=[p.sha256 for p in frame.parts],
        )

    def _refuse_over_limits(self, verdict: asyncpg.Record, frame: Upload) -> None:
        """The declaration's refusal, if ``tessera_declare`` found a limit exceeded:
        caps on unfinished uploads, and the quota with their bytes reserved."""
        outcome = verdict["outcome"]
        if outcome == "open_uploads":
            raise RequestError(
                ErrorCode.RATE_LIMITED,
                f"{verdict['n']} unfinished uploads: commit or abort some first",
                rid=frame.rid,
            )
        if outcome == "staged_bytes":
            raise RequestError(
                ErrorCode.QUOTA_EXCEEDED,
                "unfinished uploads would hold more than "
                f"{self.settings.max_staged_bytes} bytes: commit or abort some first",
                rid=frame.rid,
            )
        if outcome == "quota":
            raise RequestError(
                ErrorCode.QUOTA_EXCEEDED,
                f"{frame.size} bytes do not fit: {verdict['used']} used and "
                f"{verdict['reserved']} reserved by unfinished uploads of {verdict['quota']}",
                rid=frame.rid,
            )

    async def _declare_one(self, d: _Declare) -> asyncpg.Record:
        async with self.pool.acquire() as conn:
            return await _statement(
                conn, _DECLARE, *d[:12], self._ttl, *d[13:], d.replaced, *self._limits
            )

    async def _declare_batch(self, batch: list[_Declare]) -> list[asyncpg.Record]:
        """Several declarations in one statement, their payers' rows locked in id
        order (as ``record_change`` and the put batch lock users rows)."""
        order = sorted(range(len(batch)), key=lambda i: batch[i].payer)
        rows = [batch[i] for i in order]
        heads = list(zip(*(d[:13] for d in rows), strict=True))
        parts = _flatten([d[13:] for d in rows], 4)
        got = await self._fetch(_DECLARE_BATCH, *heads, *parts, self._ttl, *self._limits)
        return _by_ord(got, order)

    async def _received_one(self, part: tuple[str, int]) -> bool:
        return bool(await self.pool.fetchval(_RECEIVED, *part))

    async def _received_batch(self, batch: list[tuple[str, int]]) -> list[bool]:
        # Part rows locked in key order, as an abort's cascade mostly does.
        ids, idxs = zip(*sorted(batch), strict=True)
        got = await self._fetch(_RECEIVED_BATCH, ids, idxs)
        flipped = {(r["upload_id"], r["idx"]) for r in got}
        return [part in flipped for part in batch]

    async def _read_one(self, key: tuple[str, int]) -> asyncpg.Record | None:
        return await self.pool.fetchrow(_COMMIT_READ, *key)

    async def _read_batch(self, batch: list[tuple[str, int]]) -> list[asyncpg.Record | None]:
        ids, users = zip(*batch, strict=True)
        got = {r["ord"]: r for r in await self._fetch(_COMMIT_READ_BATCH, ids, users)}
        return [got.get(i + 1) for i in range(len(batch))]

    async def _commit_new_one(self, c: _CommitNew) -> asyncpg.Record:
        async with self.pool.acquire() as conn:
            return await _statement(conn, _COMMIT_NEW, *c, self._ttl)

    async def _commit_new_batch(self, batch: list[_CommitNew]) -> list[asyncpg.Record]:
        """Several commits in one statement, their users rows locked in id order."""
        order = sorted(range(len(batch)), key=lambda i: batch[i].user)
        rows = [batch[i] for i in order]
        heads = list(zip(*(c[:9] for c in rows), strict=True))
        parts = _flatten([c[9:] for c in rows], 7)
        got = await self._fetch(_COMMIT_NEW_BATCH, *heads, *parts, self._ttl)
        return _by_ord(got, order)

    async def _fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        """A batch's rows. A failure PostgreSQL did not answer drops the connection
        (as ``_statement`` does): the outcome is unknown, the connection suspect."""
        async with self.pool.acquire() as conn:
            return await _or_drop(conn, conn.fetch, query, *args)

    @property
    def _ttl(self) -> float:
        return float(self.settings.upload_ttl)

    @property
    def _limits(self) -> tuple[int, int]:
        return self.settings.max_open_uploads, self.settings.max_staged_bytes

    # ------------------------------------------------------- resume, abort

    async def open(self, user: int, upload_id: str, rid: int | None = None) -> UploadRecord:
        """Load an open upload of ``user``; anyone else's looks exactly like a missing one."""
        async with self.pool.acquire() as conn:
            ok = await conn.fetchval(
                "SELECT 1 FROM uploads WHERE id = $1 AND user_id = $2 AND state = 'open' "
                "AND expires_at > now()",
                upload_id,
                user,
            )
            if not ok:
                raise RequestError(ErrorCode.NOT_FOUND, "no such upload", rid=rid, upload=upload_id)
            rows = await conn.fetch(
                "SELECT idx, size, sha256, received FROM upload_parts WHERE upload_id = $1 "
                "ORDER BY idx",
                upload_id,
            )
        return UploadRecord(
            id=upload_id,
            user=user,
            sizes=[r["size"] for r in rows],
            hashes=[bytes(r["sha256"]) for r in rows],
            received={r["idx"] for r in rows if r["received"]},
        )

    async def abort(self, user: int, upload_id: str, rid: int | None = None) -> None:
        # After any commit of it in this process (see ``commit``). One statement, so
        # a cut-off abort has either deleted the row or not: nothing half done.
        async with self.serial.hold(upload_id):
            task: asyncio.Task[None] | None = None
            try:
                row = await self._abort_row(user, upload_id)
                # Started at once, in a task of its own: the deletion happens even if
                # this request is cancelled from here on (the client went away).
                # Every declared part, not only those received: a part being stored
                # right now lands in staging before this deletion (and goes with it)
                # or after it, and then finds its upload gone and deletes its own
                # copy (``_mark_received``).
                staged = keys.staging_keys(user, upload_id, row["parts"]) if row else []
                task = self._cleanup(staged)
            except BaseException:
                # Cut off (e.g. while the statement was answered): the row may be gone
                # all the same. Find out later and delete what is staged if so.
                if task is None:
                    self._spawn(self._settle(user, upload_id))
                raise
        if row is None:
            raise RequestError(ErrorCode.NOT_FOUND, "no such upload", rid=rid, upload=upload_id)
        if task is not None:  # deleted before the reply
            await asyncio.shield(task)

    async def _abort_row(self, user: int, upload_id: str) -> asyncpg.Record | None:
        """The abort's statement, again if PostgreSQL broke a deadlock by failing it
        (it rolled back): its cascade locks the upload's part rows in no set order,
        and a batch of part receipts (``_received_batch``) may hold some of them."""
        attempt = 1
        while True:
            try:
                async with self.pool.acquire() as conn:
                    return await _statement(conn, _ABORT, upload_id, user)
            except asyncpg.DeadlockDetectedError:
                if attempt == ABORT_ATTEMPTS:
                    raise
                attempt += 1

    # ---------------------------------------------------------------- put

    async def put(self, user: int, device: str | None, frame: Put) -> CommitResult:
        """A one-part file declared, sent and committed in one request.

        A new object is one statement: the partition goes straight to its final
        key, nothing is staged or copied. A new revision goes the general way
        (declare, store, commit) under the client's id. Either way a resent put
        with the same id gets the first one's result, or finishes what it began.
        """
        if not await _matches(frame.part, frame.data):
            raise RequestError(
                ErrorCode.HASH_MISMATCH,
                "data does not match part.size and part.sha256",
                rid=frame.rid,
                upload=frame.upload,
            )
        if frame.object is None:
            return await self._put_new(user, device, frame)
        return await self._put_revision(user, device, frame)

    async def _put_new(self, user: int, device: str | None, frame: Put) -> CommitResult:
        pid = await self._partition_id()
        key = keys.partition_key(user, pid)
        # The data goes to the store while the batch's statement runs, and the
        # batch commits once it is durable (``_put_batch``): a put waits for the
        # longer of the two, not for both one after the other.
        stored = self._spawn(self.store.put_bytes(key, frame.data, sha256=frame.part.sha256))
        stored.add_done_callback(mark_retrieved)
        new = _NewPut(
            user,
            frame.upload,
            frame.part.size,
            frame.meta.name,
            frame.meta.mtime,
            frame.meta.key,
            frame.meta.salt,
            pid,
            device,
            key,
            frame.part.sha256,
            frame.part.salt,
            frame.part.key,
        )
        write = _PutWrite(new, stored)
        # One user's puts go one at a time (one users row per batch), and an
        # upload id appears once per batch (its row is inserted once).
        batch_keys = frozenset({user, frame.upload})
        try:
            row = await self.puts.submit(write, batch_keys)
            if isinstance(row, _Late):
                # Waited for outside the group: a slow write holds no slot, no
                # key of another put, no lock and no connection.
                await asyncio.wait([stored], timeout=STORE_WAIT)
                _raise_if_failed(stored)
                row = await self.puts.submit(write, batch_keys)  # the data is in place
        except asyncpg.UniqueViolationError:
            row = None  # a concurrent resend of this put took the id first
        except StoreError:
            # A resend of a put that committed gets the first one's result.
            prior = await self._prior_put(user, frame)
            if prior is not None:
                return prior
            raise
        # Any other failure may have committed all the same: the janitor removes
        # the partition if no row refers to it.
        if isinstance(row, tuple):
            return CommitResult(row[0], 1, row[1])
        # Never delete a partition a row refers to: only a statement whose outcome
        # was unknown could have committed this one, but that is not worth a bet.
        self._spawn(self._drop_if_unused(stored, pid, key))
        prior = await self._prior_put(user, frame)  # or conflict: the id is another's
        if prior is not None:
            return prior
        raise RequestError(
            ErrorCode.QUOTA_EXCEEDED,
            f"{frame.part.size} bytes do not fit the quota "
            "(usage plus the bytes reserved by unfinished uploads)",
            rid=frame.rid,
            upload=frame.upload,
        )

    async def _drop_if_unused(self, stored: asyncio.Task[None], pid: int, key: str) -> None:
        """Delete a refused put's partition once its write has ended (a delete must
        not race it), unless a row refers to it. Whatever stays, the janitor takes."""
        await asyncio.wait([stored], timeout=STORE_WAIT)
        if not stored.done():
            return
        try:
            used = await self.pool.fetchval("SELECT 1 FROM partitions WHERE id = $1", pid)
        except Exception:
            return
        if not used:
            await self._delete_quietly([key])

    async def _put_one(self, write: _PutWrite) -> _PutOutcome:
        """A put alone (or again alone, its batch split). ``_LATE`` when its write
        is still running after ``LOCKED_STORE_WAIT``: the caller waits for it
        outside the group and submits again. A write that failed fails the put
        without a statement."""
        if write.stored.done():
            _raise_if_failed(write.stored)
        elif write.late:
            return _LATE
        try:
            return (await self._put_batch([write]))[0]
        except _NotStored:
            return _LATE

    async def _put_batch(self, batch: list[_PutWrite]) -> list[_PutOutcome]:
        """New-object puts of several users in one transaction (``GroupCommit``):
        (object, seq) for each, or None when its id is taken or its quota short.

        The statement runs while the puts' data is still on its way to the store;
        the transaction commits only once the data of every put it inserted is
        durable, so no committed row refers to data a crash could lose. If a write
        failed, or is still running after ``LOCKED_STORE_WAIT`` (the users rows
        are locked meanwhile), it rolls back (``_NotStored``) and the puts run
        again one by one (``_put_one``), a late one once its write has ended.

        The users rows are locked first, in id order (as ``record_change`` locks
        them, so no deadlock with a commit to a shared object), by a statement of
        their own: the put statement then takes its snapshot after every
        reservation that held one of those locks committed, and the quota sees it.
        (Within one statement, a row lock waited for re-checks the row, but not
        the reservations the quota subquery reads.) Both run in a function, one
        round trip, where a transaction of two statements took four."""
        columns = list(zip(*(write.row for write in batch), strict=True))
        async with self.pool.acquire() as conn, _transaction(conn, _PUT_ROLLBACK):
            rows = await conn.fetch(_PUT_BATCH, *columns, float(self.settings.upload_ttl))
            done = {r["pid"]: (r["object_id"], r["change_seq"]) for r in rows}
            # The writes of the puts inserted (a refused put's data is no row's).
            needed = [w.stored for w in batch if w.row.pid in done]
            if needed:  # never cancels the writes
                await asyncio.wait(needed, timeout=LOCKED_STORE_WAIT)
            failed = [t for t in needed if not t.done() or t.cancelled() or t.exception()]
            if failed:
                for write in batch:
                    write.late = write.late or (write.row.pid in done and not write.stored.done())
                if len(batch) == 1 and failed[0].done():
                    _raise_if_failed(failed[0])  # its own error: the store's
                raise _NotStored(f"{len(failed)} of {len(batch)} puts not stored yet")
        return [done.get(write.row.pid) for write in batch]

    async def _put_revision(self, user: int, device: str | None, frame: Put) -> CommitResult:
        try:
            rec = await self.create(user, device, frame.as_upload(), upload_id=frame.upload)
        except asyncpg.UniqueViolationError:
            prior = await self._prior_put(user, frame)
            if prior is not None:
                return prior
            rec = await self.open(user, frame.upload, frame.rid)  # a resend: carry on
        except RequestError as exc:
            # A resend of a put that committed finds its own revision "stale".
            if exc.code == ErrorCode.CONFLICT:
                prior = await self._prior_put(user, frame)
                if prior is not None:
                    return prior
            raise
        try:
            if 0 not in rec.received:
                await self._stage(rec, frame)
            return await self.commit(user, frame.upload, device, frame.rid)
        except RequestError as exc:
            if exc.code != ErrorCode.CONFLICT:
                raise
            # Stale base: this put can never commit, so it reserves nothing any more.
            with contextlib.suppress(RequestError):
                await self.abort(user, frame.upload)
            raise

    async def _stage(self, rec: UploadRecord, frame: Put) -> None:
        """A put's part, in memory and already checked against ``frame.part``, into
        staging: no spool file and no second hash, unlike a part sent in chunks.
        A resend that found an earlier declaration must match that one."""
        if (frame.part.size, frame.part.sha256) != (rec.sizes[0], rec.hashes[0]):
            raise RequestError(
                ErrorCode.HASH_MISMATCH,
                "data does not match the part declared under this upload id",
                rid=frame.rid,
                upload=frame.upload,
                part=0,
            )
        key = keys.staging_key(rec.user, rec.id, 0)
        await self.store.put_bytes(key, frame.data, sha256=frame.part.sha256)
        await self._mark_received(rec, 0)

    async def _prior_put(self, user: int, frame: Put) -> CommitResult | None:
        """The result of an earlier put with this id; None if there is no upload
        with it; conflict if the id belongs to an upload that is not this put's."""
        prior = await self.pool.fetchrow(
            "SELECT user_id, state, object_id, result_object, result_rev, result_seq "
            "FROM uploads WHERE id = $1",
            frame.upload,
        )
        if prior is None:
            return None
        if prior["user_id"] == user and prior["state"] == "committed":
            return CommitResult.recorded(prior)
        resumable = frame.object is not None and prior["object_id"] == frame.object
        if prior["user_id"] == user and resumable:
            return None  # an unfinished put of this revision: the caller carries on
        raise RequestError(
            ErrorCode.CONFLICT,
            "upload id already in use: choose another",
            rid=frame.rid,
            upload=frame.upload,
        )

    async def _partition_id(self) -> int:
        """A fresh partition id, from a batch taken from the sequence (one round trip
        per ID_BATCH puts rather than one each)."""
        if not self._ids:
            got = await self.pool.fetchval(
                "SELECT array(SELECT nextval('partitions_id_seq') FROM generate_series(1, $1))",
                ID_BATCH,
            )
            self._ids.extend(got)
        return self._ids.popleft()

    # -------------------------------------------------------------- parts

    async def store_part(self, rec: UploadRecord, writer: PartWriter) -> None:
        """Verify a fully written part and make it durable in staging.

        Raises RequestError(hash_mismatch) when the bytes are not what was
        declared; the spool file is removed either way.
        """
        key = keys.staging_key(rec.user, rec.id, writer.index)
        try:
            matched = await writer.call(writer.finish_blocking)
            if not matched:
                raise RequestError(
                    ErrorCode.HASH_MISMATCH,
                    "sha256 of the part does not match its declaration",
                    upload=rec.id,
                    part=writer.index,
                )
            # The digest it was just checked against: the store need not hash again.
            if writer.in_memory:
                await self.store.put_bytes(key, writer.data, sha256=writer.expected)
            else:
                await self.store.put_file(
                    key, writer.path, writer.size, move=True, sha256=writer.expected
                )
        finally:
            await writer.call(writer.discard_blocking)
        await self._mark_received(rec, writer.index)

    async def _mark_received(self, rec: UploadRecord, index: int) -> None:
        """Record a part durable in staging; if its upload closed meanwhile (committed
        or aborted, e.g. on another session), delete the staged copy instead."""
        # Separate statements, each committed on its own: one statement locking the
        # part row and then the upload row deadlocked against abort, whose cascade
        # locks them the other way round.
        flipped = await self.received.submit((rec.id, index), frozenset({(rec.id, index)}))
        still_open = flipped or await self.pool.fetchval(
            "SELECT 1 FROM uploads WHERE id = $1 AND state = 'open'", rec.id
        )
        if not still_open:
            self._cleanup([keys.staging_key(rec.user, rec.id, index)])
            raise RequestError(
                ErrorCode.NOT_FOUND, "the upload is closed", upload=rec.id, part=index
            )
        rec.received.add(index)

    # ------------------------------------------------------------- commit

    async def commit(
        self, user: int, upload_id: str, device: str | None, rid: int | None = None
    ) -> CommitResult:
        def fail(code: ErrorCode, msg: str, **extra: object) -> RequestError:
            return RequestError(code, msg, rid=rid, upload=upload_id, **extra)

        # One commit of an upload at a time in this process: a retried commit waits
        # for the first and then finds its result, and a client that repeats commit
        # cannot make the store copy the same parts over and over. Nothing is held
        # in the database, so a commit waiting here or copying holds no connection.
        # Commits of one upload on different nodes are safe without a lock: each
        # copies under partition ids of its own, and the metadata transaction lets
        # exactly one win; the other answers with its result and deletes its copies.
        async with self.serial.hold(upload_id):
            try:
                return await self._commit_locked(user, upload_id, device, fail)
            except (TimeoutError, asyncio.CancelledError):
                # Stalled or cancelled: it may have committed all the same. Then its
                # staged parts go.
                self._spawn(self._settle(user, upload_id))
                raise

    async def _commit_locked(
        self, user: int, upload_id: str, device: str | None, fail: _Fail
    ) -> CommitResult:
        up = await self.reads.submit((upload_id, user), frozenset())
        if up is None:
            raise fail(ErrorCode.NOT_FOUND, "no such upload")
        if up["state"] == "committed":
            # A retry: the first commit's clean-up may have been cut off.
            self._cleanup(keys.staging_keys(user, upload_id, up["declared_parts"]))
            return CommitResult.recorded(up)
        if up["expired"]:
            raise fail(ErrorCode.NOT_FOUND, "upload expired")
        parts = _parts(up)
        missing = [p["idx"] for p in parts if not p["received"]]
        if missing:
            raise fail(ErrorCode.INCOMPLETE, f"{len(missing)} parts missing", missing=missing)
        if up["object_id"] is not None:
            rev = up["current_rev"]
            if rev is None:
                raise fail(ErrorCode.NOT_FOUND, "the object no longer exists")
            if rev != up["base_rev"]:
                raise fail(ErrorCode.CONFLICT, "base revision is stale", rev=rev)
        ids: list[int] = list(up["new_ids"] or [])
        copies = [keys.partition_key(user, pid) for pid in ids]
        lost = await self._copy_all(user, upload_id, parts, copies)
        if lost:
            self._cleanup(copies)
            return await self._after_lost(user, upload_id, lost, fail)
        try:
            write = self._commit_new if up["object_id"] is None else self._commit_revision
            result, ours = await write(up, parts, ids, copies, device, fail)
        except RequestError:
            # We refused inside the transaction, so it rolled back for certain.
            self._cleanup(copies)
            raise
        except (TimeoutError, asyncio.CancelledError):
            raise  # stalled, or the session is gone: a retried commit will know
        except Exception:
            # The connection failed: COMMIT may have reached PostgreSQL. Deleting
            # the copies now could destroy committed data, so leave them to the
            # janitor (which deletes only what no row references) and find out.
            outcome = await self._outcome(user, upload_id, copies)
            if outcome is None:
                raise
            result, ours = outcome
        if not ours:  # another commit won after all: our copies are nobody's
            self._cleanup(copies)
        self._cleanup(keys.staging_keys(user, upload_id, len(parts)))
        return result

    async def _outcome(
        self, user: int, upload_id: str, copies: list[str]
    ) -> tuple[CommitResult, bool] | None:
        """After an ambiguous failure: the upload's result if it committed, and whether
        this attempt committed it (its copies are what the rows name, or named until
        a later revision retired them), not a commit on another node; None if it
        did not commit."""
        try:
            async with asyncio.timeout(5):
                row = await self.pool.fetchrow(
                    """SELECT state, result_object, result_rev, result_seq,
                              EXISTS (SELECT 1 FROM partitions WHERE store_key = $3)
                              OR EXISTS (SELECT 1 FROM garbage WHERE store_key = $3) AS ours
                       FROM uploads WHERE id = $1 AND user_id = $2""",
                    upload_id,
                    user,
                    copies[0] if copies else None,
                )
        except Exception:
            return None
        if row is None or row["state"] != "committed":
            return None
        ours = bool(row["ours"]) or not copies
        if ours:
            log.warning("commit of %s succeeded although its connection failed", upload_id)
        return CommitResult.recorded(row), ours

    async def _copy_all(
        self, user: int, upload_id: str, parts: list[dict[str, Any]], copies: list[str]
    ) -> list[int]:
        """Copy the staged parts to their partition keys; the indexes of those whose
        staged copy was not found."""
        limit = asyncio.Semaphore(COPY_CONCURRENCY)
        lost: list[int] = []

        async def copy(index: int, dst: str) -> None:
            async with limit:
                try:
                    await self.store.copy(keys.staging_key(user, upload_id, index), dst)
                except BlobNotFound:
                    lost.append(index)

        try:
            async with asyncio.TaskGroup() as tg:
                for part, dst in zip(parts, copies, strict=True):
                    tg.create_task(copy(part["idx"], dst))
        except BaseExceptionGroup as group:
            self._cleanup(copies)
            raise group.exceptions[0] from None  # e.g. StoreError: answered unavailable
        return sorted(lost)

    async def _after_lost(
        self, user: int, upload_id: str, lost: list[int], fail: _Fail
    ) -> CommitResult:
        """Staged parts were not found. A commit or abort of this upload on another
        node deletes them once it is done, so the upload's state tells which: its
        result, or not_found. If it is still open, the data vanished otherwise (e.g.
        removed by hand): those parts are to be sent again."""
        reset = await self.pool.fetchval(
            """UPDATE upload_parts p SET received = false FROM uploads u
               WHERE p.upload_id = $1 AND p.idx = ANY($2) AND u.id = p.upload_id
                 AND u.user_id = $3 AND u.state = 'open'
               RETURNING 1""",
            upload_id,
            lost,
            user,
        )
        if not reset:
            row = await self.pool.fetchrow(
                "SELECT state, result_object, result_rev, result_seq, declared_parts "
                "FROM uploads WHERE id = $1 AND user_id = $2",
                upload_id,
                user,
            )
            if row is None:
                raise fail(ErrorCode.NOT_FOUND, "upload was aborted")
            if row["state"] == "committed":
                self._cleanup(keys.staging_keys(user, upload_id, row["declared_parts"]))
                return CommitResult.recorded(row)
        raise fail(ErrorCode.INCOMPLETE, "staged parts are missing; send them again", missing=lost)

    async def _commit_revision(
        self,
        up: asyncpg.Record,
        parts: list[dict[str, Any]],
        ids: list[int],
        copies: list[str],
        device: str | None,
        fail: _Fail,
    ) -> tuple[CommitResult, bool]:
        """Write the commit of a new revision; the flag is False when another commit
        had already won."""
        user = up["user_id"]
        size = sum(p["size"] for p in parts)
        async with self.pool.acquire() as conn, _transaction(conn):
            state = await conn.fetchrow(
                "SELECT state, result_object, result_rev, result_seq FROM uploads "
                "WHERE id = $1 FOR NO KEY UPDATE",
                up["id"],
            )
            if state is None:
                raise fail(ErrorCode.NOT_FOUND, "upload was aborted")
            if state["state"] == "committed":  # a concurrent commit of the same upload won
                won = CommitResult.recorded(state)
                return won, False
            head = ids[0] if ids else None
            obj = up["object_id"]
            current = await conn.fetchrow(
                "SELECT rev, size, status, owner_id FROM objects WHERE id = $1 FOR NO KEY UPDATE",
                obj,
            )
            if current is None:
                raise fail(ErrorCode.NOT_FOUND, "the object no longer exists")
            if current["rev"] != up["base_rev"]:
                raise fail(ErrorCode.CONFLICT, "base revision is stale", rev=current["rev"])
            replaced = current["size"] if current["status"] == "active" else 0
            delta = size - replaced
            payer = current["owner_id"]
            rev = current["rev"] + 1
            await retire_partitions(conn, obj, self.settings.garbage_delay)
            await conn.execute(
                """UPDATE objects SET rev = $2, size = $3, status = 'active', enc_name = $4,
                       enc_mtime = $5, enc_key = $6, salt = $7, head_partition = $8,
                       origin = $9, updated_at = now()
                   WHERE id = $1""",
                obj,
                rev,
                size,
                up["enc_name"],
                up["enc_mtime"],
                up["enc_key"],
                up["salt"],
                head,
                device,
            )
            if parts:
                await conn.execute(
                    """INSERT INTO partitions (id, object_id, rev, idx, store_key, size, sha256,
                                              salt, enc_key, next)
                       SELECT id, $1, $2, idx, key, size, sha, salt, enc_key, nxt
                       FROM unnest($3::bigint[], $4::int[], $5::text[], $6::int[], $7::bytea[],
                                   $8::bytea[], $9::bytea[], $10::bigint[])
                            AS t(id, idx, key, size, sha, salt, enc_key, nxt)""",
                    obj,
                    rev,
                    ids,
                    up["idxs"],
                    copies,
                    *_part_columns(up),
                    [*ids[1:], None],
                )
            seq = await record_change(conn, obj, user, "active")
            fits = await conn.fetchval(
                """WITH fits AS (
                       UPDATE users SET used = used + $2::bigint
                       WHERE id = $1 AND ($2::bigint <= 0 OR used + $2::bigint <= quota)
                       RETURNING 1),
                   done AS (
                       UPDATE uploads SET state = 'committed', result_object = $4,
                              result_rev = $5, result_seq = $6,
                              expires_at = now() + make_interval(secs => $7)
                       WHERE id = $3 AND EXISTS (SELECT 1 FROM fits) RETURNING 1),
                   parts AS (
                       DELETE FROM upload_parts
                       WHERE upload_id = $3 AND EXISTS (SELECT 1 FROM done))
                   SELECT EXISTS (SELECT 1 FROM fits)""",
                payer,
                delta,
                up["id"],
                obj,
                rev,
                seq,
                float(self.settings.upload_ttl),
            )
            if not fits:
                raise fail(ErrorCode.QUOTA_EXCEEDED, "the object no longer fits the quota")
        return CommitResult(obj, rev, seq), True

    async def _commit_new(
        self,
        up: asyncpg.Record,
        parts: list[dict[str, Any]],
        ids: list[int],
        copies: list[str],
        device: str | None,
        fail: _Fail,
    ) -> tuple[CommitResult, bool]:
        """The commit of a new object: one statement (a function), where a revision's
        transaction takes seven round trips."""
        commit = _CommitNew(
            up["id"],
            up["user_id"],
            up["kind"],
            sum(p["size"] for p in parts),
            up["enc_name"],
            up["enc_mtime"],
            up["enc_key"],
            up["salt"],
            device,
            ids,
            up["idxs"] or [],
            copies,
            *_part_columns(up),
        )
        row = await self.commits.submit(
            commit, frozenset({commit.user, commit.upload}), settle=True
        )
        outcome = row["outcome"]
        if outcome == "aborted":
            raise fail(ErrorCode.NOT_FOUND, "upload was aborted")
        if outcome == "quota":
            raise fail(ErrorCode.QUOTA_EXCEEDED, "the object no longer fits the quota")
        return CommitResult(row["object_id"], row["rev"], row["seq"]), outcome == "committed"

    def _cleanup(self, store_keys: list[str]) -> asyncio.Task[None] | None:
        """Delete in the background: a reply must not wait on a store that stalls.
        Whatever this does not delete, the janitor does."""
        if not store_keys:
            return None
        return self._spawn(self._delete_quietly(store_keys))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _settle(self, user: int, upload_id: str) -> None:
        """After a commit or an abort was cut off or stalled: once its outcome has
        landed, delete the staged parts if nothing needs them any more, that is if
        the upload committed (its partition copies are in use) or is gone (aborted).
        An open upload keeps them, and so does one we cannot read: a retry or the
        janitor decides."""
        await asyncio.sleep(0.5)  # a COMMIT already sent lands meanwhile
        try:
            async with asyncio.timeout(10):
                state = await self.pool.fetchval(
                    "SELECT state FROM uploads WHERE id = $1 AND user_id = $2", upload_id, user
                )
                if state == "open":
                    return
                prefix = keys.staging_prefix(user, upload_id)
                staged = [info.key async for info in self.store.list(prefix)]
        except Exception:
            return  # the janitor's staging sweep removes them
        await self._delete_quietly(staged)

    async def _delete_quietly(self, store_keys: list[str]) -> None:
        """Best effort: whatever is left behind, the janitor removes later."""
        if not store_keys:
            return
        try:
            await self.store.delete_many(store_keys)
        except Exception:
            log.warning("could not delete %d store objects; the janitor will", len(store_keys))


#: New objects of one-part puts, several users' at once, in one round trip: the
#: function (migrations/0008_put_batch.sql) locks the users rows in id order,
#: then in a statement of its own (a snapshot taken after those locks, so the
#: quota sees every reservation committed meanwhile) charges the quota, takes
#: each owner's change seq (gap-free feed), inserts the objects, partitions and
#: feed rows, and records a committed upload row under each client id. Puts
#: whose id is taken or whose quota is short are left out of the result.
_PUT_BATCH = """
SELECT pid, object_id, change_seq
FROM tessera_put_batch($1::bigint[], $2::text[], $3::bigint[], $4::bytea[], $5::bytea[],
                       $6::bytea[], $7::bytea[], $8::bigint[], $9::text[], $10::text[],
                       $11::bytea[], $12::bytea[], $13::bytea[], $14::double precision)"""

_DECLARE = """
SELECT outcome, n, bytes, quota, used, reserved
FROM tessera_declare($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                     $13::double precision, $14::int[], $15::bytea[], $16::bytea[],
                     $17::bytea[], $18, $19, $20)"""

#: An abort: the open upload's row deleted (its parts' rows go with it), and how
#: many parts it declared, whose staged copies are then deleted.
_ABORT = """
DELETE FROM uploads WHERE id = $1 AND user_id = $2 AND state = 'open'
RETURNING declared_parts AS parts"""

_COMMIT_NEW = """
SELECT outcome, object_id, rev, seq
FROM tessera_commit_new($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::bigint[], $11::int[],
                        $12::text[], $13::int[], $14::bytea[], $15::bytea[], $16::bytea[],
                        $17::double precision)"""

#: ``_DECLARE`` for several uploads: one row of arrays per upload, its parts'
#: columns flattened, each part with its upload's ordinal. The calls run in the
#: arrays' order; ``ord`` says whose row is whose.
_DECLARE_BATCH = """
SELECT q.ord, d.outcome, d.n, d.bytes, d.quota, d.used, d.reserved
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[], $6::int[],
            $7::text[], $8::bytea[], $9::bytea[], $10::bytea[], $11::bytea[], $12::bigint[],
            $13::bigint[])
     WITH ORDINALITY AS q(id, usr, payer, device, obj, base, kind, name, mtime, key, salt,
                          size, replaced, ord)
CROSS JOIN LATERAL (
    SELECT coalesce(array_agg(p.size ORDER BY p.i), '{}') AS sizes,
           coalesce(array_agg(p.sha ORDER BY p.i), '{}') AS hashes,
           coalesce(array_agg(p.key ORDER BY p.i), '{}') AS keys,
           coalesce(array_agg(p.salt ORDER BY p.i), '{}') AS salts
    FROM unnest($14::bigint[], $15::int[], $16::bytea[], $17::bytea[], $18::bytea[])
         WITH ORDINALITY AS p(o, size, sha, key, salt, i)
    WHERE p.o = q.ord) parts
CROSS JOIN LATERAL tessera_declare(q.id, q.usr, q.payer, q.device, q.obj, q.base, q.kind,
                                   q.name, q.mtime, q.key, q.salt, q.size,
                                   $19::double precision, parts.sizes, parts.hashes,
                                   parts.keys, parts.salts, q.replaced, $20, $21) d"""

#: ``_COMMIT_NEW`` for several uploads, its arrays as ``_DECLARE_BATCH``'s.
_COMMIT_NEW_BATCH = """
SELECT q.ord, c.outcome, c.object_id, c.rev, c.seq
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::bytea[], $6::bytea[],
            $7::bytea[], $8::bytea[], $9::text[])
     WITH ORDINALITY AS q(upload, usr, kind, size, name, mtime, key, salt, device, ord)
CROSS JOIN LATERAL (
    SELECT coalesce(array_agg(p.id ORDER BY p.i), '{}') AS ids,
           coalesce(array_agg(p.idx ORDER BY p.i), '{}') AS idxs,
           coalesce(array_agg(p.store_key ORDER BY p.i), '{}') AS store_keys,
           coalesce(array_agg(p.size ORDER BY p.i), '{}') AS sizes,
           coalesce(array_agg(p.sha ORDER BY p.i), '{}') AS hashes,
           coalesce(array_agg(p.salt ORDER BY p.i), '{}') AS salts,
           coalesce(array_agg(p.key ORDER BY p.i), '{}') AS keys
    FROM unnest($10::bigint[], $11::bigint[], $12::int[], $13::text[], $14::int[],
                $15::bytea[], $16::bytea[], $17::bytea[])
         WITH ORDINALITY AS p(o, id, idx, store_key, size, sha, salt, key, i)
    WHERE p.o = q.ord) parts
CROSS JOIN LATERAL tessera_commit_new(q.upload, q.usr, q.kind, q.size, q.name, q.mtime, q.key,
                                      q.salt, q.device, parts.ids, parts.idxs,
                                      parts.store_keys, parts.sizes, parts.hashes,
                                      parts.salts, parts.keys, $18::double precision) c"""

#: A part durable in staging, if its upload is open. Separate from the check of
#: the upload's state: one statement locking the part row and then the upload
#: row deadlocked against abort, whose cascade locks them the other way round.
_RECEIVED = """
UPDATE upload_parts p SET received = true FROM uploads u
WHERE p.upload_id = $1 AND p.idx = $2 AND u.id = p.upload_id
  AND u.state = 'open' AND NOT p.received
RETURNING 1"""

#: ``_RECEIVED`` for several parts: those it flipped.
_RECEIVED_BATCH = """
UPDATE upload_parts p SET received = true
FROM unnest($1::text[], $2::int[]) AS q(id, idx), uploads u
WHERE p.upload_id = q.id AND p.idx = q.idx AND u.id = p.upload_id
  AND u.state = 'open' AND NOT p.received
RETURNING p.upload_id, p.idx"""

#: A commit's first read, in one round trip: the upload, its parts (as arrays), the
#: object's current rev, and (if still open) the ids its partitions will get.
#: ``_READ`` names the upload and user as ``{upload}`` and ``{user}``.
_READ = """
SELECT u.*, u.expires_at < now() AS expired, o.rev AS current_rev,
       p.idxs, p.sizes, p.hashes, p.keys, p.salts, p.received,
       CASE WHEN u.state = 'open' THEN
            ARRAY(SELECT nextval('partitions_id_seq') FROM generate_series(1, u.declared_parts))
       END AS new_ids
FROM uploads u
LEFT JOIN objects o ON o.id = u.object_id
LEFT JOIN LATERAL (
    SELECT array_agg(idx ORDER BY idx) AS idxs, array_agg(size ORDER BY idx) AS sizes,
           array_agg(sha256 ORDER BY idx) AS hashes, array_agg(enc_key ORDER BY idx) AS keys,
           array_agg(salt ORDER BY idx) AS salts, array_agg(received ORDER BY idx) AS received
    FROM upload_parts WHERE upload_id = u.id) p ON true
WHERE u.id = {upload} AND u.user_id = {user}"""

_COMMIT_READ = _READ.format(upload="$1", user="$2")

#: ``_COMMIT_READ`` for several uploads; ``ord`` says whose row is whose (an
#: upload not found has none).
_COMMIT_READ_BATCH = f"""
SELECT q.ord, r.*
FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS q(upload, usr, ord)
CROSS JOIN LATERAL ({_READ.format(upload="q.upload", user="q.usr")}) r"""


async def _matches(part: PartSpec, data: bytes) -> bool:
    """Size and sha256 of a put's data; hashed off the event loop unless small."""
    if len(data) != part.size:
        return False
    if len(data) <= SMALL_PART:
        digest = hashlib.sha256(data).digest()
    else:
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).digest())
    return digest == part.sha256


def _raise_if_failed(stored: asyncio.Task[None]) -> None:
    """The error of a put's write to the store, if it has one (it may be running)."""
    if not stored.done():
        raise StoreError(f"no answer from the store in {STORE_WAIT:g} s")
    if stored.cancelled():
        raise StoreError("the write to the store was cancelled")
    exc = stored.exception()
    if exc is not None:
        raise exc


def mark_retrieved(task: asyncio.Task[Any]) -> None:
    """Done callback of a task whose failure its waiter may never look at (it may
    outlive its requester): mark the failure retrieved, so it is not logged."""
    if not task.cancelled():
        task.exception()


def _parts(up: asyncpg.Record) -> list[dict[str, Any]]:
    """The parts of a ``_COMMIT_READ`` row, in order."""
    if not up["idxs"]:
        return []
    return [
        {"idx": i, "size": size, "sha256": sha, "enc_key": key, "salt": salt, "received": got}
        for i, size, sha, key, salt, got in zip(
            up["idxs"],
            up["sizes"],
            up["hashes"],
            up["keys"],
            up["salts"],
            up["received"],
            strict=True,
        )
    ]


async def _or_drop(
    conn: asyncpg.Connection, method: Callable[..., Awaitable[T]], *args: object
) -> T:
    """``method(*args)`` (a query method of ``conn``); on a failure PostgreSQL did not
    answer (a lost or stalled connection, a cancellation), ``conn`` is dropped
    rather than released."""
    try:
        return await method(*args)
    except asyncpg.PostgresError:
        raise
    except BaseException:
        with contextlib.suppress(Exception):
            conn.terminate()
        raise


async def _statement(conn: asyncpg.Connection, query: str, *args: object) -> asyncpg.Record:
    """One statement's row, run to its end even if the caller is cancelled meanwhile
    (the cancellation goes through after): once sent, a statement commits or not
    whatever becomes of its caller, and a session that ends (cancelling its
    requests) must leave every outcome settled, as a transaction cut off before
    its COMMIT does.

    A statement that fails or stalls past command_timeout drops its connection:
    releasing it would wait on the cancellation of a statement a stalled server
    may never answer, a second timeout before the reply. An error PostgreSQL
    answered with (a unique violation, say) leaves the connection as it was."""

    task = asyncio.ensure_future(_or_drop(conn, conn.fetchrow, query, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():  # bounded: the statement has its command_timeout
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: nobody waits for the answer any more
        raise


def _flatten(groups: list[tuple[list[Any], ...]], width: int) -> list[list[Any]]:
    """Per-upload part columns as one array each, after an array of the ordinal
    (from 1) of each part's upload: the parts' arguments of a batch statement."""
    owners: list[int] = []
    columns: list[list[Any]] = [[] for _ in range(width)]
    for ordinal, group in enumerate(groups, 1):
        owners.extend([ordinal] * len(group[0]))
        for column, values in zip(columns, group, strict=True):
            column.extend(values)
    return [owners, *columns]


def _by_ord(rows: list[asyncpg.Record], order: list[int]) -> list[asyncpg.Record]:
    """A batch statement's rows, back in the order of its writes (``order[k]`` is
    the write the statement saw at ordinal k + 1); each write has one."""
    got = {r["ord"]: r for r in rows}
    out: list[asyncpg.Record] = [None] * len(order)  # type: ignore[list-item]
    for k, i in enumerate(order):
        out[i] = got[k + 1]
    return out


def _part_columns(up: asyncpg.Record) -> list[list[Any]]:
    """Size, sha256, salt and key of every part, in index order: the arrays a
    ``_COMMIT_READ`` row carries (none when the object has no parts)."""
    return [up[column] or [] for column in ("sizes", "hashes", "salts", "keys")]


@contextlib.asynccontextmanager
async def _transaction(
    conn: asyncpg.Connection,
    rollback_on: tuple[type[BaseException], ...] = (RequestError,),
) -> AsyncIterator[None]:
    """A transaction that, when something other than ``rollback_on`` (our own
    refusals, whose connection is sound) fails inside it or at COMMIT, drops the
    connection rather than waiting on a ROLLBACK a stalled server may never
    answer. PostgreSQL rolls back whatever did not commit when the connection ends."""
    tr = conn.transaction()
    await tr.start()
    try:
        yield
    except rollback_on:
        try:
            await tr.rollback()
        except BaseException:
            with contextlib.suppress(Exception):
                conn.terminate()
            raise
        raise
    except BaseException:
        with contextlib.suppress(Exception):
            conn.terminate()
        raise
    try:
        await tr.commit()
    except asyncpg.PostgresError:
        raise  # answered: rolled back, the connection is sound
    except BaseException:  # may have committed: the caller finds out
        with contextlib.suppress(Exception):
            conn.terminate()
        raise


async def retire_partitions(conn: asyncpg.Connection, object_id: int, delay: float) -> None:
    """Drop the rows of an object's current partitions; their data goes to the garbage
    table, to be deleted once downloads already under way have had time to finish."""
    await conn.execute(
        """WITH gone AS (DELETE FROM partitions WHERE object_id = $1 RETURNING store_key)
           INSERT INTO garbage (store_key, delete_after)
           SELECT store_key, now() + make_interval(secs => $2) FROM gone
           ON CONFLICT (store_key) DO NOTHING""",
        object_id,
        float(delay),
    )


def clear_spool(spool_dir: Path) -> None:
    """Spool files of a previous run belong to sessions that no longer exist."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(spool_dir):
        if entry.name.endswith(".part"):
            os.unlink(entry.path)
