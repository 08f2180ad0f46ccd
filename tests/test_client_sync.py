"""Folder sync between two devices of one user, live, over a real server."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from client.sdk import Tessera
from client.state import State
from client.sync import run_sync, safe_name
from tests.conftest import unique

PASSWORD = "correct horse battery"
PART = 64 * 1024


@pytest.fixture(autouse=True)
def _cheap_keys(fast_kdf: None) -> None:
    """Every test here derives keys: keep Argon2id cheap."""


async def make_device(server, tmp_path: Path, name: str, username: str, *, new: bool) -> Tessera:
    sdk = Tessera(State(tmp_path / "config" / name), server.http)
    sdk.part_size = PART
    await (sdk.register if new else sdk.login)(username, PASSWORD)
    return sdk


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


async def until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def pair(server, tmp_path):
    """Devices A and B of one user, each syncing its own folder live."""
    username = unique("sync")
    a = await make_device(server, tmp_path, "a", username, new=True)
    b = await make_device(server, tmp_path, "b", username, new=False)
    dirs = tmp_path / "A", tmp_path / "B"
    logs: dict[str, list[str]] = {"a": [], "b": []}
    tasks = [
        asyncio.create_task(run_sync(a, dirs[0], log=logs["a"].append)),
        asyncio.create_task(run_sync(b, dirs[1], log=logs["b"].append)),
    ]
    await until(
        lambda: all(any("watching" in m for m in v) for v in logs.values()),
        what="both devices watching",
    )
    yield dirs, logs
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_tree_pushed_on_one_device_arrives_live_on_the_other(pair):
    (a_dir, b_dir), _ = pair
    files = {
        "empty.txt": b"",
        "tiny.txt": b"x",
        "one-part.bin": os.urandom(PART),
        "many/parts.bin": os.urandom(PART * 5 + 123),
        "résumé/ñandú 日本.txt": "non-ascii ✓".encode(),
    }
    for name, data in files.items():
        path = a_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    await until(lambda: tree(b_dir) == files, what="B to receive A's tree")
    assert tree(a_dir) == files

    # An edit and a delete on B reach A.
    (b_dir / "tiny.txt").write_bytes(b"edited on B")
    (b_dir / "many" / "parts.bin").unlink()
    expected = {**files, "tiny.txt": b"edited on B"}
    del expected["many/parts.bin"]
    await until(lambda: tree(a_dir) == expected, what="A to see B's edit and delete")
    # A rename is a delete plus an add.
    (a_dir / "one-part.bin").rename(a_dir / "renamed.bin")
    expected["renamed.bin"] = expected.pop("one-part.bin")
    await until(lambda: tree(b_dir) == expected, what="B to see the rename")


async def test_concurrent_edits_keep_both_versions(server, tmp_path):
    username = unique("sync")
    a = await make_device(server, tmp_path, "a", username, new=True)
    b = await make_device(server, tmp_path, "b", username, new=False)
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    a_dir.mkdir()
    (a_dir / "notes.txt").write_bytes(b"original")
    await run_sync(a, a_dir, once=True, log=lambda m: None)
    await run_sync(b, b_dir, once=True, log=lambda m: None)
    assert (b_dir / "notes.txt").read_bytes() == b"original"
    # Both edit offline, then both sync.
    (a_dir / "notes.txt").write_bytes(b"edit from A")
    (b_dir / "notes.txt").write_bytes(b"edit from B, longer")
    await run_sync(a, a_dir, once=True, log=lambda m: None)
    await run_sync(b, b_dir, once=True, log=lambda m: None)
    await run_sync(a, a_dir, once=True, log=lambda m: None)
    for folder in (a_dir, b_dir):
        contents = tree(folder)
        assert sorted(contents.values()) == [b"edit from A", b"edit from B, longer"], contents
        assert contents["notes.txt"] == b"edit from A"  # first commit wins the name
        (copy,) = [n for n in contents if n != "notes.txt"]
        assert copy.startswith("notes (conflicted copy ") and copy.endswith(".txt")


def test_unsafe_names_are_refused():
    for bad in ("../x", "/etc/passwd", "a/../../b", "a\\b", "", "a//b", "./a", "a\x00b"):
        assert not safe_name(bad), bad
    for good in ("a", "a/b.txt", "résumé/ñandú 日本.txt", ".hidden"):
        assert safe_name(good), good
