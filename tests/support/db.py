"""Database helpers for tests: what an API does not offer yet."""

from __future__ import annotations

import asyncpg


async def share(db: asyncpg.Connection, obj: int, user: int) -> None:
    """Grant ``user`` edit access the way a sharing API will: a feed row with a new seq."""
    async with db.transaction():
        seq = await db.fetchval(
            "UPDATE users SET change_seq = change_seq + 1 WHERE id = $1 RETURNING change_seq", user
        )
        await db.execute(
            "INSERT INTO access_list (user_id, object_id, role, status, seq) "
            "VALUES ($1, $2, 'editor', 'active', $3)",
            user,
            obj,
            seq,
        )
