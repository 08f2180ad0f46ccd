"""Reading the change feed: the access-list rows of one user after a cursor.

The access list holds one row per (user, object) carrying the seq of the
object's latest change, so reading ``seq > cursor`` is the compacted feed:
each changed object once, in its latest state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

import asyncpg

from protocol.codec import encode
from server.groupcommit import GroupCommit
from server.objects import object_map

log = logging.getLogger(__name__)

BATCH = 500

# One statement, so the parts come from the same snapshot as the object row (two
# statements could pair rev N's row with rev N+1's parts).
_READ_ONE = """
SELECT o.id, o.kind, o.rev, st.status, o.size, o.enc_name, o.enc_mtime, o.enc_key, o.salt,
       o.origin, a.seq, p.ids, p.sizes, p.hashes, p.keys, p.salts
FROM access_list a
JOIN objects o ON o.id = a.object_id
CROSS JOIN LATERAL (
    SELECT CASE WHEN o.status = 'deleted' OR a.status = 'deleted'
                THEN 'deleted' ELSE 'active' END AS status) st
LEFT JOIN LATERAL (
    SELECT array_agg(p.id ORDER BY p.idx) AS ids, array_agg(p.size ORDER BY p.idx) AS sizes,
           array_agg(p.sha256 ORDER BY p.idx) AS hashes,
           array_agg(p.enc_key ORDER BY p.idx) AS keys, array_agg(p.salt ORDER BY p.idx) AS salts
    FROM partitions p
    WHERE p.object_id = o.id AND p.rev = o.rev AND st.status = 'active') p ON true
WHERE a.user_id = {user} AND a.seq > {after}
ORDER BY a.seq
LIMIT {limit}"""
_READ = _READ_ONE.format(user="$1", after="$2", limit="$3")

#: ``_READ`` for several (user, cursor) pairs in one statement: ``k.n`` is the
#: pair's index (from 1), the rows of each pair come in seq order.
_READ_MANY = f"""
SELECT k.n, r.* FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS k(user_id, after, n)
CROSS JOIN LATERAL ({_READ_ONE.format(user="k.user_id", after="k.after", limit="$3")}) r
ORDER BY k.n, r.seq"""


def _change(row: asyncpg.Record) -> dict[str, Any]:
    """A feed row as the protocol shows it; its parts came as parallel arrays."""
    if not row["ids"]:  # deleted, a directory, or an empty file
        return object_map(row, [])
    columns = ("id", "size", "sha256", "enc_key", "salt")
    arrays = (row["ids"], row["sizes"], row["hashes"], row["keys"], row["salts"])
    return object_map(row, [dict(zip(columns, p, strict=True)) for p in zip(*arrays, strict=True)])


async def read_changes(
    conn: asyncpg.Connection | asyncpg.Pool, user: int, after: int, limit: int = BATCH
) -> list[dict[str, Any]]:
    """Up to ``limit`` change maps (without ``t``) with ``seq > after``, ascending."""
    return [_change(row) for row in await conn.fetch(_READ, user, after, limit)]


def change_frame(change: dict[str, Any]) -> dict[str, Any]:
    return {"t": "change", **change}


#: A change as it goes out: its seq, and its ``change`` frame already encoded.
EncodedChange = tuple[int, bytes]


class PushTarget(Protocol):
    """A session that asked ``FeedReader.push`` for the rows after its cursor."""

    def pushed(self, after: int, changes: list[EncodedChange]) -> None: ...

    def push_failed(self) -> None: ...


class _Push:
    """Sessions waiting for one read; joinable only until the read starts."""

    __slots__ = ("started", "targets")

    def __init__(self) -> None:
        self.started = False
        self.targets: list[PushTarget] = []


class FeedReader:
    """One read per (user, cursor), shared by every session waiting for those rows.

    A commit pokes every session of its user at once, and the ones that are caught
    up all want the rows after the same cursor: the first starts the read, the
    others join it, and each frame is encoded once. A read that began before a
    change committed does not contain it, so a caller that was told of a change
    and did not get it asks for a ``fresh`` read (see ``Session._feed_loop``).
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._flights: dict[tuple[int, int], asyncio.Task[list[EncodedChange]]] = {}
        self._pushes: dict[tuple[int, int], _Push] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Reads that went to the database (visible to tests and benchmarks).
        self.reads = 0
        #: Pushes for different users read in one statement: a burst of commits by
        #: many users is one read, not one each.
        self.push_reads: GroupCommit[tuple[int, int], list[EncodedChange]] = GroupCommit(
            self._read_many, self._read_pair, self._spawn, split_on=asyncpg.PostgresError
        )

    async def read(self, user: int, after: int, *, fresh: bool) -> list[EncodedChange]:
        key = (user, after)
        flight = None if fresh else self._flights.get(key)
        if flight is None:
            flight = asyncio.create_task(self._read(user, after))
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        # Shielded: one reader going away must not cancel the read for the others.
        return await asyncio.shield(flight)

    def push(self, user: int, after: int, target: PushTarget) -> None:
        """Read the rows after ``after`` and hand them to ``target`` (``pushed``),
        without waking a task per session: the common case of a commit announced to
        every idle session of its user. Joins only a read that has not started, so
        the rows are read after the announcement and contain the announced change.
        """
        key = (user, after)
        push = self._pushes.get(key)
        if push is None:
            push = self._pushes[key] = _Push()
            self._spawn(self._push(key, push))
        push.targets.append(target)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _push(self, key: tuple[int, int], push: _Push) -> None:
        push.started = True
        if self._pushes.get(key) is push:
            del self._pushes[key]
        try:
            changes = await self.push_reads.submit(key, frozenset())
        except asyncio.CancelledError:
            for target in push.targets:
                target.push_failed()
            raise
        except Exception as exc:
            log.warning("feed read for user %s failed (%r); sessions read again", key[0], exc)
            for target in push.targets:
                target.push_failed()  # each session's own loop retries, with backoff
            return
        for target in push.targets:
            target.pushed(key[1], changes)

    async def close(self) -> None:
        self.push_reads.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _landed(self, key: tuple[int, int], flight: asyncio.Task[list[EncodedChange]]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved here too: every reader may have gone

    async def _read(self, user: int, after: int) -> list[EncodedChange]:
        self.reads += 1
        rows = await self._pool.fetch(_READ, user, after, BATCH)
        return [(row["seq"], encode(change_frame(_change(row)))) for row in rows]

    async def _read_pair(self, key: tuple[int, int]) -> list[EncodedChange]:
        return await self._read(*key)

    async def _read_many(self, keys: list[tuple[int, int]]) -> list[list[EncodedChange]]:
        self.reads += 1
        users, afters = zip(*keys, strict=True)
        rows = await self._pool.fetch(_READ_MANY, users, afters, BATCH)
        out: list[list[EncodedChange]] = [[] for _ in keys]
        for row in rows:
            out[row["n"] - 1].append((row["seq"], encode(change_frame(_change(row)))))
        return out
