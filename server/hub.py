"""The change notifier: one LISTEN connection per process, fanned out in memory.

PostgreSQL announces ``user:seq`` on the ``tessera_changes`` channel when an
access-list row changes (migration 0002). The hub maps a user id to the
subscribers of this process (sessions, long-polls) and pokes each one; a
subscriber then reads the rows itself. If the LISTEN connection is lost, the
hub reconnects with backoff and pokes *every* subscriber, because whatever was
announced meanwhile is gone. Every server process listens, so a commit made
through one node reaches devices connected to any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Protocol

import asyncpg

log = logging.getLogger(__name__)

CHANNEL = "tessera_changes"
#: Session control across nodes: ``revoke:<user>:<device>`` closes that device's
#: sessions (4403); ``logout:<user>:<device>`` closes every *other* device's (4401).
CONTROL_CHANNEL = "tessera_control"
#: How often an idle LISTEN connection is probed, seconds.
PROBE_INTERVAL = 10.0
BACKOFF_MIN = 0.05
BACKOFF_MAX = 5.0


class Subscriber(Protocol):
    def poke(self, seq: int | None) -> None:
        """New changes up to ``seq`` may exist (None: unknown, re-read anyway)."""

    def control(self, action: str, device: str) -> None:
        """A session-control message for this subscriber's user."""


def parse_payload(payload: str) -> tuple[int, int] | None:
    user, _, seq = payload.partition(":")
    try:
        return int(user), int(seq)
    except ValueError:
        return None


class Hub:
    def __init__(
        self,
        url: str,
        *,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        self._url = url
        self._subs: dict[int, set[Subscriber]] = {}
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._probe_interval = probe_interval
        self.connected = asyncio.Event()
        #: Times the LISTEN connection was (re)established; visible to tests and metrics.
        self.connections = 0

    # ----------------------------------------------------------- subscribers

    def subscribe(self, user: int, sub: Subscriber) -> None:
        self._subs.setdefault(user, set()).add(sub)

    def unsubscribe(self, user: int, sub: Subscriber) -> None:
        subs = self._subs.get(user)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[user]

    def count(self, user: int, kind: type | None = None) -> int:
        """Subscribers of ``user`` in this process (of one ``kind``, e.g. sessions only)."""
        subs = self._subs.get(user, ())
        return len(subs) if kind is None else sum(isinstance(s, kind) for s in subs)

    def total(self, kind: type | None = None) -> int:
        """Subscribers in this process, of every user (of one ``kind``)."""
        return sum(self.count(user, kind) for user in self._subs)

    @property
    def listener_pid(self) -> int | None:
        """The backend pid of the LISTEN connection (for tests that kill it)."""
        conn = self._conn
        return conn.get_server_pid() if conn is not None and not conn.is_closed() else None

    def _dispatch(self, user: int, seq: int | None) -> None:
        for sub in list(self._subs.get(user, ())):
            sub.poke(seq)

    def _poke_all(self) -> None:
        for user in list(self._subs):
            self._dispatch(user, None)

    def _on_control(self, conn: object, pid: int, channel: str, payload: str) -> None:
        action, _, rest = payload.partition(":")
        user, _, device = rest.partition(":")
        if not user.isdigit():
            log.warning("ignoring malformed control message %r", payload)
            return
        for sub in list(self._subs.get(int(user), ())):
            sub.control(action, device)

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        parsed = parse_payload(payload)
        if parsed is None:
            log.warning("ignoring malformed notification %r", payload)
            return
        self._dispatch(*parsed)

    # --------------------------------------------------------------- listener

    async def start(self, wait: float = 30.0) -> None:
        self._task = asyncio.create_task(self._run(), name="hub-listener")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self.connected.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close(timeout=2)

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            try:
                conn = await asyncpg.connect(self._url, timeout=10)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.warning("change listener cannot connect (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff * (1 + random.random() / 2))
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, ev=lost: ev.set())
            try:
                await conn.add_listener(CHANNEL, self._on_notify)
                await conn.add_listener(CONTROL_CHANNEL, self._on_control)
                self._conn = conn
                self.connections += 1
                self.connected.set()
                backoff = BACKOFF_MIN
                if self.connections > 1:
                    log.info("change listener reconnected; every session re-reads")
                # Anything announced while no listener was attached is lost:
                # every subscriber re-reads from its own cursor.
                self._poke_all()
                await self._watch(conn, lost)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("change listener lost (%s)", exc)
            finally:
                self.connected.clear()
                self._conn = None
                if not conn.is_closed():
                    conn.terminate()

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Return when the connection is gone: closed by the server, or unresponsive."""
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._probe_interval):
                    await lost.wait()
                    return
            async with asyncio.timeout(5):
                await conn.execute("SELECT 1")
