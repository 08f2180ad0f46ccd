"""Database helpers for tests: what an API does not offer yet."""

from __future__ import annotations

import asyncio
import time

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


async def until_a_statement_waits_on_a_lock(
    conn: asyncpg.Connection, like: str, why: str = "", timeout: float = 20
) -> None:
    """Until a statement matching ``LIKE like`` waits on a lock. Works from inside
    a transaction: pg_stat_activity is a snapshot taken once per transaction, so
    it is cleared before each look. The view keeps only the first 1 KiB of a
    statement, so ``like`` must match near its start."""
    deadline = time.monotonic() + timeout
    while True:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        if await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE $1",
            like,
        ):
            return
        assert time.monotonic() < deadline, f"no statement like {like!r} waited {why}".strip()
        await asyncio.sleep(0.02)
