"""Reading the change feed: the access-list rows of one user after a cursor.

The access list holds one row per (user, object) carrying the seq of the
object's latest change, so reading ``seq > cursor`` is the compacted feed:
each changed object once, in its latest state.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from server.objects import with_parts

BATCH = 500


async def read_changes(
    conn: asyncpg.Connection | asyncpg.Pool, user: int, after: int, limit: int = BATCH
) -> list[dict[str, Any]]:
    """Up to ``limit`` change maps (without ``t``) with ``seq > after``, ascending."""
    rows = await conn.fetch(
        """SELECT o.id, o.kind, o.rev, o.size, o.enc_name, o.enc_mtime, o.enc_key, o.salt,
                  o.head_partition, o.origin, o.updated_at, a.seq, a.role,
                  CASE WHEN o.status = 'deleted' OR a.status = 'deleted'
                       THEN 'deleted' ELSE 'active' END AS status
           FROM access_list a JOIN objects o ON o.id = a.object_id
           WHERE a.user_id = $1 AND a.seq > $2
           ORDER BY a.seq LIMIT $3""",
        user,
        after,
        limit,
    )
    return await with_parts(conn, rows) if rows else []


def change_frame(change: dict[str, Any]) -> dict[str, Any]:
    return {"t": "change", **change}
