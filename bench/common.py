"""Shared pieces: a real server process on the embedded defaults, and percentiles."""

from __future__ import annotations

import atexit
import contextlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

BENCH_SECRET = "tessera-bench-secret-0123456789abcdef0123456789"


#: The run's scratch root (``scratch_dir``), made on first use.
_scratch_root: Path | None = None


def scratch_dir(prefix: str) -> Path:
    """A fresh directory for one benchmark's data, deleted only when the run ends.

    Why not at the end of each benchmark: on ext4 without a journal (this VM's
    root file system), creating a file scans past every inode of its block group
    freed in the last 60 s (360 s while the inode table block is dirty). Measured
    there: 25 us of kernel time per 1 KiB file created in a clean group, 470-550 us
    right after deleting 50,000 files. Deleting one benchmark's data just before
    the next one creates its small files would measure our own clean-up, not the
    server; a file system with a journal (ext4's default, XFS) never scans.
    """
    global _scratch_root
    if _scratch_root is None:
        _scratch_root = Path(tempfile.mkdtemp(prefix="tbench-run-"))
        atexit.register(shutil.rmtree, _scratch_root, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_scratch_root))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass(frozen=True)
class ServerProcess:
    http: str
    ws: str
    database_url: str
    pid: int


@contextlib.contextmanager
def server_process(*extra: str, data_dir: Path | None = None) -> Iterator[ServerProcess]:
    """``tessera-server serve`` in its own process (the load never runs inside it)."""
    if data_dir is None:
        data_dir = scratch_dir("server-")
    port = free_port()
    exe = Path(sys.executable).with_name("tessera-server")
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--jwt-secret",
            BENCH_SECRET,
            "--log-level",
            "warning",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        assert proc.stdout is not None
        for line in proc.stdout:
            if re.search(r"listening on http://", line):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
        else:
            raise RuntimeError(f"server exited with {proc.wait()}")
        url = "postgresql://postgres:@/postgres?host=" + str((data_dir / "pgdata").resolve())
        yield ServerProcess(
            f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/sync", url, proc.pid
        )
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def register(http: str, username: str, password: str = "bench password") -> str:
    with httpx.Client(base_url=http) as client:
        client.post("/v1/auth/register", json={"username": username, "password": password})
        r = client.post("/v1/auth/login", json={"username": username, "password": password})
        r.raise_for_status()
        return str(r.json()["access"])
