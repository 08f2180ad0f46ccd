"""One contract, two stores: every test runs against LocalStore and against S3Store
talking to a real S3 endpoint (a moto server process, or MinIO from the environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import io
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import httpx
import pytest
import yarl
from aiohttp import web

from server.settings import Settings
from server.stores import (
    BlobInfo,
    BlobNotFound,
    BlobStore,
    LocalStore,
    S3Store,
    StoreError,
    make_store,
)
from server.stores import local as local_module
from server.stores import s3 as s3_module
from server.stores.s3 import MAX_CONNECTIONS as S3_MAX_CONNECTIONS
from server.stores.s3 import PIECE_SIZE, SINGLE_PUT
from tests.support.s3 import S3Buckets, S3Config, free_port

MiB = 1024 * 1024
BAD_KEYS = [
    "../x",
    "staging//a",
    "other/x",
    "staging/a/../../b",
    "",
    "staging",
    "staging/",
    "/staging/a",
    "staging/./a",
    "staging/a\\b",
    "staging/a\x00b",
    "staging/.hidden",
]


@pytest.fixture(params=["local", "s3"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], BlobStore]:
    """Builds the store under test; sync so that it may pull in the S3 fixtures."""
    if request.param == "local":
        return lambda: LocalStore(tmp_path / "blobs")
    config: S3Config = request.getfixturevalue("s3_config")
    buckets: S3Buckets = request.getfixturevalue("s3_buckets")
    return lambda: config.store(buckets)


@pytest.fixture
async def store(new_store: Callable[[], BlobStore]) -> AsyncIterator[BlobStore]:
    s = new_store()
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def read_all(store: BlobStore, key: str, **kwargs: int | None) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, **kwargs)])  # type: ignore[arg-type]


async def list_all(store: BlobStore, prefix: str) -> dict[str, BlobInfo]:
    return {info.key: info async for info in store.list(prefix)}


def local_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("hashed", [False, True], ids=["store-hashes", "caller-hashed"])
@pytest.mark.parametrize(
    "size", [0, 1, 70_000, 5 * MiB + 3, SINGLE_PUT, SINGLE_PUT + 1, 3 * PIECE_SIZE]
)
async def test_put_file_roundtrip(
    store: BlobStore, tmp_path: Path, size: int, hashed: bool
) -> None:
    data = os.urandom(size)
    src = tmp_path / "upload.bin"
    src.write_bytes(data)
    key = f"staging/u1/up1/{size}"

    await store.put_file(key, src, size, sha256=hashlib.sha256(data).digest() if hashed else None)

    assert src.read_bytes() == data, "the source must be left in place"
    info = await store.stat(key)
    assert info is not None
    assert (info.key, info.size) == (key, size)
    assert abs(info.mtime - time.time()) < 120
    chunk_size = 64 * 1024
    chunks = [c async for c in store.read(key, chunk_size=chunk_size)]
    assert all(0 < len(c) <= chunk_size for c in chunks)
    assert b"".join(chunks) == data


async def test_read_ranges(store: BlobStore) -> None:
    data = os.urandom(10_000)
    key = "partitions/u1/p1"
    await store.put_bytes(key, data)

    for offset, length in [
        (0, 100),
        (0, None),
        (5000, 1234),
        (123, None),
        (9900, None),
        (9990, 100),  # runs past the end: clipped
        (9999, 1),
        (0, 0),
        (5000, 0),
        (10_000, None),  # at the end
        (20_000, 10),  # past the end
    ]:
        end = None if length is None else offset + length
        got = await read_all(store, key, offset=offset, length=length, chunk_size=700)
        assert got == data[offset:end], (offset, length)


@pytest.mark.parametrize("size", [0, 1, 70_000, 5 * MiB + 3])
async def test_read_pieces_gives_whole_chunks_in_pieces(store: BlobStore, size: int) -> None:
    data = os.urandom(size)
    key = f"partitions/u1/pieces{size}"
    await store.put_bytes(key, data)
    for chunk_size in [64 * 1024, 1 << 20, 3]:
        for offset, length in [(0, None), (123, None), (5000, 70_000), (size, None)]:
            if chunk_size == 3 and (length or size) > 70_000:
                continue  # a million three-byte chunks prove nothing more
            got = [c async for c in store.read_pieces(key, offset, length, chunk_size)]
            assert all(c and all(isinstance(p, bytes | memoryview) and p for p in c) for c in got)
            sizes = [sum(map(len, c)) for c in got]
            assert all(n == chunk_size for n in sizes[:-1]), "whole chunks, but the last"
            assert all(0 < n <= chunk_size for n in sizes)
            end = None if length is None else offset + length
            joined = b"".join(bytes(p) for c in got for p in c)
            assert joined == data[offset:end], (chunk_size, offset, length)


async def test_read_range_of_empty_object(store: BlobStore) -> None:
    await store.put_bytes("staging/u/e/0", b"")
    assert await read_all(store, "staging/u/e/0") == b""
    assert await read_all(store, "staging/u/e/0", offset=0, length=10) == b""
    assert await read_all(store, "staging/u/e/0", offset=3) == b""


async def test_read_rejects_negative_range(store: BlobStore) -> None:
    await store.put_bytes("staging/u/r/0", b"abc")
    with pytest.raises(ValueError):
        await read_all(store, "staging/u/r/0", offset=-1)
    with pytest.raises(ValueError):
        await read_all(store, "staging/u/r/0", length=-1)


async def test_put_bytes(store: BlobStore) -> None:
    await store.put_bytes("partitions/u1/a", b"hello", sha256=hashlib.sha256(b"hello").digest())
    await store.put_bytes("partitions/u1/empty", b"")

    assert await read_all(store, "partitions/u1/a") == b"hello"
    assert await read_all(store, "partitions/u1/empty") == b""
    a = await store.stat("partitions/u1/a")
    empty = await store.stat("partitions/u1/empty")
    assert a is not None and a.size == 5
    assert empty is not None and empty.size == 0


async def test_copy_across_areas_survives_source_delete(store: BlobStore) -> None:
    data = os.urandom(300_000)
    await store.put_bytes("staging/u1/up1/0", data)

    await store.copy("staging/u1/up1/0", "partitions/u1/p9")
    await store.delete("staging/u1/up1/0")

    assert await store.stat("staging/u1/up1/0") is None
    assert await read_all(store, "partitions/u1/p9") == data
    info = await store.stat("partitions/u1/p9")
    assert info is not None and info.size == len(data)


async def test_copy_missing_raises(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await store.copy("staging/u1/nope/0", "partitions/u1/p1")
    assert await store.stat("partitions/u1/p1") is None


async def test_read_missing_raises(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await read_all(store, "partitions/u1/nope")
    with pytest.raises(BlobNotFound):
        await read_all(store, "partitions/u1/nope", offset=10, length=5)
    with pytest.raises(BlobNotFound):
        await read_all(store, "partitions/u1/nope", length=0)


async def test_stat_missing_is_none(store: BlobStore) -> None:
    assert await store.stat("partitions/u1/nope") is None
    await store.put_bytes("staging/u1/up1/0", b"x")
    assert await store.stat("staging/u1/up1") is None, "a 'directory' is not an object"


async def test_delete(store: BlobStore) -> None:
    await store.delete("staging/u1/nope/0")  # missing: not an error
    await store.put_bytes("staging/u1/up1/0", b"x")
    await store.delete("staging/u1/up1/0")
    assert await store.stat("staging/u1/up1/0") is None
    await store.delete("staging/u1/up1/0")


async def test_delete_many(store: BlobStore) -> None:
    keys = [f"staging/u1/up1/{i}" for i in range(4)] + ["partitions/u1/a", "partitions/u1/b"]
    for key in keys:
        await store.put_bytes(key, key.encode())

    await store.delete_many([])
    await store.delete_many(
        ["staging/u1/up1/0", "staging/u1/up1/2", "partitions/u1/a", "partitions/u1/missing"]
    )

    remaining = await list_all(store, "")
    assert sorted(remaining) == ["partitions/u1/b", "staging/u1/up1/1", "staging/u1/up1/3"]


async def test_list_prefixes(store: BlobStore) -> None:
    contents = {
        "staging/u1/up1/0": b"a",
        "staging/u1/up1/1": b"bb",
        "staging/u1/up2/0": b"ccc",
        "staging/u2/up3/0": b"dddd",
        "partitions/u1/p1": b"eeeee",
    }
    for key, data in contents.items():
        await store.put_bytes(key, data)

    def expect(*keys: str) -> list[str]:
        return sorted(keys)

    u1 = await list_all(store, "staging/u1/")
    assert sorted(u1) == expect("staging/u1/up1/0", "staging/u1/up1/1", "staging/u1/up2/0")
    assert {k: i.size for k, i in u1.items()} == {k: len(contents[k]) for k in u1}
    assert all(abs(i.mtime - time.time()) < 120 for i in u1.values())

    assert sorted(await list_all(store, "staging/u1/up1/")) == expect(
        "staging/u1/up1/0", "staging/u1/up1/1"
    )
    assert sorted(await list_all(store, "staging/u1/up")) == sorted(u1)
    assert sorted(await list_all(store, "partitions/")) == ["partitions/u1/p1"]
    assert sorted(await list_all(store, "staging")) == expect(
        *(k for k in contents if k.startswith("staging/"))
    )
    assert sorted(await list_all(store, "")) == sorted(contents)
    assert await list_all(store, "staging/u9/") == {}
    assert list(await list_all(store, "partitions/u1/p1")) == ["partitions/u1/p1"]


@pytest.mark.parametrize("prefix", ["staging//", "staging/../", "other/x", "staging/a\\b"])
async def test_list_rejects_bad_prefixes(store: BlobStore, prefix: str) -> None:
    with pytest.raises(ValueError):
        await list_all(store, prefix)


async def test_overwrite_replaces_atomically(store: BlobStore) -> None:
    old, new = os.urandom(2 * MiB), os.urandom(3 * MiB)
    key = "partitions/u1/p1"
    await store.put_bytes(key, old)

    # Readers racing the overwrite must see one whole version, never a mix.
    results = await asyncio.gather(
        *(read_all(store, key, chunk_size=256 * 1024) for _ in range(4)),
        store.put_bytes(key, new),
        *(read_all(store, key, chunk_size=256 * 1024) for _ in range(4)),
    )
    reads = [r for r in results if r is not None]
    assert reads and all(r in (old, new) for r in reads)
    assert await read_all(store, key) == new
    info = await store.stat(key)
    assert info is not None and info.size == len(new)


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_invalid_keys_rejected(store: BlobStore, tmp_path: Path, key: str) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    good = "staging/u1/up1/0"
    attempts = [
        store.put_bytes(key, b"x"),
        store.put_file(key, src, 1),
        store.stat(key),
        read_all(store, key),
        store.delete(key),
        store.delete_many([good, key]),
        store.copy(key, good),
        store.copy(good, key),
        store.presign_get(key, 60),
    ]
    for attempt in attempts:
        with pytest.raises(ValueError):
            await attempt
    assert await list_all(store, "") == {}


@pytest.mark.parametrize("delta", [-1, 1])
async def test_put_file_wrong_size(store: BlobStore, tmp_path: Path, delta: int) -> None:
    data = os.urandom(1000)
    src = tmp_path / "upload.bin"
    src.write_bytes(data)

    with pytest.raises(StoreError):
        await store.put_file("staging/u1/up1/0", src, len(data) + delta)

    assert await store.stat("staging/u1/up1/0") is None
    assert await list_all(store, "") == {}
    if isinstance(store, LocalStore):
        assert local_files(store.root) == []
        assert not (store.root / "staging/u1/up1").exists()  # a user's directory may stay
    assert src.read_bytes() == data


async def test_put_file_missing_source(store: BlobStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        await store.put_file("staging/u1/up1/0", tmp_path / "nope", 10)
    assert await store.stat("staging/u1/up1/0") is None
    if isinstance(store, LocalStore):
        assert local_files(store.root) == []
        assert not (store.root / "staging/u1/up1").exists()


async def test_failed_overwrite_keeps_old_object(store: BlobStore, tmp_path: Path) -> None:
    await store.put_bytes("partitions/u1/p1", b"old")
    src = tmp_path / "upload.bin"
    src.write_bytes(b"new!")
    with pytest.raises(StoreError):
        await store.put_file("partitions/u1/p1", src, 5)
    assert await read_all(store, "partitions/u1/p1") == b"old"


async def test_presign_get(store: BlobStore) -> None:
    data = os.urandom(4096)
    await store.put_bytes("partitions/u1/p1", data)

    url = await store.presign_get("partitions/u1/p1", 60)

    if isinstance(store, LocalStore):
        assert url is None
        return
    assert url is not None
    async with httpx.AsyncClient() as client:
        resp = await client.get(url)
        assert resp.status_code == 200
        assert resp.content == data
        unsigned = await client.get(url.split("?", 1)[0])
        assert unsigned.status_code == 403, "the signature is what grants access"


async def test_ping(store: BlobStore) -> None:
    await store.ping()


async def test_read_early_exit_releases(store: BlobStore) -> None:
    """Abandoning a stream must not leak: afterwards the store still works."""
    data = os.urandom(2 * MiB)
    await store.put_bytes("partitions/u1/p1", data)
    for _ in range(S3_MAX_CONNECTIONS + 6):  # more than the S3 connection pool holds
        stream = store.read("partitions/u1/p1", chunk_size=1024)
        first = await anext(stream)  # type: ignore[call-overload]
        assert first == data[:1024]
        await stream.aclose()  # type: ignore[attr-defined]
    # A half-read connection put back into the pool would corrupt this read.
    assert await read_all(store, "partitions/u1/p1", offset=7) == data[7:]


async def test_s3_bucket_creation_and_missing_bucket(
    s3_config: S3Config, s3_buckets: S3Buckets
) -> None:
    def build(create: bool) -> S3Store:
        return s3_config.store(s3_buckets, create_buckets=create)

    lazy = build(create=False)
    await lazy.start()
    try:
        with pytest.raises(StoreError, match="does not exist"):
            await lazy.ping()
    finally:
        await lazy.close()

    for _ in range(2):  # creating twice is harmless
        eager = build(create=True)
        await eager.start()
        try:
            await eager.ping()
        finally:
            await eager.close()


SLOW_DOWN = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    "<Message>Please reduce your request rate.</Message><RequestId>1</RequestId></Error>"
)


@contextlib.asynccontextmanager
async def _flaky_front(
    config: S3Config, fail_puts: int
) -> AsyncIterator[tuple[str, list[tuple[int, int]]]]:
    """A real HTTP front for the S3 endpoint: it answers the first ``fail_puts`` PUTs
    with 503 SlowDown (after reading their bodies, as S3 does) and passes every
    other request through unchanged (Host too, so signatures still match). Yields
    its address and, per PUT it saw, the status it answered and the body length
    it received."""
    puts: list[tuple[int, int]] = []
    scheme = "https" if config.secure else "http"
    hop = {"content-length", "transfer-encoding", "connection", "keep-alive"}
    async with aiohttp.ClientSession(auto_decompress=False) as upstream:

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            if request.method == "PUT" and len(puts) < fail_puts:
                puts.append((503, len(body)))
                return web.Response(status=503, text=SLOW_DOWN, content_type="application/xml")
            url = yarl.URL(f"{scheme}://{config.endpoint}{request.raw_path}", encoded=True)
            headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
            async with upstream.request(request.method, url, headers=headers, data=body) as r:
                data = await r.read()
                if request.method == "PUT":
                    puts.append((r.status, len(body)))
                back = {k: v for k, v in r.headers.items() if k.lower() not in hop}
                return web.Response(status=r.status, body=data, headers=back)

        app = web.Application(client_max_size=64 * MiB)
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            yield f"127.0.0.1:{port}", puts
        finally:
            await runner.cleanup()


@pytest.mark.parametrize("how", ["file", "bytes", "copy", "multipart"])
async def test_s3_put_answered_503_is_sent_again_whole(
    s3_config: S3Config, s3_buckets: S3Buckets, tmp_path: Path, how: str
) -> None:
    """A PUT the store refuses with a server error (503 SlowDown, 500) is sent again,
    body and all. The HTTP client's own retry resent a spent body: a file closed by
    the first attempt, or a BytesIO at its end, sending nothing for a signed length."""

    def build(endpoint: str, create: bool) -> S3Store:
        return s3_config.store(s3_buckets, endpoint=endpoint, create_buckets=create)

    direct = build(s3_config.endpoint, True)
    await direct.start()
    data = os.urandom(SINGLE_PUT + 5 if how == "multipart" else 3 * MiB + 5)
    src = tmp_path / "part"
    src.write_bytes(data)
    digest = hashlib.sha256(data).digest()
    if how == "copy":
        await direct.put_bytes("staging/u1/up/0", data)
    try:
        async with _flaky_front(s3_config, fail_puts=2) as (endpoint, puts):
            flaky = build(endpoint, False)
            await flaky.start()
            try:
                began = time.monotonic()
                if how in ("file", "multipart"):
                    await flaky.put_file("partitions/u1/9", src, len(data), sha256=digest)
                elif how == "bytes":
                    await flaky.put_bytes("partitions/u1/9", data, sha256=digest)
                else:
                    await flaky.copy("staging/u1/up/0", "partitions/u1/9")
                assert time.monotonic() - began < 10, "a spent body stalled a retry"
            finally:
                await flaky.close()
        body = {"copy": 0, "multipart": PIECE_SIZE}.get(how, len(data))
        expected = [(503, body), (503, body), (200, body)]  # each try with the whole body
        # A multipart upload is started over: miniopy-async aborts it when a part fails.
        # Its pieces are PIECE_SIZE, the last one what is left: one piece in memory.
        rest = [(200, PIECE_SIZE), (200, 5)] if how == "multipart" else []
        assert puts == expected + rest
        assert await read_all(direct, "partitions/u1/9") == data

        async with _flaky_front(s3_config, fail_puts=100) as (endpoint, puts):
            flaky = build(endpoint, False)
            await flaky.start()
            try:
                with pytest.raises(StoreError, match="SlowDown"):
                    await flaky.put_file("partitions/u1/10", src, len(data), sha256=digest)
            finally:
                await flaky.close()
        assert len(puts) == s3_module.PUT_ATTEMPTS
    finally:
        await direct.close()


async def test_s3_ping_dead_endpoint_fails_fast() -> None:
    dead = S3Store(f"127.0.0.1:{free_port()}", "testing", "testing", create_buckets=False)
    await dead.start()
    try:
        began = time.monotonic()
        with pytest.raises(StoreError) as caught:
            await dead.ping()
        assert time.monotonic() - began < 5
        assert caught.value.__cause__ is not None
        with pytest.raises(StoreError):
            await dead.put_bytes("staging/u/x/0", b"x")
    finally:
        await dead.close()

    eager = S3Store(f"127.0.0.1:{free_port()}", "testing", "testing")
    began = time.monotonic()
    with pytest.raises(StoreError):
        await eager.start()
    assert time.monotonic() - began < 5
    await eager.close()


async def test_s3_ping_silent_endpoint_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts connections but never answers must not hang /readyz."""
    monkeypatch.setattr(s3_module, "PING_TIMEOUT", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes handshakes; nobody ever replies
        port = silent.getsockname()[1]
        store = S3Store(f"127.0.0.1:{port}", "testing", "testing", create_buckets=False)
        await store.start()
        try:
            began = time.monotonic()
            with pytest.raises(StoreError, match="did not answer"):
                await store.ping()
            assert time.monotonic() - began < 3
        finally:
            await store.close()


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("body", ["bytesio", "file"])
async def test_s3_signs_with_the_callers_sha256_without_reading_the_body(
    tmp_path: Path, secure: bool, body: str
) -> None:
    """miniopy-async hashes each body before sending it (SHA-256 over HTTP, MD5 over
    HTTPS); a caller's verified digest replaces that pass, and is what gets signed."""
    client = s3_module._Minio("s3.example:9000", "ak", "sk", secure=secure)
    data = os.urandom(300_000)
    digest = hashlib.sha256(b"not the data, to show it is taken as given").hexdigest()
    path = tmp_path / "body"
    path.write_bytes(data)
    with path.open("rb") if body == "file" else io.BytesIO(data) as f:
        creds = await client._provider.retrieve()  # type: ignore[union-attr]
        headers, _ = await client._build_headers(
            "s3.example:9000", {s3_module.CONTENT_SHA256: digest, "x-other": "1"}, f, creds
        )
        assert f.tell() == 0, "the body was read"
    assert headers[s3_module.CONTENT_SHA256] == digest
    assert headers["Content-Length"] == str(len(data))
    assert "Content-MD5" not in headers
    assert headers["x-other"] == "1"

    # Without a digest, miniopy-async's own behaviour is unchanged.
    plain, _ = await client._build_headers("s3.example:9000", {}, io.BytesIO(data), creds)
    if secure:
        assert plain[s3_module.CONTENT_SHA256] == "UNSIGNED-PAYLOAD"
        assert "Content-MD5" in plain
    else:
        assert plain[s3_module.CONTENT_SHA256] == hashlib.sha256(data).hexdigest()
    await client.close_session()


def test_s3_endpoint_with_scheme_rejected() -> None:
    with pytest.raises(ValueError, match="without a scheme"):
        S3Store("http://127.0.0.1:9000", "a", "b")


async def test_local_leaves_no_temp_files_and_prunes_directories_below_users(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path / "blobs")
    await store.start()
    src = tmp_path / "src"
    src.write_bytes(b"payload")

    await store.put_file("staging/u1/up1/0", src, 7)
    await store.put_bytes("staging/u1/up1/1", b"more")
    await store.put_bytes("staging/u1/up1/1", b"overwritten")
    await store.copy("staging/u1/up1/0", "partitions/u1/p1")
    with pytest.raises(StoreError):
        await store.put_file("staging/u1/up1/2", src, 8)
    await store.ping()

    names = [p.name for p in store.root.rglob("*")]
    assert not [n for n in names if n.startswith(".")], names
    assert local_files(store.root) == ["partitions/u1/p1", "staging/u1/up1/0", "staging/u1/up1/1"]

    await store.delete("staging/u1/up1/0")
    assert (store.root / "staging/u1/up1").is_dir(), "still holds up1/1"
    await store.delete_many(["staging/u1/up1/1"])
    assert not (store.root / "staging/u1/up1").exists()
    # The first level (a user's directory) stays: see LocalStore._prune.
    assert sorted(p.name for p in (store.root / "staging").iterdir()) == ["u1"]
    await store.delete("partitions/u1/p1")
    assert list((store.root / "partitions" / "u1").iterdir()) == []


async def test_local_copy_has_fresh_mtime(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "blobs")
    await store.start()
    await store.put_bytes("staging/u1/up1/0", b"x")
    old = time.time() - 86_400
    os.utime(store.root / "staging/u1/up1/0", (old, old))

    await store.copy("staging/u1/up1/0", "partitions/u1/p1")

    info = await store.stat("partitions/u1/p1")
    assert info is not None and abs(info.mtime - time.time()) < 60


async def test_local_list_skips_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "blobs")
    await store.start()
    await store.put_bytes("staging/u1/up1/0", b"x")
    (store.root / "staging/u1/up1/.0.deadbeef.tmp").write_bytes(b"half")
    assert sorted(await list_all(store, "staging/")) == ["staging/u1/up1/0"]


async def test_local_ping_fails_without_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "never-started")
    with pytest.raises(StoreError):
        await store.ping()


def test_make_store(tmp_path: Path) -> None:
    local = make_store(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalStore)
    assert local.root == tmp_path / "blobs"
    assert (local._group is not None) == (local_module._syncfs is not None)
    alone = make_store(Settings(data_dir=tmp_path, local_group_sync=False))
    assert isinstance(alone, LocalStore) and alone._group is None
    remote = make_store(Settings(data_dir=tmp_path, s3_endpoint="127.0.0.1:9"))
    assert isinstance(remote, S3Store)


async def test_put_file_with_move_stores_the_bytes_and_checks_the_size(store, tmp_path):
    data = os.urandom(70_000)
    src = tmp_path / "spool.part"
    src.write_bytes(data)
    await store.put_file("staging/7/up/0", src, len(data), move=True)
    assert b"".join([c async for c in store.read("staging/7/up/0")]) == data
    if isinstance(store, LocalStore):
        assert not src.exists()  # renamed into place, not copied
    wrong = tmp_path / "wrong.part"
    wrong.write_bytes(b"short")
    with pytest.raises(StoreError):
        await store.put_file("staging/7/up/1", wrong, 6, move=True)
    assert await store.stat("staging/7/up/1") is None


@pytest.mark.parametrize("how", ["move", "copy", "link", "bytes"])
async def test_local_put_meets_a_prune_of_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Regression (fuzz seed 777): a part was answered ``unavailable`` ("File exists")
    while the deletion of its upload's other parts pruned their directory.

    ``Path.mkdir(parents=True, exist_ok=True)`` is not atomic: it gets EEXIST from
    ``os.mkdir`` and then checks ``is_dir()``; a prune in between makes it raise
    FileExistsError. The store must make the directory again, for every way in
    (a spool file moved in, a file copied, a partition linked at commit, bytes).
    The deletion is put exactly in that window. (Small bytes under group sync make
    no directory while it exists: ``test_local_small_put_into_a_pruned_directory``.)"""
    store = LocalStore(tmp_path / "blobs", group_sync=False)
    await store.start()
    area = "partitions" if how == "link" else "staging"
    directory = store.root / area / "1" / "u"
    await store.put_bytes(f"{area}/1/u/0", b"part 0")
    await store.put_bytes("staging/9/src/0", b"part 1")
    spool = tmp_path / "part"
    spool.write_bytes(b"part 1")
    is_dir = Path.is_dir
    pruned: list[Path] = []

    def is_dir_after_a_prune(path: Path) -> bool:
        if path == directory and not pruned:  # the concurrent deletion of part 0
            (directory / "0").unlink()
            directory.rmdir()
            pruned.append(path)
        return is_dir(path)

    monkeypatch.setattr(Path, "is_dir", is_dir_after_a_prune)
    key = f"{area}/1/u/1"
    if how == "move":
        await store.put_file(key, spool, 6, move=True)
    elif how == "copy":
        await store.put_file(key, spool, 6)
    elif how == "link":
        await store.copy("staging/9/src/0", key)
    else:
        await store.put_bytes(key, b"part 1")
    monkeypatch.setattr(Path, "is_dir", is_dir)
    assert pruned, "the interleaving did not happen"
    assert b"".join([piece async for piece in store.read(key)]) == b"part 1"
    assert await store.stat(f"{area}/1/u/0") is None


# ------------------------------------------------------------ group sync


def _counting_syncfs(calls: list[int], fail: bool = False) -> Callable[[int], int]:
    """A stand-in for syncfs(2) that really syncs (os.sync) and counts its calls."""

    def syncfs(fd: int) -> int:
        calls.append(fd)
        if fail:
            ctypes.set_errno(errno.EIO)
            return -1
        os.sync()
        return 0

    return syncfs


async def _store_counting_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[LocalStore, list[int]]:
    """A started LocalStore with group sync whose syncfs calls are counted."""
    store = LocalStore(tmp_path / "blobs")
    await store.start()
    calls: list[int] = []
    assert store._group is not None
    monkeypatch.setattr(store._group, "_syncfs", _counting_syncfs(calls))
    return store, calls


@pytest.mark.skipif(local_module._syncfs is None, reason="syncfs(2) is Linux-only")
async def test_small_puts_at_once_share_syncs(tmp_path: Path, monkeypatch) -> None:
    store, calls = await _store_counting_syncs(tmp_path, monkeypatch)
    blobs = {f"partitions/{i % 3}/{i}": os.urandom(100 + i) for i in range(60)}
    await asyncio.gather(*(store.put_bytes(k, v) for k, v in blobs.items()))
    for key, data in blobs.items():
        assert b"".join([c async for c in store.read(key)]) == data
    assert 1 <= len(calls) < len(blobs)  # batched, and never without a sync
    names = [p.name for p in store.root.rglob("*")]
    assert not [n for n in names if n.startswith(".")], "no temp files left"
    # Larger than a small put: fsynced alone, not batched.
    calls.clear()
    await store.put_bytes("partitions/0/big", os.urandom(store._group.MAX_BYTES + 1))
    assert calls == []


@pytest.mark.skipif(local_module._syncfs is None, reason="syncfs(2) is Linux-only")
async def test_a_failed_sync_fails_every_put_of_its_batch(tmp_path: Path, monkeypatch) -> None:
    store = LocalStore(tmp_path / "blobs")
    await store.start()
    calls: list[int] = []
    assert store._group is not None
    monkeypatch.setattr(store._group, "_syncfs", _counting_syncfs(calls, fail=True))
    results = await asyncio.gather(
        *(store.put_bytes(f"staging/1/u{i}/0", b"x") for i in range(10)),
        return_exceptions=True,
    )
    assert all(isinstance(r, StoreError) and "syncfs" in str(r) for r in results), results
    monkeypatch.setattr(store._group, "_syncfs", _counting_syncfs(calls))
    await store.put_bytes("staging/1/later/0", b"fine")  # the batcher carries on
    assert b"".join([c async for c in store.read("staging/1/later/0")]) == b"fine"


@pytest.mark.skipif(local_module._syncfs is None, reason="syncfs(2) is Linux-only")
async def test_a_cancelled_small_put_leaves_the_others_alone(tmp_path: Path, monkeypatch) -> None:
    store = LocalStore(tmp_path / "blobs")
    await store.start()
    assert store._group is not None
    gate = threading.Event()
    real = local_module._write_atomic

    def slow_write(dest: Path, fill: Callable[..., object], *, sync: bool = True) -> None:
        gate.wait(5)
        real(dest, fill, sync=sync)

    monkeypatch.setattr(local_module, "_write_atomic", slow_write)
    tasks = [asyncio.create_task(store.put_bytes(f"staging/2/u{i}/0", b"y")) for i in range(5)]
    await asyncio.sleep(0.05)
    tasks[0].cancel()
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [None] * 4
    await store.put_bytes("staging/2/after/0", b"z")
    assert await store.stat("staging/2/after/0") is not None


@pytest.mark.parametrize("group_sync", [True, False])
async def test_local_put_whose_new_parent_is_pruned_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group_sync: bool
) -> None:
    """Regression (``test_writers_race_devices_flap_everyone_converges``): ``mkdir -p``
    made ``staging/<user>``, another upload's clean-up pruned it (empty) before the
    leaf was made, and the leaf's ``mkdir`` raised ENOENT: the part was answered
    ``unavailable``. The store makes the directories again."""
    store = LocalStore(tmp_path / "blobs", group_sync=group_sync)
    await store.start()
    mkdir = Path.mkdir
    pruned: list[Path] = []

    def mkdir_then_pruned(path: Path, *args: object, **kw: object) -> None:
        mkdir(path, *args, **kw)  # type: ignore[arg-type]
        if path.name == "5" and not pruned:  # staging/5 made, then pruned at once
            path.rmdir()
            pruned.append(path)

    monkeypatch.setattr(Path, "mkdir", mkdir_then_pruned)
    await store.put_bytes("staging/5/up/0", b"part 0")
    monkeypatch.undo()
    assert pruned, "the interleaving did not happen"
    assert b"".join([c async for c in store.read("staging/5/up/0")]) == b"part 0"


@pytest.mark.skipif(local_module._syncfs is None, reason="syncfs(2) is Linux-only")
async def test_local_small_put_into_a_pruned_directory(tmp_path: Path, monkeypatch) -> None:
    """A small put opens its temp file without making the directory first; when a
    prune removed the directory, it takes the general path, which makes it."""
    store = LocalStore(tmp_path / "blobs")
    await store.start()
    await store.put_bytes("partitions/4/a", b"first")
    (store.root / "partitions/4/a").unlink()
    (store.root / "partitions/4").rmdir()  # the janitor pruned it
    await store.put_bytes("partitions/4/b", b"second")
    assert b"".join([c async for c in store.read("partitions/4/b")]) == b"second"

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "rename failed")

    monkeypatch.setattr(local_module.os, "replace", failing_replace)
    with pytest.raises(StoreError):
        await store.put_bytes("partitions/4/c", b"third")
    monkeypatch.undo()
    assert sorted(p.name for p in (store.root / "partitions/4").iterdir()) == ["b"]


@pytest.mark.skipif(local_module._syncfs is None, reason="syncfs(2) is Linux-only")
async def test_copies_at_once_share_syncs_and_keep_the_bytes(tmp_path: Path, monkeypatch) -> None:
    """A commit's copies are hard links made in the group's thread, made durable by
    one syncfs per batch instead of an fsync of the directory each."""
    store, calls = await _store_counting_syncs(tmp_path, monkeypatch)
    blobs = {f"staging/{i % 3}/up{i}.0": os.urandom(100 + i) for i in range(40)}
    await asyncio.gather(*(store.put_bytes(k, v) for k, v in blobs.items()))
    calls.clear()
    fsyncs: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(local_module.os, "fsync", lambda fd: (fsyncs.append(fd), fsync(fd)))
    copies = {key: f"partitions/{key.split('/')[1]}/{n}" for n, key in enumerate(blobs)}
    await asyncio.gather(*(store.copy(src, dst) for src, dst in copies.items()))
    assert 1 <= len(calls) < len(copies) and fsyncs == []
    await store.delete_many(list(blobs))
    for src, dst in copies.items():
        assert await read_all(store, dst) == blobs[src]
        info = await store.stat(dst)
        assert info is not None and abs(info.mtime - time.time()) < 60
    names = [p.name for p in store.root.rglob("*")]
    assert not [n for n in names if n.startswith(".")], "no temp files left"


@pytest.mark.skipif(local_module._syncfs is None, reason="syncfs(2) is Linux-only")
async def test_a_batch_is_written_while_the_one_before_syncs(tmp_path: Path, monkeypatch) -> None:
    """The next batch's operations overlap the sync of the one before; each put is
    answered only after a sync that followed its own write."""
    store = LocalStore(tmp_path / "blobs")
    await store.start()
    assert store._group is not None
    syncing, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def first_sync_waits(fd: int) -> int:
        calls.append(fd)
        if len(calls) == 1:
            syncing.set()
            release.wait(10)  # a disk slow to flush the first batch
        os.sync()
        return 0

    monkeypatch.setattr(store._group, "_syncfs", first_sync_waits)
    first = asyncio.create_task(store.put_bytes("partitions/1/a", b"first"))
    assert await asyncio.to_thread(syncing.wait, 10)
    await asyncio.wait_for(store.put_bytes("partitions/1/b", b"second"), 10)
    assert not first.done(), "answered before its own sync returned"
    release.set()
    await asyncio.wait_for(first, 10)
    assert len(calls) == 2
    assert await read_all(store, "partitions/1/a") == b"first"
    assert await read_all(store, "partitions/1/b") == b"second"


@pytest.mark.skipif(local_module._syncfs is None, reason="syncfs(2) is Linux-only")
async def test_a_closed_store_still_finishes_small_puts(tmp_path: Path, monkeypatch) -> None:
    """Closing stops the group's threads; a put that comes late still gets a sync."""
    store, calls = await _store_counting_syncs(tmp_path, monkeypatch)
    await store.put_bytes("partitions/2/a", b"before")
    await store.close()
    await asyncio.gather(*(store.put_bytes(f"partitions/2/{i}", b"after") for i in range(5)))
    assert len(calls) >= 2
    for i in range(5):
        assert await read_all(store, f"partitions/2/{i}") == b"after"


@pytest.mark.parametrize("group_sync", [True, False])
async def test_local_copy_where_links_are_impossible_copies_the_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group_sync: bool
) -> None:
    """Another filesystem (EXDEV), or one without hard links: the bytes are copied."""
    store = LocalStore(tmp_path / "blobs", group_sync=group_sync)
    await store.start()
    data = os.urandom(5000)
    await store.put_bytes("staging/3/up.0", data)
    await store.put_bytes("partitions/3/1", b"makes the directory")

    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(local_module.os, "link", no_links)
    await store.copy("staging/3/up.0", "partitions/3/2")  # the directory exists
    await store.copy("staging/3/up.0", "partitions/4/2")  # it does not
    monkeypatch.undo()
    await store.delete("staging/3/up.0")
    assert await read_all(store, "partitions/3/2") == data
    assert await read_all(store, "partitions/4/2") == data
    with pytest.raises(BlobNotFound):
        await store.copy("staging/3/up.0", "partitions/3/3")


async def test_without_group_sync_small_puts_fsync_alone(tmp_path: Path, monkeypatch) -> None:
    store = LocalStore(tmp_path / "blobs", group_sync=False)
    await store.start()
    assert store._group is None
    synced: list[int] = []
    fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        fsync(fd)

    monkeypatch.setattr(local_module.os, "fsync", counting_fsync)
    await store.put_bytes("partitions/3/a", b"alone")
    assert len(synced) == 2  # the file and its directory
