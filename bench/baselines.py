"""Bare baselines for the throughput benchmarks, each in its own process.

``python -m bench.baselines MODE --port P`` serves one of:

* ``sink``: a bare ``websockets`` server that reads every message and drops it
  (only the small ``done`` marker is decoded, and answered with ``ok``);
* ``sink-decode``: the same, but every message is decoded with msgpack, as the
  Tessera server must;
* ``sink-files``: the same, and each part's bytes go to its own file under
  ``--root``, fsync'd when the part is complete (``--part-size``): what storing
  costs on this disk, with no hashing, checks or bookkeeping;
* ``source``: a bare ``websockets`` server that answers ``get {rid, part}`` with
  the part's bytes as msgpack ``data`` frames of ``--chunk`` bytes, exactly the
  frames Tessera sends (``part`` is the index into the deterministic payload);
* ``static``: a bare aiohttp static file server over ``--root``
  (``web.FileResponse``, i.e. sendfile(2)).

The payload is deterministic (seeded), so the bench process and a baseline
process hold the very same bytes without sending them to each other.

Every baseline process fixes glibc's malloc thresholds as the server does
(server/memory.py). Left to glibc's dynamic thresholds, the plain sink ran in
one of two modes, switching unpredictably between runs and between processes:
1,110-1,270 MiB/s at 0.82-0.92 CPU s/GiB, or 2,380-2,710 MiB/s at 0.26-0.28
(freed 1 MiB buffers handed back to the kernel and faulted in again, or kept).
With the thresholds fixed it ran at 2,380-2,790 MiB/s in every probe run, and
in the benches since at 2,230-2,670 except once, a first run at 1,243 (the best
of three counts). Tessera's figures were compared with the slow mode in most
earlier runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import select
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import msgpack

from bench.common import free_port
from server.memory import tune_malloc

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: The small message a client sends after its last chunk; the sink answers it
#: once everything before it has been read, which stops the clock.
DONE = msgpack.packb({"t": "done"})


@dataclass
class Payload:
    """``parts`` parts of ``part_size`` random bytes; ``distinct`` blocks, reused in turn.

    Random (incompressible) like ciphertext; generated once, with the sha256 of
    each distinct block computed once.
    """

    part_size: int
    parts: int
    distinct: int = 16
    seed: int = 20240601
    blocks: list[bytes] = field(init=False, repr=False)
    hashes: list[bytes] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        n = max(1, min(self.distinct, self.parts))
        self.blocks = [rng.randbytes(self.part_size) for _ in range(n)]
        self.hashes = [hashlib.sha256(b).digest() for b in self.blocks]

    def block(self, index: int) -> bytes:
        return self.blocks[index % len(self.blocks)]

    def sha256(self, index: int) -> bytes:
        return self.hashes[index % len(self.hashes)]

    @property
    def total(self) -> int:
        return self.part_size * self.parts

    def describe(self) -> str:
        return f"{fmt_size(self.total)}, {self.parts} parts of {fmt_size(self.part_size)}"


def fmt_size(n: int) -> str:
    if n >= 1 << 30 and n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    if n % KiB == 0:
        return f"{n // KiB} KiB"
    return f"{n} B"


def mib_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds if seconds > 0 else float("nan")


# ------------------------------------------------------------ the servers


async def _sink(decode: bool, port: int) -> None:
    from websockets.asyncio.server import serve

    async def handler(ws: object) -> None:
        async for message in ws:  # type: ignore[attr-defined]
            if decode:
                frame = msgpack.unpackb(message)
                if frame.get("t") == "done":
                    await ws.send(b"ok")  # type: ignore[attr-defined]
            elif len(message) == len(DONE) and message == DONE:
                await ws.send(b"ok")  # type: ignore[attr-defined]

    async with serve(handler, "127.0.0.1", port, max_size=None, compression=None):
        print("ready", flush=True)
        await asyncio.Future()


async def _sink_files(port: int, root: Path, part_size: int) -> None:
    from websockets.asyncio.server import serve

    def write(files: dict[int, BinaryIO], part: int, off: int, data: bytes) -> None:
        f = files.get(part)
        if f is None:
            f = files[part] = open(root / f"{part}.part", "wb")  # noqa: SIM115
        f.write(data)
        if off + len(data) == part_size:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            del files[part]

    async def handler(ws: object) -> None:
        # Writes run in a worker thread, as Tessera's do: an fsync must not stop reading.
        files: dict[int, BinaryIO] = {}
        async for message in ws:  # type: ignore[attr-defined]
            frame = msgpack.unpackb(message)
            if frame.get("t") == "done":
                await ws.send(b"ok")  # type: ignore[attr-defined]
                continue
            await asyncio.to_thread(write, files, frame["part"], frame["off"], frame["data"])

    async with serve(handler, "127.0.0.1", port, max_size=None, compression=None):
        print("ready", flush=True)
        await asyncio.Future()


def prefault_page_cache(directory: Path, nbytes: int) -> None:
    """Write and delete ``nbytes`` of file in ``directory``.

    On this VM the first write into guest memory the kernel has never used costs
    it ~2.3 s/GiB (touching 6 GiB took 13.9 s in the kernel the first time, 4.6 s
    the second), a cost the sinks never pay and a server that has been up a
    while neither. Run before each measured upload, this hands the run page
    cache the machine has used before, so the figure is Tessera's, not the
    hypervisor's.
    """
    block = b"\0" * MiB
    scratch = directory / "prefault.tmp"
    with open(scratch, "wb") as f:
        for _ in range(max(1, nbytes // MiB)):
            f.write(block)
    scratch.unlink()


async def _source(port: int, part_size: int, parts: int, distinct: int, chunk: int) -> None:
    from websockets.asyncio.server import serve

    payload = Payload(part_size, parts, distinct)

    async def handler(ws: object) -> None:
        async for message in ws:  # type: ignore[attr-defined]
            frame = msgpack.unpackb(message)
            if frame.get("t") != "get":
                continue
            rid, data = frame["rid"], payload.block(frame["part"])
            for off in range(0, len(data), chunk):
                piece = data[off : off + chunk]
                out = {"t": "data", "rid": rid, "off": off, "data": piece}
                if off + len(piece) == len(data):
                    out["end"] = True
                await ws.send(msgpack.packb(out, use_bin_type=True))  # type: ignore[attr-defined]

    async with serve(handler, "127.0.0.1", port, max_size=None, compression=None):
        print("ready", flush=True)
        await asyncio.Future()


async def _static(port: int, root: Path) -> None:
    from aiohttp import web

    async def get(request: web.Request) -> web.StreamResponse:
        path = (root / request.match_info["key"]).resolve()
        if root not in path.parents or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, chunk_size=MiB)

    app = web.Application()
    app.router.add_get("/{key:.+}", get)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Future()


@dataclass(frozen=True)
class Baseline:
    url: str  # ws://... or http://...
    pid: int


@contextlib.contextmanager
def baseline_process(mode: str, *args: str) -> Iterator[Baseline]:
    """Run ``python -m bench.baselines MODE`` on a free port until the block ends."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.baselines", mode, "--port", str(port), *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], 30)
        if not readable or proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"baseline {mode} did not start (exit {proc.poll()})")
        scheme = "http" if mode == "static" else "ws"
        yield Baseline(f"{scheme}://127.0.0.1:{port}", proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["sink", "sink-decode", "sink-files", "source", "static"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--part-size", type=int, default=4 * MiB)
    parser.add_argument("--parts", type=int, default=256)
    parser.add_argument("--distinct", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=MiB)
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args()
    tune_malloc()  # the same allocator settings as the server: see the docstring
    with contextlib.suppress(KeyboardInterrupt):
        if args.mode in ("sink", "sink-decode"):
            asyncio.run(_sink(args.mode == "sink-decode", args.port))
        elif args.mode == "sink-files":
            asyncio.run(_sink_files(args.port, args.root.resolve(), args.part_size))
        elif args.mode == "source":
            asyncio.run(_source(args.port, args.part_size, args.parts, args.distinct, args.chunk))
        else:
            asyncio.run(_static(args.port, args.root.resolve()))


if __name__ == "__main__":
    main()
