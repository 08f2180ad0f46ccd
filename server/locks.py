"""Locks by key within one process: the commits and aborts of one upload on a node
run one at a time, without a database connection held while they wait or work."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        #: Holders and waiters: the entry goes when the last of them leaves.
        self.users = 0


class KeyedLocks:
    """An ``asyncio.Lock`` per key, made on first use and dropped once nobody holds
    or waits for it, so the map stays as small as the work in flight."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._entries[key]

    def held(self) -> list[str]:
        """Keys held or waited for now (for diagnostics and tests)."""
        return list(self._entries)
