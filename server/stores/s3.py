"""A blob store on S3 or an S3-compatible server (MinIO), via miniopy-async.

Each area lives in its own bucket, but object names keep the full key
(``staging/u/...``), so objects are self-describing and both areas may even share
one bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO
from xml.etree import ElementTree

import aiohttp
from aiohttp_retry import ExponentialRetry, RetryClient
from miniopy_async import Minio
from miniopy_async.commonconfig import CopySource
from miniopy_async.credentials import Credentials
from miniopy_async.datatypes import parse_copy_object
from miniopy_async.deleteobjects import DeleteObject
from miniopy_async.error import MinioException, S3Error, ServerError

from server.stores.base import BlobInfo, BlobNotFound, Piece, StoreError
from server.stores.local import area_prefixes, check_key, check_prefix, check_range

#: Largest object sent in one PUT, streamed from its file (nothing held in memory).
#: Partitions are at most 16 MiB by default, so each goes up in one request.
SINGLE_PUT = 16 * 1024 * 1024
#: Piece of a larger object's multipart upload, read into memory one at a time
#: (S3's least is 5 MiB). A session stores ``parallel_puts`` (4) parts at once: at
#: 16 MiB a piece, that was 64 MiB, over the bound of 2 x window + 2 x
#: max_partition for a max_partition up to 24 MiB; at 8 MiB it is 32 MiB, within
#: 2 x max_partition whenever a partition is large enough to need pieces.
PIECE_SIZE = 8 * 1024 * 1024
#: Seconds to establish a TCP connection; a dead endpoint must fail fast.
CONNECT_TIMEOUT = 5.0
#: Seconds without a byte from the endpoint before a request is abandoned.
READ_TIMEOUT = 60.0
#: Upper bound for the whole readiness probe.
PING_TIMEOUT = 5.0
#: Concurrent connections to the endpoint; every streaming download holds one.
MAX_CONNECTIONS = 64
#: Tries of a PUT (a write or a copy) that the endpoint answers with a server
#: error (503 SlowDown, 500), and the first pause between them (doubling).
PUT_ATTEMPTS = 3
PUT_BACKOFF = 0.2
#: Statuses retried: by the HTTP client for requests without a streamed body, and
#: by ``_again`` for PUTs.
RETRY_STATUSES = frozenset({500, 502, 503, 504})

_MISSING = ("NoSuchKey", "NoSuchObject")

#: The signed payload hash of a PUT (SigV4). A caller that knows the body's
#: SHA-256 passes it under this header and the client sends it as is.
CONTENT_SHA256 = "x-amz-content-sha256"


class _Minio(Minio):
    """miniopy-async, signing a PUT with the body's SHA-256 when the caller has it.

    miniopy-async reads every body once more before it is sent: SHA-256 over HTTP
    (8 KiB reads in a worker thread), MD5 over HTTPS. Tessera verified the SHA-256
    of every part as it arrived, so it signs with that instead: no second pass over
    the bytes, and S3 or MinIO refuses a body that does not match it
    (``XAmzContentSHA256Mismatch``), so corruption between here and the store is
    caught at the store.
    """

    async def _build_headers(
        self,
        host: str,
        headers: Any,
        body: bytes | BinaryIO | None,
        creds: Credentials | None,
    ) -> tuple[dict[str, str], Any]:
        known = headers.get(CONTENT_SHA256) if headers else None
        if known is None or body is None or creds is None:
            return await super()._build_headers(host, headers, body, creds)
        # Without the body, the parent does not hash it.
        built, date = await super()._build_headers(host, headers, None, creds)
        built["Content-Length"] = str(_length(body))
        built[CONTENT_SHA256] = known
        built.pop("Content-MD5", None)
        return built, date

    async def copy_small(self, bucket: str, name: str, source: CopySource) -> None:
        """A server-side copy in one request, for objects under 5 GiB.

        ``copy_object`` first asks for the source's size (a HEAD) to choose
        between one copy and a multipart compose. Tessera's objects are
        partitions of at most 16 MiB, so that round trip is always wasted.
        """
        response = await self._execute(
            "PUT", bucket, object_name=name, headers=source.gen_copy_headers()
        )
        text = await response.text()
        try:
            parse_copy_object(text)  # a 200 may still carry an <Error> instead
        except (ElementTree.ParseError, ValueError) as exc:
            raise StoreError(f"copy to {name}: unexpected answer {text[:200]!r}") from exc


def _server_error(exc: BaseException | None) -> bool:
    """Whether the endpoint answered with a status worth another try."""
    if isinstance(exc, S3Error):
        response = getattr(exc, "response", None)
        return response is not None and response.status in RETRY_STATUSES
    return isinstance(exc, ServerError) and exc.status_code in RETRY_STATUSES


def _length(body: bytes | BinaryIO) -> int:
    if isinstance(body, bytes):
        return len(body)
    at = body.tell()
    end = body.seek(0, io.SEEK_END)
    body.seek(at)
    return end - at


@contextlib.contextmanager
def _translate(what: str) -> Iterator[None]:
    """Turn client and transport errors into the store's own exceptions."""
    try:
        yield
    except S3Error as exc:
        if exc.code in _MISSING:
            raise BlobNotFound(what) from exc
        raise StoreError(f"{what}: S3 error {exc.code}: {exc.message}") from exc
    except (MinioException, aiohttp.ClientError, OSError) as exc:  # OSError covers timeouts
        raise StoreError(f"{what}: {type(exc).__name__}: {exc}") from exc


class S3Store:
    #: A put streams its file (up to SINGLE_PUT; above it, one PIECE_SIZE piece is
    #: held at a time). With 2 at a time, parts queued behind the endpoint.
    parallel_puts = 4
    #: A spooled part is read back and sent: the page cache is the better buffer.
    spool_direct = False

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        *,
        secure: bool = False,
        region: str = "us-east-1",
        staging_bucket: str = "tessera-staging",
        partitions_bucket: str = "tessera-partitions",
        create_buckets: bool = True,
    ) -> None:
        if "://" in endpoint:
            raise ValueError(
                f"S3 endpoint {endpoint!r} must be host:port without a scheme "
                "(HTTPS is chosen with the 'secure' setting)"
            )
        self.endpoint = endpoint
        # A fixed region spares a GetBucketLocation round trip before each request.
        self._client = _Minio(
            endpoint,
            access_key=access_key or None,
            secret_key=secret_key or None,
            secure=secure,
            region=region,
        )
        self._buckets = {"staging": staging_bucket, "partitions": partitions_bucket}
        self._create_buckets = create_buckets

    def _locate(self, key: str) -> tuple[str, str]:
        check_key(key)
        return self._buckets[key.split("/", 1)[0]], key

    async def start(self) -> None:
        # miniopy-async's own session waits five minutes to connect; ours gives up fast.
        # The session must be made inside the running loop, hence here, not in __init__.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT
            ),
        )
        # Not PUT: its body (a file, a BytesIO) is spent by the first attempt, and
        # a resend would send nothing (or fail on the closed file) under the length
        # and hash already signed. PUTs are tried again by ``_again``, whole.
        retry = ExponentialRetry(
            attempts=PUT_ATTEMPTS,
            factor=PUT_BACKOFF,
            statuses=set(RETRY_STATUSES),
            methods={"GET", "HEAD", "DELETE", "POST"},  # POST bodies are bytes
        )
        await self._client.close_session()  # a second start must not leak the first session
        self._client.set_session(RetryClient(client_session=session, retry_options=retry))
        if not self._create_buckets:
            return
        try:
            for bucket in sorted(set(self._buckets.values())):
                await self._ensure_bucket(bucket)
        except BaseException:
            await self.close()  # callers rarely close what failed to start
            raise

    async def _ensure_bucket(self, bucket: str) -> None:
        with _translate(f"bucket {bucket}"):
            if await self._client.bucket_exists(bucket):
                return
            try:
                await self._client.make_bucket(bucket)
            except S3Error as exc:
                # Another node may have created it in the meantime.
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    async def close(self) -> None:
        await self._client.close_session()

    async def ping(self) -> None:
        async def probe() -> None:
            for bucket in sorted(set(self._buckets.values())):
                with _translate(f"bucket {bucket}"):
                    exists = await self._client.bucket_exists(bucket)
                if not exists:
                    raise StoreError(f"bucket {bucket} does not exist")

        try:
            await asyncio.wait_for(probe(), PING_TIMEOUT)
        except TimeoutError as exc:
            raise StoreError(f"S3 endpoint {self.endpoint} did not answer in time") from exc

    async def put_file(
        self, key: str, path: Path, size: int, *, move: bool = False, sha256: bytes | None = None
    ) -> None:
        # Opened per attempt: aiohttp streams the file (no part is held in memory)
        # and closes it when the request ends.
        await self._put(key, size, sha256, lambda: self._open(path, size))

    async def put_bytes(self, key: str, data: bytes, *, sha256: bytes | None = None) -> None:
        async def fresh() -> BinaryIO:
            return io.BytesIO(data)

        await self._put(key, len(data), sha256, fresh)

    async def _put(
        self,
        key: str,
        size: int,
        sha256: bytes | None,
        body: Callable[[], Awaitable[BinaryIO]],
    ) -> None:
        """Store ``size`` bytes from ``body``, made afresh for each attempt
        (``_again``): one PUT, or above SINGLE_PUT a multipart upload."""
        bucket, name = self._locate(key)

        async def attempt() -> None:
            f = await body()
            try:
                if size <= SINGLE_PUT:
                    await self._put_one(bucket, name, f, size, sha256)
                else:
                    await self._upload_parts(bucket, name, size, f)
            finally:
                await asyncio.to_thread(f.close)

        await self._again(f"put {name}", attempt)

    @staticmethod
    async def _open(path: Path, size: int) -> BinaryIO:
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        try:
            actual = (await asyncio.to_thread(os.fstat, f.fileno())).st_size
            if actual != size:
                raise StoreError(f"{path} has {actual} bytes, expected {size}")
        except BaseException:
            await asyncio.to_thread(f.close)
            raise
        return f

    async def _put_one(
        self, bucket: str, name: str, body: BinaryIO, size: int, sha256: bytes | None
    ) -> None:
        """One PUT. Bodies go to aiohttp as file objects, which it streams; raw bytes
        over 1 MiB make it warn about blocking the loop."""
        headers = {CONTENT_SHA256: sha256.hex()} if sha256 is not None else None
        # part_size == length is miniopy-async's single-PUT path.
        await self._client.put_object(bucket, name, body, size, part_size=size, metadata=headers)

    @staticmethod
    async def _again(what: str, attempt: Callable[[], Awaitable[object]]) -> None:
        """Run ``attempt`` (one PUT, its body made afresh) until the endpoint stops
        answering with a server error, at most PUT_ATTEMPTS times. Writes and copies
        are idempotent: the key gets the same bytes whichever attempt lands."""
        for n in range(PUT_ATTEMPTS):
            try:
                with _translate(what):
                    await attempt()
                return
            except StoreError as exc:
                if n + 1 == PUT_ATTEMPTS or not _server_error(exc.__cause__):
                    raise
            await asyncio.sleep(PUT_BACKOFF * 2**n)

    async def _upload_parts(self, bucket: str, name: str, size: int, body: BinaryIO) -> None:
        """A multipart upload of ``size`` bytes from ``body``, holding at most one part
        in memory. miniopy-async aborts the whole upload when a part fails, so a
        retry (``_again``) starts it over."""
        uploader = self._client.multipart_uploader(bucket, name)
        started = False
        try:
            with _translate(f"put {name}"):
                for number, start in enumerate(range(0, size, PIECE_SIZE), start=1):
                    want = min(PIECE_SIZE, size - start)
                    part = await asyncio.to_thread(body.read, want)
                    if len(part) != want:
                        raise StoreError(f"{name}: source ended early, expected {size} bytes")
                    started = True
                    await uploader.upload_part(io.BytesIO(part), number)
                await uploader.complete()
        except BaseException:
            if started:
                # Best effort: an unfinished multipart upload would hold storage.
                with contextlib.suppress(MinioException, aiohttp.ClientError, OSError):
                    await uploader.abort()
            raise

    async def copy(self, src: str, dst: str) -> None:
        src_bucket, src_name = self._locate(src)
        dst_bucket, dst_name = self._locate(dst)
        source = CopySource(src_bucket, src_name)
        await self._again(src, lambda: self._client.copy_small(dst_bucket, dst_name, source))

    async def stat(self, key: str) -> BlobInfo | None:
        bucket, name = self._locate(key)
        try:
            with _translate(key):
                obj = await self._client.stat_object(bucket, name)
        except BlobNotFound:
            return None
        mtime = obj.last_modified.timestamp() if obj.last_modified else 0.0
        return BlobInfo(key=key, size=obj.size or 0, mtime=mtime)

    async def read(
        self, key: str, offset: int = 0, length: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        async for pieces in self.read_pieces(key, offset, length, chunk_size):
            yield b"".join(pieces)

    async def read_pieces(
        self, key: str, offset: int, length: int | None, chunk_size: int
    ) -> AsyncIterator[list[Piece]]:
        bucket, name = self._locate(key)
        check_range(offset, length, chunk_size)
        if length == 0:
            # miniopy-async reads length 0 as "to the end"; only check existence.
            if await self.stat(key) is None:
                raise BlobNotFound(key)
            return
        ranged = bool(offset or length)
        with _translate(key):
            try:
                resp = await self._client.get_object(
                    bucket, name, offset=offset, length=length or 0
                )
            except S3Error as exc:
                if exc.code != "InvalidRange":
                    raise
                return  # offset at or past the end: nothing to read
        try:
            if ranged and resp.status != 206:
                raise StoreError(f"{self.endpoint} ignored the byte range for {key}")
            with _translate(key):
                # Whole chunks of chunk_size (the network hands out smaller pieces),
                # so a download is few large frames rather than many small ones. The
                # pieces are not joined: joining copied every byte once more, into a
                # buffer zeroed first.
                pieces: list[Piece] = []
                filled = 0
                async for piece in resp.content.iter_any():
                    if filled + len(piece) < chunk_size:
                        pieces.append(piece)
                        filled += len(piece)
                        continue
                    view = memoryview(piece)
                    while filled + len(view) >= chunk_size:
                        cut = chunk_size - filled
                        pieces.append(view[:cut])
                        yield pieces
                        pieces, filled, view = [], 0, view[cut:]
                    if view:
                        pieces.append(view)
                        filled = len(view)
                if pieces:
                    yield pieces
        finally:
            # release() reuses the connection when the body was drained, closes it if not.
            resp.release()

    async def delete(self, key: str) -> None:
        bucket, name = self._locate(key)
        try:
            with _translate(key):
                await self._client.remove_object(bucket, name)
        except BlobNotFound:
            pass

    async def delete_many(self, keys: list[str]) -> None:
        by_bucket: dict[str, set[str]] = {}
        for key in keys:
            bucket, name = self._locate(key)
            by_bucket.setdefault(bucket, set()).add(name)
        for bucket, names in by_bucket.items():
            # miniopy-async sends DeleteObjects requests of up to 1000 keys each.
            objects = [DeleteObject(name) for name in sorted(names)]
            with _translate(f"delete in {bucket}"):
                errors = [
                    err
                    async for err in self._client.remove_objects(bucket, objects)
                    if err.code not in _MISSING
                ]
            if errors:
                first = errors[0]
                raise StoreError(
                    f"{len(errors)} objects not deleted from {bucket}, "
                    f"e.g. {first.name}: {first.code} {first.message}"
                )

    async def presign_get(self, key: str, expires: int) -> str | None:
        bucket, name = self._locate(key)
        with _translate(key):
            return await self._client.presigned_get_object(
                bucket, name, expires=timedelta(seconds=expires)
            )

    async def list(self, prefix: str) -> AsyncIterator[BlobInfo]:
        """Objects under ``prefix``, in key order within each area."""
        check_prefix(prefix)
        for area_prefix in area_prefixes(prefix):
            bucket = self._buckets[area_prefix.split("/", 1)[0]]
            with _translate(f"list {area_prefix}"):
                objects = self._client.list_objects(bucket, prefix=area_prefix, recursive=True)
                async for obj in objects:
                    if obj.object_name is None or obj.is_dir:
                        continue
                    mtime = obj.last_modified.timestamp() if obj.last_modified else 0.0
                    yield BlobInfo(key=obj.object_name, size=obj.size or 0, mtime=mtime)
