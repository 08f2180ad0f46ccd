"""Reading and deleting objects. Every query joins the access list, so another
user's ids behave exactly like ids that do not exist."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from protocol.errors import ErrorCode, RequestError
from server.feed import record_change
from server.uploads import CommitResult, retire_partitions


@dataclass(frozen=True, slots=True)
class PartitionRef:
    id: int
    object: int
    owner: int
    store_key: str
    size: int
    sha256: bytes
    key: bytes
    salt: bytes
    next: int | None

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "size": self.size,
            "sha256": self.sha256,
            "key": self.key,
            "salt": self.salt,
            "next": self.next,
        }


_OBJECT_COLUMNS = """o.id, o.kind, o.rev, o.status, o.size, o.enc_name, o.enc_mtime, o.enc_key,
    o.salt, o.head_partition, o.origin, o.updated_at, a.seq, a.role"""


def object_map(row: asyncpg.Record, parts: list[asyncpg.Record] | None = None) -> dict[str, Any]:
    """The object as the protocol shows it (bytes stay bytes; REST encodes them)."""
    out: dict[str, Any] = {
        "object": row["id"],
        "kind": row["kind"],
        "status": row["status"],
        "rev": row["rev"],
        "size": row["size"],
        "seq": row["seq"],
        "origin": row["origin"],
        "meta": {
            "name": bytes(row["enc_name"]),
            "mtime": bytes(row["enc_mtime"]),
            "key": bytes(row["enc_key"]),
            "salt": bytes(row["salt"]),
        },
    }
    if parts is not None:
        out["parts"] = [
            {
                "id": p["id"],
                "size": p["size"],
                "sha256": bytes(p["sha256"]),
                "key": bytes(p["enc_key"]),
                "salt": bytes(p["salt"]),
            }
            for p in parts
        ]
    return out


async def with_parts(
    conn: asyncpg.Connection | asyncpg.Pool, rows: list[asyncpg.Record]
) -> list[dict[str, Any]]:
    """Object maps with their current parts, in one query for the whole batch."""
    live = [r["id"] for r in rows if r["status"] == "active"]
    parts: dict[int, list[asyncpg.Record]] = {oid: [] for oid in live}
    if live:
        for p in await conn.fetch(
            """SELECT p.object_id, p.id, p.size, p.sha256, p.enc_key, p.salt
               FROM partitions p JOIN objects o ON o.id = p.object_id AND o.rev = p.rev
               WHERE p.object_id = ANY($1::bigint[]) ORDER BY p.object_id, p.idx""",
            live,
        ):
            parts[p["object_id"]].append(p)
    return [object_map(r, parts.get(r["id"], [])) for r in rows]


class Objects:
    def __init__(self, pool: asyncpg.Pool, garbage_delay: float) -> None:
        self.pool = pool
        self.garbage_delay = garbage_delay

    async def partition(self, user: int, partition: int, rid: int | None = None) -> PartitionRef:
        row = await self.pool.fetchrow(
            """SELECT p.id, p.object_id, o.owner_id, p.store_key, p.size, p.sha256, p.enc_key,
                      p.salt, p.next
               FROM partitions p
               JOIN objects o ON o.id = p.object_id AND o.rev = p.rev
               JOIN access_list a ON a.object_id = p.object_id AND a.user_id = $2
               WHERE p.id = $1 AND a.status = 'active'""",
            partition,
            user,
        )
        if row is None:
            raise RequestError(ErrorCode.NOT_FOUND, "no such partition", rid=rid)
        return PartitionRef(
            id=row["id"],
            object=row["object_id"],
            owner=row["owner_id"],
            store_key=row["store_key"],
            size=row["size"],
            sha256=bytes(row["sha256"]),
            key=bytes(row["enc_key"]),
            salt=bytes(row["salt"]),
            next=row["next"],
        )

    async def get(self, user: int, object_id: int) -> dict[str, Any]:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                f"""SELECT {_OBJECT_COLUMNS} FROM objects o
                    JOIN access_list a ON a.object_id = o.id AND a.user_id = $2
                    WHERE o.id = $1""",
                object_id,
                user,
            )
            if row is None:
                raise RequestError(ErrorCode.NOT_FOUND, "no such object")
            parts = await conn.fetch(
                "SELECT id, size, sha256, enc_key, salt FROM partitions "
                "WHERE object_id = $1 AND rev = $2 ORDER BY idx",
                object_id,
                row["rev"],
            )
        return object_map(row, parts)

    async def list(self, user: int, after: int, limit: int) -> list[dict[str, Any]]:
        """Live objects by id, with parts, for paging: ``after`` is the previous page's last id."""
        rows = await self.pool.fetch(
            f"""SELECT {_OBJECT_COLUMNS} FROM objects o
                JOIN access_list a ON a.object_id = o.id AND a.user_id = $1
                WHERE o.id > $2 AND a.status = 'active' AND o.status = 'active'
                ORDER BY o.id LIMIT $3""",
            user,
            after,
            limit,
        )
        return await with_parts(self.pool, rows)

    async def delete(
        self, user: int, object_id: int, base: int, device: str | None, rid: int | None = None
    ) -> CommitResult:
        """Write a tombstone: a new revision with status ``deleted`` and no parts."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT o.rev, o.size, o.status, o.owner_id, a.role FROM objects o
                   JOIN access_list a ON a.object_id = o.id AND a.user_id = $2
                   WHERE o.id = $1 FOR NO KEY UPDATE OF o""",
                object_id,
                user,
            )
            if row is None or row["status"] == "deleted":
                raise RequestError(ErrorCode.NOT_FOUND, "no such object", rid=rid)
            if row["role"] == "viewer":
                raise RequestError(ErrorCode.FORBIDDEN, "read-only object", rid=rid)
            if row["rev"] != base:
                raise RequestError(
                    ErrorCode.CONFLICT, "base revision is stale", rid=rid, rev=row["rev"]
                )
            rev = row["rev"] + 1
            await retire_partitions(conn, object_id, self.garbage_delay)
            await conn.execute(
                """UPDATE objects SET rev = $2, status = 'deleted', size = 0,
                       head_partition = NULL, origin = $3, updated_at = now()
                   WHERE id = $1""",
                object_id,
                rev,
                device,
            )
            # After record_change, which locks users rows in id order: taking the
            # owner's row first could deadlock against a commit to a shared object.
            seq = await record_change(conn, object_id, user, "deleted")
            await conn.execute(
                "UPDATE users SET used = greatest(used - $2, 0) WHERE id = $1",
                row["owner_id"],
                row["size"],
            )
        return CommitResult(object_id, rev, seq)
