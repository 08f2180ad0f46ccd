"""Connection pool set-up: every connection speaks bytea/timestamptz natively."""

from __future__ import annotations

import asyncpg

#: Errors that mean "the database is unreachable or restarting right now":
#: answered with ``unavailable`` (retry true), never ``internal``.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    # asyncpg 0.32 raises this on a pooled connection that PostgreSQL shut down
    # while it was idle ("cannot switch to state ..."), see MagicStack/asyncpg#784.
    asyncpg.exceptions.InternalClientError,
)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on release (one server round trip per pool use).

    Safe because pooled connections never keep session state: no SET, no LISTEN
    (the hub has its own connection), no session-level advisory lock. An open
    transaction is still rolled back by asyncpg itself before this is called.
    """


async def create_pool(url: str, *, min_size: int = 2, max_size: int = 20) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        command_timeout=60,
        max_inactive_connection_lifetime=300,
        reset=_keep_session,
    )
    assert pool is not None
    return pool
