"""The migrator against real, fresh PostgreSQL databases (one per test)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from server.migrate import discover, migrate, migrations_dir

ROOT = Path(__file__).resolve().parent.parent
INITIAL = ROOT / "migrations" / "0001_initial.sql"

#: Every shipped migration, in order (later ones may be added; 0001 always comes first).
SHIPPED = [name for _, name, _ in discover(INITIAL.parent)]

EXPECTED_TABLES = {
    "users",
    "devices",
    "refresh_tokens",
    "objects",
    "partitions",
    "access_list",
    "uploads",
    "upload_parts",
    "garbage",
    "schema_migrations",
}


def with_database(url: str, name: str) -> str:
    """The same server URL with another database name (``?host=`` sockets kept)."""
    head, sep, query = url.partition("?")
    scheme, _, rest = head.partition("://")
    authority, _, _ = rest.partition("/")
    return f"{scheme}://{authority}/{name}{sep}{query}"


def server_bin() -> str:
    candidate = Path(sys.executable).parent / "tessera-server"
    return str(candidate if candidate.exists() else ROOT / ".venv" / "bin" / "tessera-server")


@pytest.fixture
async def fresh_url(database_url: str) -> AsyncIterator[str]:
    """An empty database of its own, dropped afterwards."""
    name = f"tessera_mig_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield with_database(database_url, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def fresh(fresh_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(fresh_url)
    yield conn
    await conn.close()


async def tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )
    return {r["table_name"] for r in rows}


async def column_type(conn: asyncpg.Connection, table: str, column: str) -> str | None:
    return await conn.fetchval(
        "SELECT data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = $1 AND column_name = $2",
        table,
        column,
    )


async def applied_versions(conn: asyncpg.Connection) -> list[tuple[int, str]]:
    rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    return [(r["version"], r["name"]) for r in rows]


def only_initial(directory: Path) -> Path:
    """A migrations directory holding just a copy of 0001_initial."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(INITIAL, directory / INITIAL.name)
    return directory


def write_migrations(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


# ------------------------------------------------------------------ migrate


async def test_migrate_empty_database_creates_schema(fresh):
    assert await tables(fresh) == set()
    applied = await migrate(fresh)
    assert applied[0] == "0001_initial"
    assert applied == SHIPPED
    assert await tables(fresh) >= EXPECTED_TABLES
    assert await column_type(fresh, "access_list", "seq") == "bigint"
    assert await column_type(fresh, "users", "change_seq") == "bigint"
    assert [name for _, name in await applied_versions(fresh)] == SHIPPED
    assert await fresh.fetchval("SELECT applied_at FROM schema_migrations") is not None
    # The schema is usable: a user row with the defaults the server relies on.
    row = await fresh.fetchrow(
        "INSERT INTO users (username, password_hash, quota) VALUES ('u', 'h', 10) "
        "RETURNING used, change_seq"
    )
    assert (row["used"], row["change_seq"]) == (0, 0)


async def test_second_migrate_applies_nothing(fresh):
    assert await migrate(fresh) == SHIPPED
    before = await fresh.fetchval("SELECT applied_at FROM schema_migrations WHERE version = 1")
    assert await migrate(fresh) == []
    assert [name for _, name in await applied_versions(fresh)] == SHIPPED
    after = await fresh.fetchval("SELECT applied_at FROM schema_migrations WHERE version = 1")
    assert before == after


async def test_concurrent_migrates_apply_exactly_once(fresh_url):
    conns = [await asyncpg.connect(fresh_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        assert sorted(results) == [[], [], SHIPPED]
        assert [name for _, name in await applied_versions(conns[0])] == SHIPPED
        assert await tables(conns[0]) >= EXPECTED_TABLES
    finally:
        for c in conns:
            await c.close()


async def test_later_migration_applies_on_top(fresh, tmp_path):
    assert await migrate(fresh, only_initial(tmp_path / "base")) == ["0001_initial"]
    directory = write_migrations(
        only_initial(tmp_path / "m"), {"0002_extra.sql": "CREATE TABLE extra (id int PRIMARY KEY);"}
    )
    assert await migrate(fresh, directory) == ["0002_extra"]
    assert "extra" in await tables(fresh)
    assert await applied_versions(fresh) == [(1, "0001_initial"), (2, "0002_extra")]
    assert await migrate(fresh, directory) == []


async def test_broken_migration_leaves_nothing_applied(fresh, tmp_path):
    assert await migrate(fresh, only_initial(tmp_path / "base")) == ["0001_initial"]
    directory = write_migrations(
        only_initial(tmp_path / "m"),
        # A valid statement before the broken one: it must be rolled back too.
        {"0002_broken.sql": "CREATE TABLE half_done (id int);\nCREATE TABLE oops (;\n"},
    )
    with pytest.raises(asyncpg.PostgresSyntaxError):
        await migrate(fresh, directory)
    assert await applied_versions(fresh) == [(1, "0001_initial")]
    assert "half_done" not in await tables(fresh)
    assert "oops" not in await tables(fresh)


async def test_broken_migration_on_empty_database_rolls_back_everything(fresh, tmp_path):
    directory = write_migrations(
        only_initial(tmp_path / "m"),
        {"0002_broken.sql": "ALTER TABLE users ADD COLUMN nick text;\nTHIS IS NOT SQL;\n"},
    )
    with pytest.raises(asyncpg.PostgresError):
        await migrate(fresh, directory)
    # One transaction: not even 0001 or the bookkeeping table survived.
    assert await tables(fresh) == set()
    # Fixing the migration then applies both.
    (directory / "0002_broken.sql").write_text("ALTER TABLE users ADD COLUMN nick text;")
    assert await migrate(fresh, directory) == ["0001_initial", "0002_broken"]
    assert await column_type(fresh, "users", "nick") == "text"


# ----------------------------------------------------------------- discover


async def test_upload_payers_are_filled_in_for_uploads_made_before_0011(fresh, tmp_path):
    """0011 stores whose quota an upload reserves; rows already there get theirs."""
    before = tmp_path / "before"
    before.mkdir()
    for _, name, path in discover(INITIAL.parent):
        if name < "0011":
            shutil.copy(path, before / path.name)
    await migrate(fresh, before)
    user = "INSERT INTO users (username, password_hash, quota) VALUES ($1, 'h', 1000) RETURNING id"
    owner = await fresh.fetchval(user, "owner")
    editor = await fresh.fetchval(user, "editor")
    obj = await fresh.fetchval(
        "INSERT INTO objects (owner_id, kind, rev, size, enc_name, enc_mtime, enc_key, salt) "
        "VALUES ($1, 'file', 1, 10, '', '', '', '') RETURNING id",
        owner,
    )
    insert = (
        "INSERT INTO uploads (id, user_id, object_id, kind, enc_name, enc_mtime, enc_key, "
        "salt, declared_parts, size, expires_at) "
        "VALUES ($1, $2, $3, 'file', '', '', '', '', 1, $4, now() + interval '1 hour')"
    )
    await fresh.execute(insert, "new-by-editor", editor, None, 100)
    await fresh.execute(insert, "revision-by-editor", editor, obj, 30)
    await fresh.execute(insert, "revision-by-owner", owner, obj, 5)
    assert "0011_upload_payer" in await migrate(fresh)
    payers = dict(await fresh.fetch("SELECT id, payer_id FROM uploads"))
    assert payers == {
        "new-by-editor": editor,
        "revision-by-editor": owner,
        "revision-by-owner": owner,
    }
    assert await fresh.fetchval("SELECT tessera_reserved($1)", owner) == 35
    assert await fresh.fetchval("SELECT tessera_reserved($1)", editor) == 100
    # Rows inserted afterwards get theirs from the trigger.
    await fresh.execute(insert, "later", editor, obj, 7)
    await fresh.execute("UPDATE uploads SET state = 'committed' WHERE id = 'revision-by-owner'")
    assert await fresh.fetchval("SELECT payer_id FROM uploads WHERE id = 'later'") == owner
    assert await fresh.fetchval("SELECT tessera_reserved($1)", owner) == 37


def test_discover_orders_and_filters(tmp_path):
    directory = write_migrations(
        tmp_path,
        {
            "0010_later.sql": "",
            "0002_second.sql": "",
            "0001_first.sql": "",
            "README.md": "not a migration",
            "1_short_number.sql": "",
            "0003_Upper.sql": "",
            "0004_backup.sql.bak": "",
        },
    )
    found = discover(directory)
    assert [(v, name) for v, name, _ in found] == [
        (1, "0001_first"),
        (2, "0002_second"),
        (10, "0010_later"),
    ]
    assert all(path.parent == directory for _, _, path in found)


def test_discover_rejects_duplicate_numbers(tmp_path):
    directory = write_migrations(
        tmp_path, {"0001_initial.sql": "", "0002_a.sql": "", "0002_b.sql": ""}
    )
    with pytest.raises(RuntimeError, match="duplicate"):
        discover(directory)


def test_discover_rejects_empty_directory(tmp_path):
    with pytest.raises(RuntimeError, match="no migrations"):
        discover(tmp_path)


def test_shipped_migrations_are_discovered(monkeypatch, tmp_path):
    monkeypatch.delenv("TESSERA_MIGRATIONS_DIR", raising=False)
    assert migrations_dir() == INITIAL.parent
    assert next(name for _, name, _ in discover(migrations_dir())) == "0001_initial"
    monkeypatch.setenv("TESSERA_MIGRATIONS_DIR", str(tmp_path))
    assert migrations_dir() == tmp_path


# ---------------------------------------------------------------------- CLI


def test_cli_migrate(fresh_url, tmp_path):
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [server_bin(), "migrate", "--database-url", fresh_url, "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=_clean_env(),
        )

    first = run()
    assert first.returncode == 0, first.stderr
    assert "applied: 0001_initial" in first.stdout
    assert first.stdout.strip() == "applied: " + ", ".join(SHIPPED)
    second = run()
    assert second.returncode == 0, second.stderr
    assert "database is up to date" in second.stdout
    assert "applied:" not in second.stdout


def test_cli_migrate_uses_migrations_dir_override(fresh_url, tmp_path):
    directory = only_initial(tmp_path / "m")
    (directory / "0002_more.sql").write_text("CREATE TABLE more_stuff (id int);")
    env = _clean_env() | {"TESSERA_MIGRATIONS_DIR": str(directory)}
    result = subprocess.run(
        [server_bin(), "migrate", "--database-url", fresh_url, "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "applied: 0001_initial, 0002_more" in result.stdout


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
