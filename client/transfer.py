"""Files in and out: partition, encrypt, upload resumably; download, verify, place.

Uploads encrypt each part twice: once to learn the ciphertext hashes the
``upload`` frame declares, and again, identically (same part key and nonce),
when the part is sent, so a large file is never held in memory. The upload id
and the declared parts go to a journal before any data is sent; a later run
finds the journal, asks the server which parts it has (``resume``), and sends
only the rest, re-encrypting them from the file and checking each hash before
it leaves: if the file changed meanwhile, the old upload is abandoned rather
than a nonce reused. A file of one part that fits in a frame goes in one
``put`` under an id journalled first, so a resend after a lost reply cannot
commit it twice.

Downloads write plaintext into a temporary file beside the destination, verify
every part (sha256 of the ciphertext, AES-GCM) and the whole-file content hash,
and only then rename into place.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client import crypto
from client.connection import Connection, RemoteError
from client.crypto import FileMeta, IntegrityError
from client.state import State

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 4 * MiB
PARALLEL_PARTS = 4
#: AES-GCM adds a 16-byte tag to every part.
TAG = 16

Progress = Callable[[int], None]  # called with bytes just transferred
Fetch = Callable[[int], Awaitable[bytes]]  # partition id -> ciphertext


class Conflict(Exception):
    """The object changed on the server since ``base``; ``rev`` is the current one."""

    def __init__(self, rev: int) -> None:
        super().__init__(f"the object changed on the server (now rev {rev})")
        self.rev = rev


@dataclass(frozen=True, slots=True)
class Committed:
    object: int
    rev: int
    seq: int
    #: The object key wrapped by the master key: what the next revision needs.
    sealed_key: bytes = b""


def part_count(size: int, part_size: int) -> int:
    return (size + part_size - 1) // part_size


def _read_part(path: Path, index: int, part_size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(index * part_size)
        return fh.read(part_size)


def _fingerprint(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def journal_key(server: str, name: str) -> str:
    return hashlib.sha256(f"{server}\0{name}".encode()).hexdigest()[:32]


class Uploader:
    def __init__(
        self,
        conn: Connection,
        state: State,
        master: bytes,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        parallel: int = PARALLEL_PARTS,
    ) -> None:
        self.conn = conn
        self.state = state
        self.master = master
        self.part_size = min(part_size, conn.limits["max_partition"] - TAG)
        self.parallel = parallel

    async def upload(
        self,
        path: Path | None,
        name: str,
        *,
        kind: str = "file",
        object_id: int | None = None,
        base: int | None = None,
        sealed_key: bytes | None = None,
        progress: Progress | None = None,
        server: str = "",
    ) -> Committed:
        """Upload (or resume uploading) ``path`` as ``name``; Conflict on a stale base.

        A new revision of ``object_id`` keeps the object's key: pass its wrapped
        form (``meta.key`` of the current revision) as ``sealed_key``.
        """
        if (object_id is None) != (sealed_key is None):
            raise ValueError("a new revision needs the object's sealed key, and only then")
        key = journal_key(server, name)
        entry = self.state.journal(key)
        if entry is not None and not self._still_valid(entry, path, object_id, base):
            await self._abandon(entry)
            entry = None
        have: set[int] = set()
        if entry is not None and not entry.get("put"):
            try:
                resumed = await self.conn.request({"t": "resume", "upload": entry["upload"]})
                have = set(resumed["have"])
            except RemoteError as exc:
                if exc.code != "not_found":
                    raise
                entry = None  # expired or committed elsewhere: start afresh
        if entry is None:
            entry = await self._declare(path, name, kind, object_id, base, sealed_key)
            self.state.save_journal(key, entry)
        if progress:
            progress(sum(entry["sizes"][i] - TAG for i in have))
        try:
            try:
                done = await self._deliver(path, entry, have, progress)
            except FileChanged:
                # Same size and mtime, other bytes: the old declaration is worthless.
                await self._abandon(entry)
                entry = await self._declare(path, name, kind, object_id, base, sealed_key)
                self.state.save_journal(key, entry)
                done = await self._deliver(path, entry, set(), progress)
        except RemoteError as exc:
            if exc.code == "conflict":
                raise Conflict(exc.frame["rev"]) from None
            raise
        self.state.drop_journal(key)
        return Committed(done["object"], done["rev"], done["seq"], bytes.fromhex(entry["meta_key"]))

    async def _deliver(
        self, path: Path | None, entry: dict[str, Any], have: set[int], progress: Progress | None
    ) -> dict[str, Any]:
        """Send what the server lacks and commit: one ``put`` for a small file (a resend
        after a lost reply gets the first one's result), else chunks and ``commit``."""
        if entry.get("put"):
            assert path is not None
            return await self._put(path, entry, progress)
        await self._send_missing(path, entry, have, progress)
        return await self._commit(path, entry)

    async def _put(self, path: Path, entry: dict[str, Any], progress: Progress | None) -> Any:
        object_key = crypto.open_object_key(self.master, bytes.fromhex(entry["meta_key"]))
        plain = await asyncio.to_thread(_read_part, path, 0, entry["part_size"])
        spec = entry["parts"][0]
        data = reseal_part(object_key, bytes.fromhex(entry["revision"]), 0, 1, plain, spec)
        frame: dict[str, Any] = {
            "t": "put",
            "upload": entry["upload"],
            "meta": {k: bytes.fromhex(v) for k, v in entry["meta"].items()},
            "part": {
                "size": entry["sizes"][0],
                "sha256": bytes.fromhex(spec["sha256"]),
                "key": bytes.fromhex(spec["key"]),
                "salt": bytes.fromhex(spec["salt"]),
            },
            "data": data,
        }
        if entry["object"] is not None:
            frame["object"], frame["base"] = entry["object"], entry["base"]
        done = await self.conn.put(frame)
        if progress:
            progress(len(plain))
        return done

    async def _commit(self, path: Path | None, entry: dict[str, Any]) -> dict[str, Any]:
        """Commit; if the server lost staged parts (``incomplete``, e.g. after its
        crash), send those again, once, and commit again."""
        commit = {"t": "commit", "upload": entry["upload"]}
        try:
            return await self.conn.request(commit)
        except RemoteError as exc:
            missing = exc.frame.get("missing")
            if exc.code != "incomplete" or not missing:
                raise
        have = set(range(len(entry["parts"]))) - set(missing)
        await self._send_missing(path, entry, have, None)
        return await self.conn.request(commit)

    def _still_valid(
        self, entry: dict[str, Any], path: Path | None, object_id: int | None, base: int | None
    ) -> bool:
        if (entry["object"], entry["base"]) != (object_id, base):
            return False
        if path is None:
            return entry["fingerprint"] is None
        return list(_fingerprint(path)) == entry["fingerprint"]

    async def _abandon(self, entry: dict[str, Any]) -> None:
        with contextlib.suppress(RemoteError):  # already gone
            await self.conn.request({"t": "abort", "upload": entry["upload"]})

    async def _declare(
        self,
        path: Path | None,
        name: str,
        kind: str,
        object_id: int | None,
        base: int | None,
        sealed_key: bytes | None,
    ) -> dict[str, Any]:
        fingerprint = _fingerprint(path) if path is not None else None
        size = fingerprint[0] if fingerprint else 0
        count = part_count(size, self.part_size) if kind == "file" else 0
        object_key = (
            crypto.open_object_key(self.master, sealed_key)
            if sealed_key is not None
            else crypto.random_key()
        )
        revision = os.urandom(crypto.REVISION_SALT_LEN)
        specs: list[dict[str, Any]] = []
        plain_hashes: list[bytes] = []
        for index in range(count):
            assert path is not None
            plain = await asyncio.to_thread(_read_part, path, index, self.part_size)
            sealed = await asyncio.to_thread(
                crypto.seal_part, object_key, revision, index, count, plain
            )
            specs.append(sealed.spec())
            plain_hashes.append(sealed.plain_sha256)
        meta = FileMeta(
            path=name,
            kind=kind,
            mtime_ns=fingerprint[1] if fingerprint else time.time_ns(),
            size=size,
            content_hash=crypto.content_hash(plain_hashes) if kind == "file" else b"",
            parts=count,
        )
        sealed_meta = crypto.seal_meta(self.master, object_key, meta, revision)
        entry: dict[str, Any] = {
            "name": name,
            "object": object_id,
            "base": base,
            "fingerprint": list(fingerprint) if fingerprint else None,
            "part_size": self.part_size,
            "meta_key": sealed_meta.key.hex(),
            "revision": revision.hex(),
            "sizes": [s["size"] for s in specs],
            "parts": [
                {"sha256": s["sha256"].hex(), "key": s["key"].hex(), "salt": s["salt"].hex()}
                for s in specs
            ],
        }
        if count == 1 and specs[0]["size"] <= self.conn.limits["max_chunk"]:
            # One frame does it all; the id is ours, so a resend cannot commit twice.
            meta_map = {k: v.hex() for k, v in sealed_meta.as_map().items()}
            return {**entry, "upload": secrets.token_urlsafe(16), "put": True, "meta": meta_map}
        frame: dict[str, Any] = {
            "t": "upload",
            "kind": kind,
            "meta": sealed_meta.as_map(),
            "parts": specs,
        }
        if object_id is not None:
            frame["object"], frame["base"] = object_id, base
        try:
            ok = await self.conn.request(frame)
        except RemoteError as exc:
            if exc.code == "conflict":
                raise Conflict(exc.frame["rev"]) from None
            raise
        return {**entry, "upload": ok["upload"]}

    async def _send_missing(
        self, path: Path | None, entry: dict[str, Any], have: set[int], progress: Progress | None
    ) -> None:
        missing = [i for i in range(len(entry["parts"])) if i not in have]
        if not missing:
            return
        assert path is not None
        object_key = crypto.open_object_key(self.master, bytes.fromhex(entry["meta_key"]))
        revision = bytes.fromhex(entry["revision"])
        count = len(entry["parts"])
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in missing:
            queue.put_nowait(index)

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                spec = entry["parts"][index]
                plain = await asyncio.to_thread(_read_part, path, index, entry["part_size"])
                data = await asyncio.to_thread(
                    reseal_part, object_key, revision, index, count, plain, spec
                )
                await self.conn.send_part(entry["upload"], index, data)
                if progress:
                    progress(len(plain))

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(self.parallel, len(missing))):
                    tg.create_task(worker())
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None  # callers handle FileChanged, RemoteError


def reseal_part(
    object_key: bytes,
    revision: bytes,
    index: int,
    count: int,
    plain: bytes,
    spec: dict[str, str],
) -> bytes:
    """Encrypt ``plain`` exactly as declared; refuse if the result differs (file changed)."""
    part_key = crypto.open_part_key(object_key, revision, index, count, bytes.fromhex(spec["key"]))
    data = crypto.encrypt_part(part_key, bytes.fromhex(spec["salt"]), revision, index, count, plain)
    if hashlib.sha256(data).hexdigest() != spec["sha256"]:
        raise FileChanged(f"part {index} changed since the upload was declared")
    return data


class FileChanged(Exception):
    """The file differs from what an unfinished upload declared."""


# ------------------------------------------------------------------ downloads


async def download(
    fetch: Fetch,
    master: bytes,
    obj: dict[str, Any],
    dest: Path,
    *,
    progress: Progress | None = None,
    parallel: int = PARALLEL_PARTS,
) -> FileMeta:
    """Fetch, verify and decrypt an object (a ``change`` map) into ``dest``.

    Raises IntegrityError (and leaves ``dest`` untouched) when anything fails
    to verify.
    """
    object_key, meta = crypto.open_meta(master, obj["meta"])
    revision = obj["meta"]["salt"]
    if meta.kind == "dir":
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
        return meta
    parts = obj["parts"]
    if len(parts) != meta.parts:
        raise IntegrityError(f"{len(parts)} parts listed, the metadata says {meta.parts}")
    offsets = [0]
    for p in parts:
        offsets.append(offsets[-1] + p["size"] - TAG)
    if offsets[-1] != meta.size:
        raise IntegrityError("part sizes do not add up to the file size")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tessera-{os.getpid()}-{os.urandom(3).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    hashes: list[bytes] = [b""] * len(parts)
    try:
        limit = asyncio.Semaphore(parallel)

        async def one(index: int) -> None:
            async with limit:
                data = await fetch(parts[index]["id"])
            plain = await asyncio.to_thread(
                crypto.open_part, object_key, revision, index, len(parts), parts[index], data
            )
            hashes[index] = hashlib.sha256(plain).digest()
            await asyncio.to_thread(os.pwrite, fd, plain, offsets[index])
            if progress:
                progress(len(plain))

        async with asyncio.TaskGroup() as tg:
            for index in range(len(parts)):
                tg.create_task(one(index))
        if crypto.content_hash(hashes) != meta.content_hash:
            raise IntegrityError("the file's content hash does not match its metadata")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.utime(tmp, ns=(meta.mtime_ns, meta.mtime_ns))
        os.replace(tmp, dest)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        if isinstance(exc, BaseExceptionGroup):
            integrity = exc.subgroup(IntegrityError)
            if integrity is not None:
                raise integrity.exceptions[0] from None
        raise
    return meta
