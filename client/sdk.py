"""The SDK apps embed: log in, connect, push, pull, list, remove — all end-to-end encrypted.

``Tessera`` owns the device's state (profile, tokens, master key), a REST
client that refreshes tokens by itself, and WebSocket sessions opened with
retries and backoff. File names are encrypted, so the server cannot look one
up: :meth:`Tessera.remote_files` lists the objects and decrypts their names.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import tenacity

from client import crypto
from client.api import ApiError, RestApi
from client.connection import Connection, ServerClosed, ws_url
from client.crypto import FileMeta
from client.state import Profile, State
from client.transfer import (
    DEFAULT_PART_SIZE,
    Committed,
    Conflict,
    Progress,
    Uploader,
    download,
)

log = logging.getLogger(__name__)


class Revoked(Exception):
    """This device was revoked: log in again."""


@dataclass(frozen=True, slots=True)
class Revision:
    """What a new revision needs of the current one: its object, rev and wrapped key."""

    object: int
    rev: int
    sealed_key: bytes


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A live object with its name decrypted."""

    object: int
    rev: int
    meta: FileMeta
    raw: dict[str, Any]  # the object as the server sent it (for downloads)

    @property
    def name(self) -> str:
        return self.meta.path

    @property
    def revision(self) -> Revision:
        return Revision(self.object, self.rev, self.raw["meta"]["key"])


def conflicted_name(name: str, device: str, when: dt.datetime | None = None) -> str:
    """``report.txt`` -> ``report (conflicted copy laptop 2026-11-21 093012).txt``"""
    stamp = (when or dt.datetime.now()).strftime("%Y-%m-%d %H%M%S")
    path = PurePosixPath(name)
    stem, suffix = (path.stem, path.suffix) if path.suffix != path.name else (path.name, "")
    return str(path.with_name(f"{stem} (conflicted copy {device} {stamp}){suffix}"))


class Tessera:
    def __init__(self, state: State | None = None, server: str | None = None) -> None:
        self.state = state or State()
        self._server = server
        #: Plaintext bytes per partition (clamped to the server's max_partition).
        self.part_size = DEFAULT_PART_SIZE

    @property
    def profile(self) -> Profile:
        return self.state.profile()

    @property
    def server(self) -> str:
        return self._server or self.profile.server

    def api(self) -> RestApi:
        return RestApi(self.server, self.state)

    # ------------------------------------------------------------- accounts

    async def register(self, username: str, password: str) -> None:
        secret = await asyncio.to_thread(crypto.login_secret, username, password)
        async with RestApi(self.server) as api:
            await api.register(username, secret)
        await self.login(username, password)

    async def login(self, username: str, password: str) -> None:
        """Log this device in; create the user's master key on the very first login."""
        device = self.state.device_id()
        secret = await asyncio.to_thread(crypto.login_secret, username, password)
        # The machine's name, so the user can tell this device in the device list.
        name = "".join(c for c in socket.gethostname() if c.isprintable())[:100] or None
        async with RestApi(self.server, self.state) as api:
            self.state.save_tokens(await api.login(username, secret, device, name))
            self.state.save_profile(Profile(self.server, username, device))
            bundle = await api.key_bundle()
            if bundle is None:
                master = crypto.random_key()
                fresh = await asyncio.to_thread(
                    crypto.make_bundle, username, password, master, crypto.KdfParams.fresh()
                )
                try:
                    await api.put_key_bundle(fresh, replace=False)
                except ApiError as exc:  # another device created it first: use theirs
                    if exc.code != "conflict":
                        raise
                    bundle = await api.key_bundle()
            if bundle is not None:
                master = await asyncio.to_thread(crypto.open_bundle, username, password, bundle)
            self.state.save_master_key(master)
            account = await api.account()
        self.state.save_profile(Profile(self.server, username, device, account["user"]))

    async def change_password(self, current: str, new: str) -> None:
        async with self.api() as api:
            bundle = await api.key_bundle()
            if bundle is None:
                raise crypto.IntegrityError("no key bundle on the server")
            username = self.profile.username
            rewrapped = await asyncio.to_thread(
                crypto.rewrap_bundle, username, current, new, bundle
            )
            old_secret, new_secret = await asyncio.gather(
                asyncio.to_thread(crypto.login_secret, username, current),
                asyncio.to_thread(crypto.login_secret, username, new),
            )
            await api.change_password(old_secret, new_secret, rewrapped)

    # --------------------------------------------------------------- session

    async def open_session(self, cursor: int = 0, *, attempts: int = 6) -> Connection:
        """A connected session, retrying with exponential backoff and jitter.

        A 4401 refreshes the tokens first; 4403 (revoked) is final.
        """
        profile = self.profile
        api = self.api()

        async def attempt() -> Connection:
            try:
                return await Connection.open(
                    ws_url(self.server), api.access, profile.device, cursor, reauth=api.refresh
                )
            except ServerClosed as exc:
                if exc.code == 4403:
                    raise Revoked("this device was revoked; log in again") from exc
                if exc.code == 4401:
                    await api.refresh()
                raise

        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, ServerClosed) and e.retryable
            ),
            wait=tenacity.wait_exponential_jitter(multiplier=0.2, max=10),
            stop=tenacity.stop_after_attempt(attempts),
            reraise=True,
        )
        try:
            return await retrying(attempt)
        finally:
            await api.close()

    @asynccontextmanager
    async def session(self, cursor: int = 0) -> AsyncIterator[Connection]:
        conn = await self.open_session(cursor)
        try:
            yield conn
        finally:
            await conn.close()

    # ----------------------------------------------------------------- files

    async def remote_files(self) -> dict[str, RemoteFile]:
        """Every live object of the user, by decrypted name."""
        master = self.state.master_key()
        out: dict[str, RemoteFile] = {}
        async with self.api() as api:
            async for obj in api.objects():
                _, meta = crypto.open_meta(master, obj["meta"])
                out[meta.path] = RemoteFile(obj["object"], obj["rev"], meta, obj)
        return out

    async def push(
        self,
        conn: Connection,
        path: Path | None,
        name: str,
        *,
        existing: Revision | RemoteFile | None = None,
        kind: str = "file",
        progress: Progress | None = None,
    ) -> tuple[str, Committed]:
        """Upload ``path`` as ``name`` (a new revision of ``existing``, if given).

        A conflict never overwrites: the local file is uploaded again as a
        conflicted copy, and that name is returned with its commit.
        """
        uploader = Uploader(conn, self.state, self.state.master_key(), part_size=self.part_size)
        if isinstance(existing, RemoteFile):
            existing = existing.revision
        try:
            done = await uploader.upload(
                path,
                name,
                kind=kind,
                object_id=existing.object if existing else None,
                base=existing.rev if existing else None,
                sealed_key=existing.sealed_key if existing else None,
                progress=progress,
                server=self.server,
            )
            return name, done
        except Conflict:
            copy = conflicted_name(name, self.profile.device)
            log.warning("%s changed on the server; keeping ours as %s", name, copy)
            done = await uploader.upload(
                path, copy, kind=kind, progress=progress, server=self.server
            )
            return copy, done

    async def pull(
        self,
        conn: Connection | None,
        remote: RemoteFile | dict[str, Any],
        dest: Path,
        *,
        progress: Progress | None = None,
    ) -> FileMeta:
        """Download, verify and place one object; over REST when ``conn`` is None."""
        obj = remote.raw if isinstance(remote, RemoteFile) else remote
        master = self.state.master_key()
        if conn is not None:
            return await download(conn.fetch, master, obj, dest, progress=progress)
        async with self.api() as api:
            return await download(api.download_partition, master, obj, dest, progress=progress)

    async def remove(self, conn: Connection, remote: RemoteFile) -> Committed:
        done = await conn.request({"t": "delete", "object": remote.object, "base": remote.rev})
        return Committed(done["object"], done["rev"], done["seq"])
