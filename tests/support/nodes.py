"""Real ``tessera-server serve`` processes, for tests that need several nodes.

:class:`RunningServer` runs the app in a thread of the test process; a node
here is a separate OS process started through the real command line, exactly
as an operator would run it, so two nodes share nothing but the database and
the object store.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.support.s3 import S3Buckets, S3Config, free_port
from tests.support.server import TEST_JWT_SECRET

SERVER_BIN = Path(sys.executable).with_name("tessera-server")
LISTENING = re.compile(r"Tessera is listening on (http://\S+)")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


class Node:
    """One ``tessera-server serve`` process; stdout piped (for the banner), stderr to a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[str] | None = None
        self.http = ""
        self._lines: queue.Queue[str | None] = queue.Queue()

    @property
    def ws(self) -> str:
        return self.http.replace("http://", "ws://", 1) + "/v1/sync"

    def start(self) -> Node:
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [str(SERVER_BIN), "serve", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        # Drain stdout in a thread so a chatty process can never block on a full pipe.
        threading.Thread(target=self._pump, daemon=True, name="node-stdout").start()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line is None:
                break
            match = LISTENING.search(line)
            if match:
                self.http = match.group(1)
                return self
        self.stop()
        raise RuntimeError(
            f"tessera-server did not start (exit {self.proc.returncode}):\n"
            + self.log.read_text(errors="replace")[-4000:]
        )

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stop(self) -> None:
        """SIGTERM (uvicorn's graceful shutdown), then SIGKILL if it lingers."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def node_args(
    data_dir: Path,
    database_url: str,
    s3: S3Config,
    buckets: S3Buckets,
    port: int | None = None,
    *extra: str,
) -> list[str]:
    """The command line of one node sharing ``database_url`` and the S3 buckets."""
    return [
        "--host",
        "127.0.0.1",
        "--port",
        str(port if port is not None else free_port()),
        "--data-dir",
        str(data_dir),
        "--database-url",
        database_url,
        "--jwt-secret",
        TEST_JWT_SECRET,
        "--s3-endpoint",
        s3.endpoint,
        "--s3-access-key",
        s3.access_key,
        "--s3-secret-key",
        s3.secret_key,
        "--s3-region",
        s3.region,
        "--s3-secure" if s3.secure else "--no-s3-secure",
        "--s3-staging-bucket",
        buckets.staging,
        "--s3-partitions-bucket",
        buckets.partitions,
        "--argon2-time-cost",
        "1",
        "--argon2-memory-cost",
        "1024",
        "--janitor-interval",
        "3600",
        "--log-level",
        "warning",
        *extra,
    ]
