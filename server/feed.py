"""Writing the change feed: the access-list rows of everyone who can see an object.

Each change takes ``seq = ++users.change_seq`` under that user's row lock, in
the transaction that changes the object. Users are locked in id order so two
commits touching the same users cannot deadlock. The lock is what makes the
feed gap-free: a user's seqs are handed out in commit order.
"""

from __future__ import annotations

import asyncpg


async def record_change(conn: asyncpg.Connection, object_id: int, actor: int, status: str) -> int:
    """Give every user who sees ``object_id`` a new seq; return the actor's seq."""
    users = [
        r["user_id"]
        for r in await conn.fetch(
            "SELECT user_id FROM access_list WHERE object_id = $1 ORDER BY user_id",
            object_id,
        )
    ]
    actor_seq = 0
    for user in users:
        seq = await conn.fetchval(
            """WITH next AS (
                   UPDATE users SET change_seq = change_seq + 1 WHERE id = $1
                   RETURNING change_seq)
               INSERT INTO access_list (user_id, object_id, role, status, seq)
               SELECT $1, $2, 'owner', $3, change_seq FROM next
               ON CONFLICT (user_id, object_id)
               DO UPDATE SET status = EXCLUDED.status, seq = EXCLUDED.seq, updated_at = now()
               RETURNING seq""",
            user,
            object_id,
            status,
        )
        if user == actor:
            actor_seq = seq
    return actor_seq
