"""The blob store interface shared by the S3 and local-directory stores.

Keys are always built by the server (see :mod:`server.keys`), never taken from
client input. The first path segment names the *area*: ``staging/...`` for
parts of unfinished uploads and ``partitions/...`` for committed data.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

AREAS = ("staging", "partitions")

#: Bytes as a store read them (a view when a network read spans two chunks).
Piece = bytes | memoryview


class StoreError(Exception):
    """The store could not do what was asked (unreachable, refused, corrupt)."""


class BlobNotFound(StoreError):
    """No object under that key."""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


class BlobStore(Protocol):
    #: Parts one session may be storing at once: enough that parts do not queue
    #: behind the store's latency (S3) or each other's fsyncs (local). Chunk data
    #: in memory is bounded by the credit window, not by this.
    parallel_puts: int

    async def start(self) -> None:
        """Connect, create buckets/directories if configured to."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreError when the store is not reachable (used by /readyz)."""

    #: Whether spool files should go straight to the disk (``O_DIRECT``): true where
    #: the store takes the file itself (a rename), so its one write is the one
    #: that counts; false where the store only reads it back to send it on (S3),
    #: and the page cache is the cheaper buffer (read back from memory, deleted
    #: before it is ever written out).
    spool_direct: bool

    async def put_file(
        self, key: str, path: Path, size: int, *, move: bool = False, sha256: bytes | None = None
    ) -> None:
        """Store the file at ``path`` (exactly ``size`` bytes) under ``key``, durably.

        With ``move`` the store may take the file itself (a rename on the same
        filesystem) instead of copying it; the caller then must not rely on it.
        Otherwise the file is left in place and the caller removes it.

        ``sha256`` is the digest of the bytes, when the caller has verified it: a
        store that signs its payloads signs with it rather than hash the bytes
        again, and then refuses bytes that do not match it.
        """

    async def put_bytes(self, key: str, data: bytes, *, sha256: bytes | None = None) -> None:
        """Store ``data`` under ``key``, durably; ``sha256`` as for ``put_file``."""

    async def copy(self, src: str, dst: str) -> None:
        """Server-side copy; raises BlobNotFound when ``src`` is missing."""

    async def stat(self, key: str) -> BlobInfo | None: ...

    def read(
        self, key: str, offset: int = 0, length: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        """Stream bytes ``[offset, offset+length)``; raises BlobNotFound when missing."""
        ...

    def read_pieces(
        self, key: str, offset: int, length: int | None, chunk_size: int
    ) -> AsyncIterator[list[Piece]]:
        """``read``, but each chunk is the list of pieces it arrived in (whole
        chunks of ``chunk_size`` but the last): a download frame is sent as its
        head and these pieces, without joining them into one buffer."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    async def delete_many(self, keys: list[str]) -> None: ...

    def list(self, prefix: str) -> AsyncIterator[BlobInfo]:
        """Every object whose key starts with ``prefix`` (recursively)."""
        ...

    async def presign_get(self, key: str, expires: int) -> str | None:
        """A URL that fetches ``key`` without credentials for ``expires`` seconds,
        or None when the store cannot make one (the server then streams)."""
