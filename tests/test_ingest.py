"""Ingest threads and direct-I/O spool files (no sockets: threads and a real disk)."""

from __future__ import annotations

import errno
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server import spool
from server.ingest import IngestThreads
from server.spool import BLOCK, SpoolFile


def _direct_works(directory: Path) -> bool:
    probe = directory / ".probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


def _write_in_pieces(f: SpoolFile, data: bytes, rng: random.Random) -> None:
    off = 0
    while off < len(data):
        n = rng.choice([1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 65_536, 1 << 20, 3 << 20])
        f.write(data[off : off + n])
        off += n


@pytest.mark.parametrize(
    "size", [1, BLOCK - 1, BLOCK, BLOCK + 1, 100_000, (1 << 20) + 17, 4 << 20, spool.STAGE * 3]
)
def test_a_spool_file_holds_exactly_what_was_written(tmp_path: Path, size: int) -> None:
    rng = random.Random(size)
    data = rng.randbytes(size)
    f = SpoolFile(tmp_path / "part")
    assert f.direct == _direct_works(tmp_path)
    _write_in_pieces(f, data, rng)
    assert f.size == size
    f.close()
    assert f.closed
    assert (tmp_path / "part").read_bytes() == data  # padding truncated away
    f.close()  # twice is harmless


def test_where_direct_io_is_refused_the_file_is_written_through_the_cache(
    tmp_path: Path,
) -> None:
    # tmpfs refuses O_DIRECT at open; without a tmpfs, ask for buffered writes.
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and not _direct_works(shm) else tmp_path
    path = where / f"tessera-test-{os.getpid()}-{time.monotonic_ns()}"
    data = random.Random(1).randbytes(300_001)
    try:
        f = SpoolFile(path, direct=where is shm)
        assert not f.direct
        _write_in_pieces(f, data, random.Random(2))
        f.close()
        assert path.read_bytes() == data
    finally:
        path.unlink(missing_ok=True)


@pytest.fixture
def direct_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a filesystem that takes O_DIRECT: the temp dir, or (where
    that is a tmpfs) one beside the tests."""
    if _direct_works(tmp_path):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as name:
        if not _direct_works(Path(name)):
            pytest.fail("no filesystem here accepts O_DIRECT (ext4, xfs do)")
        yield Path(name)


def test_a_direct_write_refused_midway_goes_on_through_the_cache(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some filesystems accept O_DIRECT at open and refuse the write (a block size
    above 4 KiB): the bytes staged then are written all the same, and the rest."""
    import fcntl

    real_write = os.write
    refused = []

    def write(fd: int, data: object) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and not refused:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(spool.os, "write", write)
    data = random.Random(3).randbytes(3 * spool.STAGE + 5)
    f = SpoolFile(direct_dir / "part")
    assert f.direct
    _write_in_pieces(f, data, random.Random(4))
    f.close()
    assert refused and not f.direct
    assert (direct_dir / "part").read_bytes() == data


def test_abort_closes_without_writing_what_is_staged(tmp_path: Path) -> None:
    f = SpoolFile(tmp_path / "part")
    f.write(b"x" * (BLOCK + 10))
    f.abort()
    assert f.closed
    size = (tmp_path / "part").stat().st_size
    assert size == (BLOCK if f.direct else BLOCK + 10)


def test_a_spool_file_is_new_and_private(tmp_path: Path) -> None:
    (tmp_path / "taken").write_bytes(b"")
    with pytest.raises(FileExistsError):
        SpoolFile(tmp_path / "taken")
    f = SpoolFile(tmp_path / "part")
    f.close()
    assert (tmp_path / "part").stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------- ingest threads


def test_one_lanes_jobs_run_in_order_and_lanes_run_on_different_threads() -> None:
    ingest = IngestThreads(2)
    seen: dict[int, list[int]] = {0: [], 1: []}
    threads: dict[int, set[int]] = {0: set(), 1: set()}

    def job(lane: int, i: int) -> None:
        if i % 50 == 0:
            time.sleep(0.001)
        seen[lane].append(i)
        threads[lane].add(threading.get_ident())

    for i in range(500):
        for lane in (0, 1):
            ingest.submit(lane, lambda lane=lane, i=i: job(lane, i))
    ingest.close()
    assert seen == {0: list(range(500)), 1: list(range(500))}
    assert len(threads[0]) == len(threads[1]) == 1
    assert threads[0] != threads[1]


def test_lanes_are_handed_out_round_robin() -> None:
    ingest = IngestThreads(3)
    assert [ingest.lane() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError):
        IngestThreads(0)


def test_a_failing_job_is_logged_and_its_lane_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    ingest = IngestThreads(1)
    ran = []

    def boom() -> None:
        raise RuntimeError("disk on fire")

    with caplog.at_level(logging.ERROR, logger="server.ingest"):
        ingest.submit(0, boom)
        ingest.submit(0, lambda: ran.append(1))
        ingest.close()
    assert ran == [1]
    assert "disk on fire" in caplog.text


def test_close_runs_the_jobs_already_queued() -> None:
    ingest = IngestThreads(2)
    done = []
    for i in range(20):
        ingest.submit(i % 2, lambda i=i: (time.sleep(0.005), done.append(i)))
    ingest.close()
    assert sorted(done) == list(range(20))
    IngestThreads(1).close()  # never started: nothing to stop


@pytest.mark.parametrize(
    "size",
    [3 * BLOCK + 1000, 3 * spool.STAGE + 1000],
    ids=["at the padded last block", "mid-write"],
)
def test_a_short_direct_write_then_a_refusal_writes_each_byte_once(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A direct write that comes back short leaves the offset unaligned, so the
    next is refused: the rest goes through the cache, from where it stopped."""
    import fcntl

    real_write = os.write
    calls = 0

    def write(fd: int, data: object) -> int:
        nonlocal calls
        direct = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        calls += 1
        if direct and calls == 2:
            return real_write(fd, memoryview(data)[:512])  # type: ignore[arg-type]
        if direct and calls == 3:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(spool.os, "write", write)
    data = random.Random(5).randbytes(size)
    f = SpoolFile(direct_dir / "part")
    f.write(data)
    f.close()
    assert calls > 3 and not f.direct
    assert (direct_dir / "part").read_bytes() == data


def test_a_job_submitted_after_close_runs_at_once() -> None:
    ingest = IngestThreads(1)
    ingest.submit(0, lambda: None)
    ingest.close()
    ran = []
    ingest.submit(0, lambda: ran.append(threading.get_ident()))
    assert ran == [threading.get_ident()]
