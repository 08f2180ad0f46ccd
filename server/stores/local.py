"""A blob store in a local directory, for single-node setups without S3.

Every write goes to a temporary file next to its destination and is renamed into
place after an fsync, so a reader or a crash never sees half an object. All disk
I/O runs in worker threads: a slow disk must not stall the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import functools
import io
import itertools
import os
import secrets
import stat as stat_mode
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from server.stores.base import AREAS, BlobInfo, BlobNotFound, Piece, StoreError

_COPY_BUFFER = 1 << 20
#: Bytes a read hands over per worker-thread hop (whole chunks, at least one).
READ_AHEAD = 2 << 20
_MKDIR_ATTEMPTS = 8  # a concurrent delete may prune the directory we just made

#: Temp names: unique per process by the counter, across processes by the pid
#: and a random tag (a pid can be reused after a crash).
_TEMP_TAG = f"{os.getpid()}-{secrets.token_hex(4)}-"
_temp_names = itertools.count()


def _temp_name(dest: Path) -> str:
    """A fresh name beside ``dest``, hidden from listings by its leading dot."""
    return f"{dest.parent}/.{dest.name}.{_TEMP_TAG}{next(_temp_names)}.tmp"


def check_key(key: str) -> str:
    """Reject anything but ``<area>/<segment>/...`` made of plain names.

    Keys are server-made, but they become file paths here, so a bug elsewhere
    must not turn into a path traversal. Segments may not start with a dot:
    that namespace belongs to this store's temporary files.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("empty blob key")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"invalid character in blob key {key!r}")
    segments = key.split("/")
    if segments[0] not in AREAS or len(segments) < 2:
        raise ValueError(f"blob key {key!r} is not inside an area {AREAS}")
    for segment in segments[1:]:
        if not segment or segment.startswith("."):
            raise ValueError(f"invalid segment in blob key {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """Like :func:`check_key`, but the last segment may be partial or empty."""
    if not isinstance(prefix, str):
        raise ValueError("blob prefix must be a string")
    if "\\" in prefix or "\x00" in prefix:
        raise ValueError(f"invalid character in blob prefix {prefix!r}")
    segments = prefix.split("/")
    if len(segments) > 1:
        if segments[0] not in AREAS:
            raise ValueError(f"blob prefix {prefix!r} is not inside an area {AREAS}")
        for segment in segments[1:-1]:
            if not segment or segment.startswith("."):
                raise ValueError(f"invalid segment in blob prefix {prefix!r}")
        if segments[-1].startswith("."):
            raise ValueError(f"invalid segment in blob prefix {prefix!r}")
    return prefix


def area_prefixes(prefix: str) -> list[str]:
    """For each area that ``prefix`` can match, the narrower of the two prefixes."""
    result = []
    for area in AREAS:
        own = area + "/"
        if prefix.startswith(own):
            result.append(prefix)
        elif own.startswith(prefix):
            result.append(own)
    return result


def check_range(offset: int, length: int | None, chunk_size: int) -> None:
    if offset < 0:
        raise ValueError("negative offset")
    if length is not None and length < 0:
        raise ValueError("negative length")
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")


def _is_temp(name: str) -> bool:
    return name.startswith(".")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dir(path: Path) -> bool:
    """``mkdir -p``; False when a concurrent prune removed a directory mid-way:
    ``mkdir`` then sees EEXIST for a path that is no longer a directory, or
    ENOENT when the parent it just made was pruned again before the leaf."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, FileNotFoundError):
        return False
    return True


def _open_temp(dest: Path) -> tuple[Path, int]:
    """Create a unique temp file beside ``dest``, making its directory as needed."""
    for _ in range(_MKDIR_ATTEMPTS):
        if not _make_dir(dest.parent):
            continue
        tmp = Path(_temp_name(dest))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            continue  # the directory was pruned between mkdir and open
        return tmp, fd
    raise StoreError(f"could not create a temporary file in {dest.parent}")


def _write_atomic(dest: Path, fill: Callable[[BinaryIO], object], *, sync: bool = True) -> None:
    """Write via ``fill`` into a temp file, fsync it and rename it over ``dest``
    (without ``sync``, the caller makes it durable)."""
    tmp, fd = _open_temp(dest)
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            if sync:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        _fsync_dir(dest.parent)


def _write_small(dest: Path, data: bytes) -> None:
    """``_write_atomic`` without a sync, in as few calls as can be: the group-sync
    thread runs one per small put, each call waits for the GIL held by the event
    loop, and with the directory made and a counter for the temp name (no mkdir,
    no stat, no getrandom, no buffered file object) it spends less time waiting."""
    tmp = _temp_name(dest)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:  # no directory yet (or pruned): the general path makes it
        _write_atomic(dest, lambda out: out.write(data), sync=False)
        return
    with _removed_on_failure(tmp):
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, dest)


@contextlib.contextmanager
def _removed_on_failure(tmp: str) -> Iterator[None]:
    """A temp file made: if what follows fails, it goes."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _link_atomic(src: Path, dest: Path, *, sync: bool = True) -> None:
    """Hard-link ``src`` to ``dest`` via a temp name, with a fresh mtime, durably
    (without ``sync``, the caller makes it durable)."""
    for _ in range(_MKDIR_ATTEMPTS):
        if not _make_dir(dest.parent):
            continue
        tmp = Path(_temp_name(dest))
        try:
            os.link(src, tmp)
        except FileNotFoundError:
            if not src.exists():
                raise
            continue  # the directory was pruned between mkdir and link
        try:
            os.utime(tmp)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if sync:
            _fsync_dir(dest.parent)
        return
    raise StoreError(f"could not create a link in {dest.parent}")


class _NoLinks(Exception):
    """This filesystem cannot hard-link ``src`` to ``dest``: copy the bytes instead."""


#: What ``os.link`` fails with where links are not possible (not a missing file).
_NO_LINK_ERRNOS = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP)


def _link_small(src: Path, dest: Path) -> None:
    """``_link_atomic`` without a sync, for the group-sync thread, in as few calls as
    ``_write_small``. A missing source raises FileNotFoundError."""
    tmp = _temp_name(dest)
    try:
        try:
            os.link(src, tmp)
        except FileNotFoundError:
            # No source, or no directory yet (or pruned): the general path tells which.
            _link_atomic(src, dest, sync=False)
            return
        with _removed_on_failure(tmp):
            os.utime(tmp)
            os.replace(tmp, dest)
    except OSError as exc:
        if exc.errno in _NO_LINK_ERRNOS:
            raise _NoLinks from exc
        raise


class _Reader:
    """A file read in chunks, a few per call; closed by the call that meets its end."""

    def __init__(
        self,
        path: Path,
        offset: int,
        length: int | None,
        chunk_size: int,
    ) -> None:
        self.path, self.offset, self.remaining = path, offset, length
        self.chunk_size = chunk_size
        self.per_call = max(1, READ_AHEAD // chunk_size)
        self.file: BinaryIO | None = None
        self.done = False

    def next_chunks(self) -> list[bytes]:
        if self.file is None:
            self.file = open(self.path, "rb")  # noqa: SIM115 - closed below
            if self.offset:
                self.file.seek(self.offset)
        chunks: list[bytes] = []
        while len(chunks) < self.per_call and not self.done:
            want = self.chunk_size
            if self.remaining is not None:
                want = min(want, self.remaining)
            # Buffered: whole unless the file ends, and read straight into the
            # bytes object (nothing zeroed first or copied after).
            chunk = self.file.read(want) if want > 0 else None
            got = 0 if chunk is None else len(chunk)
            if chunk is not None and got > 0:
                chunks.append(chunk)
                if self.remaining is not None:
                    self.remaining -= got
            self.done = got < want or want == 0
        if self.done:
            self.file.close()
            self.file = None
        return chunks


def _copy_stream(src: io.BufferedReader, out: BinaryIO) -> int:
    copied = 0
    buf = bytearray(_COPY_BUFFER)
    view = memoryview(buf)
    while n := src.readinto(buf):
        out.write(view[:n])
        copied += n
    return copied


def _syncfs_call() -> Callable[[int], int] | None:
    """Linux's ``syncfs(2)`` (durable: every write of one filesystem), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return call


_syncfs = _syncfs_call()


class _GroupSync:
    """Small puts and links made durable together: one ``syncfs`` per batch instead
    of an fsync of each file and of its directory (a commit of a small file waited
    mostly on those), and one worker thread for the batch instead of a thread hop
    each (a hop costs the event loop GIL hand-offs). The files are renamed into
    place before the sync, so a crash can leave a torn file under its final key,
    but never one that a row refers to: callers record a key only after the
    operation returns.

    A batch's thread hands the next batch to another thread before it syncs, so
    the next batch's operations overlap its sync (a few ms of waiting for the
    disk): with 50 sessions putting 1 KiB files, one thread spent ~40 % of its
    time in ``syncfs`` and puts went 8-9 % faster with the overlap."""

    #: Small puts larger than this still fsync one by one.
    MAX_BYTES = 64 * 1024
    #: One thread runs the newest batch's operations while the others sync.
    THREADS = 3

    def __init__(self, root: Path, syncfs: Callable[[int], int]) -> None:
        self._root = root
        self._syncfs = syncfs
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[[], None], asyncio.Future[None]]] = []
        #: A thread has taken on the pending operations (it runs them next).
        self._draining = False
        self._threads = concurrent.futures.ThreadPoolExecutor(
            self.THREADS, thread_name_prefix="tessera-group-sync"
        )

    def close(self) -> None:
        """Stop the threads once idle (work already handed to them still runs)."""
        self._threads.shutdown(wait=False)

    async def put(self, dest: Path, data: bytes) -> None:
        await self.run(functools.partial(_write_small, dest, data))

    async def link(self, src: Path, dest: Path) -> None:
        await self.run(functools.partial(_link_small, src, dest))

    async def run(self, operation: Callable[[], None]) -> None:
        """Run ``operation`` (a few cheap file-system calls) in the batch's thread;
        return once a sync after it has succeeded, or raise what it raised."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._pending.append((operation, done))
            start, self._draining = not self._draining, True
        if start and not self._start():
            loop.run_in_executor(None, self._drain)  # closed: the loop's own threads
        await done

    def _start(self) -> bool:
        """Start a thread on the pending operations; False once closed."""
        try:
            self._threads.submit(self._drain)
        except RuntimeError:
            return False
        return True

    def _drain(self) -> None:
        """Worker thread: run the pending operations, hand what arrived meanwhile to
        another thread, sync, answer (each caller in its own event loop)."""
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._draining = False
                    return
            outcomes: list[tuple[asyncio.Future[None], BaseException | None]] = []
            for operation, done in batch:
                try:
                    operation()
                except BaseException as exc:
                    outcomes.append((done, exc))
                else:
                    outcomes.append((done, None))
            with self._lock:
                more = bool(self._pending)
                if not more:
                    self._draining = False
            # Handed on, this thread is done after its sync; if closed, it goes on.
            handed = more and self._start()
            failed = self._sync()
            for done, exc in outcomes:
                done.get_loop().call_soon_threadsafe(_answer, done, exc or failed)
            if not more or handed:
                return

    def _sync(self) -> OSError | None:
        """The failure, if the batch may not be durable (every caller then fails)."""
        try:
            fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            return exc
        try:
            if self._syncfs(fd) != 0:
                err = ctypes.get_errno()
                return OSError(err, f"syncfs: {os.strerror(err)}")
        finally:
            os.close(fd)
        return None


def _answer(done: asyncio.Future[None], exc: BaseException | None) -> None:
    if done.done():  # the caller went away
        return
    if exc is None:
        done.set_result(None)
    else:
        done.set_exception(exc)


class LocalStore:
    """Objects are plain files at ``root/<key>``."""

    #: A put is a rename and two fsyncs, holding nothing in memory. With 2 at a
    #: time a 1 GiB upload's parts waited up to 1.2 s for their turn.
    parallel_puts = 8
    #: A spooled part is renamed into place: written once, straight to the disk.
    spool_direct = True

    def __init__(self, root: Path, *, group_sync: bool = True) -> None:
        self.root = Path(root)
        self._group = _GroupSync(self.root, _syncfs) if group_sync and _syncfs else None

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def start(self) -> None:
        def make() -> None:
            for area in AREAS:
                (self.root / area).mkdir(parents=True, exist_ok=True)

        await asyncio.to_thread(make)

    async def close(self) -> None:
        if self._group is not None:
            self._group.close()

    async def ping(self) -> None:
        def probe() -> None:
            tmp, fd = _open_temp(self.root / "ping")
            os.close(fd)
            tmp.unlink()

        if not await asyncio.to_thread(self.root.is_dir):
            raise StoreError(f"blob directory {self.root} does not exist")
        try:
            await asyncio.to_thread(probe)
        except OSError as exc:
            raise StoreError(f"blob directory {self.root} is not writable: {exc}") from exc

    async def put_file(
        self, key: str, path: Path, size: int, *, move: bool = False, sha256: bytes | None = None
    ) -> None:
        # ``sha256`` is not used: the bytes never leave this process's hands.
        if move and await self._move_in(key, path, size):
            return

        def fill(out: BinaryIO) -> None:
            with open(path, "rb") as src:
                copied = _copy_stream(src, out)
            if copied != size:
                raise StoreError(f"{path} has {copied} bytes, expected {size}")

        await self._put(key, fill)

    async def put_bytes(self, key: str, data: bytes, *, sha256: bytes | None = None) -> None:
        if self._group is not None and len(data) <= self._group.MAX_BYTES:
            dest = self._path(key)
            try:
                await self._group.put(dest, data)
            except (OSError, StoreError) as exc:
                # As in _put: a failed first write leaves no directories.
                await asyncio.to_thread(self._prune, dest.parent)
                if isinstance(exc, StoreError):
                    raise
                raise StoreError(f"cannot store {key}: {exc}") from exc
            return
        await self._put(key, lambda out: out.write(data))

    async def _put(self, key: str, fill: Callable[[BinaryIO], object]) -> None:
        dest = self._path(key)

        def run() -> None:
            try:
                _write_atomic(dest, fill)
            except BaseException:
                self._prune(dest.parent)  # a failed first write leaves no directories
                raise

        try:
            await asyncio.to_thread(run)
        except OSError as exc:
            raise StoreError(f"cannot store {key}: {exc}") from exc

    async def _move_in(self, key: str, path: Path, size: int) -> bool:
        """Rename ``path`` into place (after fsync): no second copy of the bytes.
        False when it is on another filesystem, so the caller copies instead."""
        dest = self._path(key)

        def run() -> bool:
            with open(path, "rb+") as fh:
                if os.fstat(fh.fileno()).st_size != size:
                    raise StoreError(f"{path} does not have {size} bytes")
                os.fchmod(fh.fileno(), 0o600)
                os.fsync(fh.fileno())
            for _ in range(_MKDIR_ATTEMPTS):
                if not _make_dir(dest.parent):
                    continue
                try:
                    os.replace(path, dest)
                except FileNotFoundError:
                    continue  # the directory was pruned between mkdir and rename
                except OSError as exc:
                    if exc.errno == errno.EXDEV:
                        return False
                    raise
                _fsync_dir(dest.parent)
                return True
            raise StoreError(f"could not move {path} into {dest.parent}")

        try:
            return await asyncio.to_thread(run)
        except OSError as exc:
            raise StoreError(f"cannot store {key}: {exc}") from exc

    async def copy(self, src: str, dst: str) -> None:
        """A hard link (the bytes are immutable once stored), given a fresh mtime
        like an S3 copy gets, because the janitor judges orphans by age. Falls back
        to copying where links are not possible."""
        src_path, dst_path = self._path(src), self._path(dst)
        if self._group is not None:
            try:
                await self._group.link(src_path, dst_path)
                return
            except _NoLinks:
                pass  # copied below
            except FileNotFoundError:
                raise BlobNotFound(src) from None
            except OSError as exc:
                raise StoreError(f"cannot copy {src} to {dst}: {exc}") from exc

        def run() -> None:
            if not src_path.is_file():
                raise BlobNotFound(src)
            try:
                _link_atomic(src_path, dst_path)
            except FileNotFoundError:
                raise BlobNotFound(src) from None
            except OSError as exc:
                if exc.errno not in _NO_LINK_ERRNOS:
                    raise
                try:
                    source = open(src_path, "rb")  # noqa: SIM115 - closed below
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                    raise BlobNotFound(src) from None
                with source:
                    _write_atomic(dst_path, lambda out: _copy_stream(source, out))

        try:
            await asyncio.to_thread(run)
        except OSError as exc:
            raise StoreError(f"cannot copy {src} to {dst}: {exc}") from exc

    async def stat(self, key: str) -> BlobInfo | None:
        path = self._path(key)
        try:
            st = await asyncio.to_thread(os.stat, path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StoreError(f"cannot stat {key}: {exc}") from exc
        if not stat_mode.S_ISREG(st.st_mode):
            return None
        return BlobInfo(key=key, size=st.st_size, mtime=st.st_mtime)

    def read(
        self, key: str, offset: int = 0, length: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        return self._read(key, offset, length, chunk_size)

    async def read_pieces(
        self, key: str, offset: int, length: int | None, chunk_size: int
    ) -> AsyncIterator[list[Piece]]:
        async for chunk in self._read(key, offset, length, chunk_size):
            yield [chunk]

    async def _read(
        self,
        key: str,
        offset: int,
        length: int | None,
        chunk_size: int,
    ) -> AsyncIterator[bytes]:
        """Chunks of the file, read in a worker thread, READ_AHEAD bytes'
        worth a hop (opening and closing ride along): a download of cached files
        spent more on thread hand-offs than on the reads."""
        check_range(offset, length, chunk_size)
        reader = _Reader(self._path(key), offset, length, chunk_size)
        try:
            while True:
                try:
                    chunks = await asyncio.to_thread(reader.next_chunks)
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                    raise BlobNotFound(key) from None
                except OSError as exc:
                    raise StoreError(f"cannot read {key}: {exc}") from exc
                for chunk in chunks:
                    yield chunk
                if reader.done:
                    return
        finally:
            if reader.file is not None:
                await asyncio.to_thread(reader.file.close)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await asyncio.to_thread(self._delete_paths, [path])

    async def delete_many(self, keys: list[str]) -> None:
        paths = [self._path(key) for key in keys]
        if paths:
            await asyncio.to_thread(self._delete_paths, paths)

    async def presign_get(self, key: str, expires: int) -> str | None:
        check_key(key)
        return None

    def _delete_paths(self, paths: Iterable[Path]) -> None:
        parents: set[Path] = set()
        for path in paths:
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            except OSError as exc:
                raise StoreError(f"cannot delete {path}: {exc}") from exc
            parents.add(path.parent)
        # Deepest first, so a parent is tried after its emptied children.
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            self._prune(parent)

    def _prune(self, directory: Path) -> None:
        """Remove empty directories from ``directory`` up to, not including, the
        first level under its area (a user's directory). Those stay, one per user:
        removing one that a user's next upload makes again frees an inode and takes
        another, and ext4 without a journal skips the inodes freed in the last
        minute when it allocates, so every create got slower as commits got faster."""
        areas = {self.root / area for area in AREAS}
        while (
            directory not in areas
            and directory.parent not in areas
            and directory != self.root
            and self.root in directory.parents
        ):
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass  # a concurrent delete got there first; keep climbing
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    return
                raise StoreError(f"cannot remove {directory}: {exc}") from exc
            directory = directory.parent

    async def list(self, prefix: str) -> AsyncIterator[BlobInfo]:
        """Objects under ``prefix``, in no particular order; temp files are skipped."""
        check_prefix(prefix)
        for area_prefix in area_prefixes(prefix):
            # Start the walk at the deepest directory the prefix names in full.
            base = area_prefix.rsplit("/", 1)[0]
            pending = [base]
            while pending:
                rel_dir = pending.pop()
                entries = await asyncio.to_thread(_scan, self.root / rel_dir)
                for name, is_dir, info in entries:
                    if _is_temp(name):
                        continue
                    rel = f"{rel_dir}/{name}"
                    if is_dir:
                        # Descend only where keys can still match the prefix.
                        if (rel + "/").startswith(area_prefix) or area_prefix.startswith(rel):
                            pending.append(rel)
                    elif info is not None and rel.startswith(area_prefix):
                        yield BlobInfo(key=rel, size=info[0], mtime=info[1])


def _scan(directory: Path) -> list[tuple[str, bool, tuple[int, float] | None]]:
    """One directory's entries as (name, is_dir, (size, mtime) for files)."""
    result: list[tuple[str, bool, tuple[int, float] | None]] = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        result.append((entry.name, True, None))
                    elif entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        result.append((entry.name, False, (st.st_size, st.st_mtime)))
                except FileNotFoundError:
                    continue  # deleted while we looked
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise StoreError(f"cannot list {directory}: {exc}") from exc
    return result
