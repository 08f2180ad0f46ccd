"""pytest plugin: a real S3 endpoint for tests.

``TESSERA_TEST_S3_ENDPOINT`` (with ``..._ACCESS_KEY``, ``..._SECRET_KEY`` and
optionally ``..._SECURE`` and ``..._REGION``) points the tests at an existing
server such as MinIO. Without it, moto's S3 server runs as a separate process:
the store then speaks real HTTP, signatures and all, and no client code is
patched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import pytest
from miniopy_async import Minio
from miniopy_async.deleteobjects import DeleteObject
from miniopy_async.error import MinioException

from server.stores import S3Store

ENV_PREFIX = "TESSERA_TEST_S3_"
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class S3Config:
    endpoint: str  # "host:port"
    access_key: str
    secret_key: str
    secure: bool
    region: str

    def client(self) -> Minio:
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=self.secure,
            region=self.region,
        )

    def store(
        self, buckets: S3Buckets, *, endpoint: str | None = None, create_buckets: bool = True
    ) -> S3Store:
        """The server's store on this endpoint (or on ``endpoint``, a front for it)."""
        return S3Store(
            endpoint or self.endpoint,
            self.access_key,
            self.secret_key,
            secure=self.secure,
            region=self.region,
            staging_bucket=buckets.staging,
            partitions_bucket=buckets.partitions,
            create_buckets=create_buckets,
        )


@dataclass(frozen=True, slots=True)
class S3Buckets:
    staging: str
    partitions: str


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config_from_env() -> S3Config | None:
    endpoint = os.environ.get(ENV_PREFIX + "ENDPOINT", "")
    if not endpoint:
        return None
    secure = os.environ.get(ENV_PREFIX + "SECURE", "").strip().lower() in ("1", "true", "yes")
    return S3Config(
        endpoint=endpoint,
        access_key=os.environ.get(ENV_PREFIX + "ACCESS_KEY", ""),
        secret_key=os.environ.get(ENV_PREFIX + "SECRET_KEY", ""),
        secure=secure,
        region=os.environ.get(ENV_PREFIX + "REGION", "us-east-1"),
    )


def _wait_until_serving(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"moto server exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
            )
        try:
            httpx.get(url, timeout=1.0)
            return  # any HTTP answer means it is serving
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail(f"moto server did not answer within {STARTUP_TIMEOUT}s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def moto_server(log_dir: Path) -> Iterator[S3Config]:
    port = free_port()
    log = log_dir / "moto.log"
    # Its request log goes to a file: an unread pipe would fill and stall the server.
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_serving(proc, f"http://127.0.0.1:{port}/", log)
        yield S3Config(
            endpoint=f"127.0.0.1:{port}",
            access_key="testing",
            secret_key="testing",
            secure=False,
            region="us-east-1",
        )
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def s3_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Config]:
    """The S3 endpoint for this test session: from the environment, else moto."""
    config = _config_from_env()
    if config is not None:
        yield config
        return
    with moto_server(tmp_path_factory.mktemp("moto")) as config:
        yield config


async def _remove_buckets(config: S3Config, buckets: list[str]) -> None:
    client = config.client()
    try:
        for bucket in buckets:
            with contextlib.suppress(MinioException, aiohttp.ClientError, OSError):
                if not await client.bucket_exists(bucket):
                    continue
                names = [
                    obj.object_name
                    async for obj in client.list_objects(bucket, recursive=True)
                    if obj.object_name
                ]
                async for _ in client.remove_objects(bucket, [DeleteObject(n) for n in names]):
                    pass
                await client.remove_bucket(bucket)
    finally:
        await client.close_session()


@pytest.fixture
def s3_buckets(s3_config: S3Config) -> Iterator[S3Buckets]:
    """Fresh bucket names for one test, removed with their objects afterwards.

    The buckets are not created here: that is the store's job (``create_buckets``).
    """
    tag = uuid.uuid4().hex[:12]
    buckets = S3Buckets(staging=f"t-{tag}-staging", partitions=f"t-{tag}-partitions")
    yield buckets
    # Sync teardown runs outside the test's event loop, so a private loop is fine.
    asyncio.run(_remove_buckets(s3_config, [buckets.staging, buckets.partitions]))
