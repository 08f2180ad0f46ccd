"""Two-way live folder sync: local edits go up as they happen, remote changes come down.

State lives in a small SQLite index per synced folder: for every path, the
object and revision it corresponds to and the file's size and mtime when the
two last agreed, plus the feed cursor. A difference between the disk and the
index is a local change; a ``change`` frame with a newer revision is a remote
one. When both changed, neither is lost: the local file is kept (and uploaded)
as a conflicted copy and the remote version takes the name.

Everything that touches the index runs under one lock, so the feed consumer
and the file watcher never interleave halfway through an operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import watchfiles

from client import crypto
from client.connection import Connection, RemoteError, ServerClosed
from client.crypto import IntegrityError
from client.sdk import Revision, Tessera, conflicted_name
from client.transfer import TAG, Committed

log = logging.getLogger(__name__)

Log = Callable[[str], None]
TEMP_MARK = ".tessera-"


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    object: int
    rev: int
    kind: str
    size: int
    mtime_ns: int
    sealed_key: bytes


class Index:
    """The last agreed state of every path, and the feed cursor (SQLite, one writer)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = sqlite3.connect(path)
        self.db.execute(
            """CREATE TABLE IF NOT EXISTS files (
                   name TEXT PRIMARY KEY, object INTEGER NOT NULL UNIQUE, rev INTEGER NOT NULL,
                   kind TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                   sealed_key BLOB NOT NULL)"""
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER)")
        self.db.commit()
        os.chmod(path, 0o600)

    def close(self) -> None:
        self.db.close()

    @property
    def cursor(self) -> int:
        row = self.db.execute("SELECT v FROM meta WHERE k = 'cursor'").fetchone()
        return int(row[0]) if row else 0

    @cursor.setter
    def cursor(self, value: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('cursor', ?)", (value,))
        self.db.commit()

    def get(self, name: str) -> Entry | None:
        row = self.db.execute("SELECT * FROM files WHERE name = ?", (name,)).fetchone()
        return Entry(*row) if row else None

    def by_object(self, obj: int) -> Entry | None:
        row = self.db.execute("SELECT * FROM files WHERE object = ?", (obj,)).fetchone()
        return Entry(*row) if row else None

    def all(self) -> list[Entry]:
        return [Entry(*r) for r in self.db.execute("SELECT * FROM files ORDER BY name")]

    def put(self, entry: Entry) -> None:
        self.db.execute(
            "DELETE FROM files WHERE object = ? OR name = ?", (entry.object, entry.name)
        )
        self.db.execute(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                entry.name,
                entry.object,
                entry.rev,
                entry.kind,
                entry.size,
                entry.mtime_ns,
                entry.sealed_key,
            ),
        )
        self.db.commit()

    def drop(self, name: str) -> None:
        self.db.execute("DELETE FROM files WHERE name = ?", (name,))
        self.db.commit()


def safe_name(name: str) -> bool:
    """A name a hostile server could use to write outside the folder is refused."""
    path = PurePosixPath(name)
    return (
        bool(name)
        and not path.is_absolute()
        and ".." not in path.parts
        and "\\" not in name
        and "\x00" not in name
        and all(part not in ("", ".") for part in name.split("/"))
    )


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def local_content_hash(path: Path, part_size: int) -> bytes:
    """The content hash the uploader would compute for this file with ``part_size``."""
    hashes = []
    with open(path, "rb") as fh:
        while chunk := fh.read(part_size):
            hashes.append(hashlib.sha256(chunk).digest())
    return crypto.content_hash(hashes)


class SyncEngine:
    def __init__(self, sdk: Tessera, root: Path, index: Index, log: Log) -> None:
        self.sdk = sdk
        self.root = root
        self.index = index
        self.say = log
        self.master = sdk.state.master_key()
        self.lock = asyncio.Lock()
        self.conn: Connection | None = None

    # ------------------------------------------------------------ remote -> local

    async def apply(self, change: dict[str, Any]) -> None:
        async with self.lock:
            try:
                await self._apply(change)
            except IntegrityError as exc:
                self.say(f"skipped object {change['object']}: integrity error: {exc}")
            self.index.cursor = change["seq"]

    async def _apply(self, change: dict[str, Any]) -> None:
        known = self.index.by_object(change["object"])
        if known is not None and known.rev >= change["rev"]:
            return  # our own change coming back, or already applied
        if change["status"] == "deleted":
            if known is not None:
                self._remove_local(known)
            return
        _, meta = crypto.open_meta(self.master, change["meta"])
        name = meta.path
        if not safe_name(name):
            self.say(f"refused unsafe remote name {name!r}")
            return
        if known is not None and known.name != name:  # renamed: the old path goes
            self._remove_local(known)
        path = self.root / name
        if meta.kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
            self.index.put(
                Entry(name, change["object"], change["rev"], "dir", 0, 0, change["meta"]["key"])
            )
            return
        entry = self.index.get(name)
        on_disk = _stat(path)
        if on_disk is not None and (entry is None or on_disk != (entry.size, entry.mtime_ns)):
            # Changed here too. Same bytes? Then just agree; else keep both.
            part = change["parts"][0]["size"] - TAG if change["parts"] else 1
            same = (
                meta.size == on_disk[0]
                and await asyncio.to_thread(local_content_hash, path, part) == meta.content_hash
            )
            if not same:
                copy = conflicted_name(name, self.sdk.profile.device)
                path.rename(self.root / copy)
                self.say(f"conflict: {name} changed on both sides; ours kept as {copy}")
                if entry is not None:
                    self.index.drop(name)
            else:
                self.index.put(
                    Entry(
                        name,
                        change["object"],
                        change["rev"],
                        "file",
                        on_disk[0],
                        on_disk[1],
                        change["meta"]["key"],
                    )
                )
                return
        await self.sdk.pull(self.conn, change, path)
        size, mtime = _stat(path) or (0, 0)
        self.index.put(
            Entry(name, change["object"], change["rev"], "file", size, mtime, change["meta"]["key"])
        )
        self.say(f"downloaded {name}")

    def _remove_local(self, entry: Entry) -> None:
        path = self.root / entry.name
        self.index.drop(entry.name)
        if entry.kind == "dir":
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty
            return
        if _stat(path) == (entry.size, entry.mtime_ns):
            path.unlink()
            self.say(f"deleted {entry.name}")
            self._prune(path.parent)
        # A file edited here since: left alone, and uploaded as new by the next scan.

    def _prune(self, directory: Path) -> None:
        while directory != self.root and not any(directory.iterdir()):
            directory.rmdir()
            directory = directory.parent

    # ------------------------------------------------------------ local -> remote

    def _walk(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".tessera")]
            for filename in filenames:
                if TEMP_MARK in filename or filename.startswith(".tessera"):
                    continue
                path = Path(dirpath) / filename
                found[path.relative_to(self.root).as_posix()] = path
        return found

    async def scan(self) -> None:
        """Push what changed on disk since the index last agreed with it."""
        async with self.lock:
            on_disk = await asyncio.to_thread(self._walk)
            for name, path in sorted(on_disk.items()):
                entry = self.index.get(name)
                stat = _stat(path)
                if stat is None or (entry is not None and stat == (entry.size, entry.mtime_ns)):
                    continue
                await self._push(name, path, entry, stat)
            for entry in self.index.all():
                if entry.kind == "file" and entry.name not in on_disk:
                    await self._delete_remote(entry)

    async def _push(
        self, name: str, path: Path, entry: Entry | None, stat: tuple[int, int]
    ) -> None:
        assert self.conn is not None
        existing = Revision(entry.object, entry.rev, entry.sealed_key) if entry else None
        pushed, done = await self.sdk.push(self.conn, path, name, existing=existing)
        if pushed == name:
            self.index.put(self._entry(name, done, stat))
            self.say(f"uploaded {name}")
            return
        # The server had a newer version: ours went up as a conflicted copy.
        await asyncio.to_thread(path.rename, self.root / pushed)
        self.index.put(self._entry(pushed, done, _stat(self.root / pushed) or stat))
        self.say(f"conflict: {name} changed on the server; ours kept as {pushed}")
        if entry is not None:
            self.index.drop(name)
        await self._fetch_current(name)

    def _entry(self, name: str, done: Committed, stat: tuple[int, int]) -> Entry:
        return Entry(name, done.object, done.rev, "file", stat[0], stat[1], done.sealed_key)

    async def _fetch_current(self, name: str) -> None:
        remote = (await self.sdk.remote_files()).get(name)
        if remote is None:
            return
        path = self.root / name
        await self.sdk.pull(self.conn, remote, path)
        size, mtime = _stat(path) or (0, 0)
        self.index.put(
            Entry(name, remote.object, remote.rev, "file", size, mtime, remote.raw["meta"]["key"])
        )

    async def _delete_remote(self, entry: Entry) -> None:
        assert self.conn is not None
        try:
            await self.conn.request({"t": "delete", "object": entry.object, "base": entry.rev})
            self.say(f"removed {entry.name}")
            self.index.drop(entry.name)
        except RemoteError as exc:
            if exc.code == "not_found":  # deleted elsewhere too
                self.index.drop(entry.name)
            elif exc.code == "conflict":  # changed elsewhere: the edit beats our delete
                self.index.drop(entry.name)
                await self._fetch_current(entry.name)
                self.say(f"{entry.name} changed on the server; restored instead of deleted")
            else:
                raise

    # ---------------------------------------------------------------- the loop

    async def catch_up(self, conn: Connection) -> None:
        while True:
            frame = await conn.changes.get()
            if frame["t"] == "closed":
                raise frame["error"]
            if frame["t"] == "synced":
                return
            await self.apply(frame)

    async def follow(self, conn: Connection) -> None:
        while True:
            frame = await conn.changes.get()
            if frame["t"] == "closed":
                raise frame["error"]
            if frame["t"] == "change":
                await self.apply(frame)
                if conn.changes.empty():
                    await conn.send({"t": "ack", "cursor": self.index.cursor})

    async def watch(self, stop: asyncio.Event) -> None:
        async for _ in watchfiles.awatch(self.root, stop_event=stop, debounce=300, recursive=True):
            await self.scan()


async def run_sync(sdk: Tessera, root: Path, *, once: bool = False, log: Log = print) -> None:
    """Keep ``root`` and the account in step; return after one pass when ``once``."""
    root = await asyncio.to_thread(root.resolve)
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    key = hashlib.sha256(f"{sdk.server}\0{root}".encode()).hexdigest()[:16]
    index = Index(sdk.state.root / "sync" / f"{key}.sqlite")
    engine = SyncEngine(sdk, root, index, log)
    backoff = 0.5
    try:
        while True:
            conn = await sdk.open_session(cursor=index.cursor)
            engine.conn = conn
            stop = asyncio.Event()
            try:
                await engine.catch_up(conn)
                await engine.scan()
                if once:
                    return
                log(f"watching {root}")
                backoff = 0.5
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(engine.follow(conn))
                    tg.create_task(engine.watch(stop))
            except* ServerClosed as group:
                exc = group.exceptions[0]
                if not isinstance(exc, ServerClosed) or not exc.retryable:
                    raise exc from None
                log(f"connection lost ({exc}); reconnecting")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30)
            finally:
                stop.set()
                await conn.close()
    finally:
        index.close()
