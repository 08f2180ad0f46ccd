"""Periodic clean-up: expired uploads, superseded partitions, orphans in the store.

Every step is idempotent and safe to run on several nodes at once: a row is
deleted before its data, and data whose row might still appear (an upload
being committed right now) is protected by a grace period.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

import asyncpg

from server import keys
from server.settings import Settings
from server.stores import BlobStore

log = logging.getLogger(__name__)

BATCH = 1000


@dataclass(slots=True)
class JanitorReport:
    expired_uploads: int = 0
    garbage_deleted: int = 0
    staging_orphans: int = 0
    partition_orphans: int = 0


class Janitor:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, store: BlobStore) -> None:
        self.settings = settings
        self.pool = pool
        self.store = store

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.janitor_interval)
            try:
                report = await self.run_once()
                if any(dataclasses.astuple(report)):
                    log.info("janitor: %s", report)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("janitor run failed; will retry")

    async def run_once(self) -> JanitorReport:
        report = JanitorReport()
        report.expired_uploads = await self._expire_uploads()
        report.garbage_deleted = await self._collect_garbage()
        report.staging_orphans = await self._sweep_staging()
        report.partition_orphans = await self._sweep_partitions()
        await self.pool.execute(
            "DELETE FROM auth_failures WHERE window_start < now() - make_interval(secs => $1)",
            float(self.settings.login_window),
        )
        return report

    async def _expire_uploads(self) -> int:
        """Drop the rows of expired uploads (open or long committed); their
        staging data becomes orphaned and is removed by the staging sweep."""
        rows = await self.pool.fetch(
            "DELETE FROM uploads WHERE expires_at < now() RETURNING id, user_id, state"
        )
        keys_ = [keys.staging_prefix(r["user_id"], r["id"]) for r in rows if r["state"] == "open"]
        for prefix in keys_:
            doomed = [info.key async for info in self.store.list(prefix)]
            await self.store.delete_many(doomed)
        return len(rows)

    async def _collect_garbage(self) -> int:
        total = 0
        while True:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    "SELECT store_key FROM garbage WHERE delete_after < now() "
                    "ORDER BY delete_after LIMIT $1 FOR UPDATE SKIP LOCKED",
                    BATCH,
                )
                if not rows:
                    return total
                doomed = [r["store_key"] for r in rows]
                # A key can be referenced again only if it was reused, which the
                # id sequence prevents; delete data first, then the rows.
                await self.store.delete_many(doomed)
                await conn.execute("DELETE FROM garbage WHERE store_key = ANY($1)", doomed)
                total += len(doomed)

    async def _sweep_staging(self) -> int:
        """Staging objects whose upload is gone or committed, past the grace period."""
        cutoff = time.time() - self.settings.orphan_grace
        candidates: dict[str, list[str]] = {}
        async for info in self.store.list("staging/"):
            parsed = keys.parse_staging_key(info.key)
            if parsed is None or info.mtime < cutoff:
                candidates.setdefault(parsed[1] if parsed else "", []).append(info.key)
        if not candidates:
            return 0
        live = {
            r["id"]
            for r in await self.pool.fetch(
                "SELECT id FROM uploads WHERE id = ANY($1) AND state = 'open'", list(candidates)
            )
        }
        doomed = [k for upload, ks in candidates.items() if upload not in live for k in ks]
        await self.store.delete_many(doomed)
        return len(doomed)

    async def _sweep_partitions(self) -> int:
        """Partition objects no row points to: left by a crash between copy and commit."""
        cutoff = time.time() - self.settings.orphan_grace
        old: list[str] = []
        async for info in self.store.list("partitions/"):
            if info.mtime < cutoff:
                old.append(info.key)
        removed = 0
        for start in range(0, len(old), BATCH):
            batch = old[start : start + BATCH]
            referenced = {
                r["store_key"]
                for r in await self.pool.fetch(
                    "SELECT store_key FROM partitions WHERE store_key = ANY($1) "
                    "UNION SELECT store_key FROM garbage WHERE store_key = ANY($1)",
                    batch,
                )
            }
            doomed = [k for k in batch if k not in referenced]
            await self.store.delete_many(doomed)
            removed += len(doomed)
        return removed
