"""Shared fixtures: a real PostgreSQL, a real S3 endpoint, real servers on real ports."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from server.embedded import start_embedded_postgres, stop_embedded_postgres
from server.migrate import migrate
from tests.support.client import SyncClient, register_login
from tests.support.server import RunningServer, test_settings

pytest_plugins = ["tests.support.s3"]

if TYPE_CHECKING:
    from tests.support.s3 import S3Buckets, S3Config


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """TESSERA_TEST_DATABASE_URL, or a private embedded PostgreSQL for this run.

    Either way the run gets a database of its own, migrated once. The embedded
    one lives outside pytest's numbered temp dirs, which a concurrent pytest
    run may prune.
    """
    pg_dir = Path(tempfile.mkdtemp(prefix="tessera-test-pg-"))
    base = os.environ.get("TESSERA_TEST_DATABASE_URL") or start_embedded_postgres(pg_dir)
    name = f"tessera_test_{uuid.uuid4().hex[:10]}"

    async def create() -> str:
        admin = await asyncpg.connect(base)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        url = _with_database(base, name)
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        return url

    yield asyncio.run(create())
    if not os.environ.get("TESSERA_TEST_DATABASE_URL"):
        stop_embedded_postgres(pg_dir)
        shutil.rmtree(pg_dir, ignore_errors=True)


def _with_database(url: str, name: str) -> str:
    """Swap the database name of a postgresql:// URL (keeping ?host=... for sockets)."""
    head, sep, query = url.partition("?")
    scheme, _, rest = head.partition("://")
    authority, _, _ = rest.partition("/")
    return f"{scheme}://{authority}/{name}{sep}{query}"


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


ServerFactory = Callable[..., RunningServer]


@pytest.fixture
def make_server(
    tmp_path: Path, database_url: str, s3_config: S3Config, s3_buckets: S3Buckets
) -> Iterator[ServerFactory]:
    """Start servers with settings overrides; ``store="s3"`` uses the S3 endpoint."""
    running: list[RunningServer] = []

    def start(store: str = "local", **overrides: Any) -> RunningServer:
        if store == "s3":
            overrides = {
                "s3_endpoint": s3_config.endpoint,
                "s3_access_key": s3_config.access_key,
                "s3_secret_key": s3_config.secret_key,
                "s3_secure": s3_config.secure,
                "s3_region": s3_config.region,
                "s3_staging_bucket": s3_buckets.staging,
                "s3_partitions_bucket": s3_buckets.partitions,
                **overrides,
            }
        data_dir = tmp_path / f"node{len(running)}"
        url = overrides.pop("database_url", database_url)
        server = RunningServer(test_settings(data_dir, url, **overrides)).start()
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def server(make_server: ServerFactory) -> RunningServer:
    return make_server()


def unique(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def alice(server: RunningServer) -> dict[str, Any]:
    return await register_login(server.http, unique("alice"))


@pytest.fixture
async def bob(server: RunningServer) -> dict[str, Any]:
    return await register_login(server.http, unique("bob"))


@pytest.fixture
def ended(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The devices whose session's server side has ended (in-process servers)."""
    from server.session import Session

    out: set[str] = set()
    original = Session.run

    async def run(self: Session) -> None:
        try:
            await original(self)
        finally:
            out.add(self.device)

    monkeypatch.setattr(Session, "run", run)
    return out


async def cut_and_see_it_settle(client: SyncClient, device: str, ended: set[str]) -> None:
    """Cut the client's socket (no close handshake) while its session has a
    statement running that cannot finish yet; the session must not end meanwhile.
    The caller then lets the statement finish and awaits ``until_ended``."""
    client.ws.transport.abort()
    await asyncio.sleep(1.0)
    assert device not in ended, "the session ended while its statement ran on"


async def until_ended(device: str, ended: set[str], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while device not in ended:
        assert asyncio.get_running_loop().time() < deadline, f"session {device} never ended"
        await asyncio.sleep(0.05)


@pytest.fixture
def fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cheap Argon2id for client-side keys and login secrets (tests only)."""
    from client import crypto

    for name in ("KDF", "LOGIN_KDF"):
        monkeypatch.setattr(crypto, f"{name}_MEMORY_KIB", 8 * 1024)
        monkeypatch.setattr(crypto, f"{name}_ITERATIONS", 1)
        monkeypatch.setattr(crypto, f"{name}_LANES", 1)
