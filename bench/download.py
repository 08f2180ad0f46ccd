"""Download throughput: one session reads back a 1 GiB file of 256 parts of 4 MiB.

The file is uploaded first (untimed) with the lean client of :mod:`bench.upload`.
Then, with several requests in flight:

* WebSocket: ``get`` of every partition; the clock runs from the first ``get``
  to the last ``end``. Baseline: a bare ``websockets`` server (its own process)
  answering the same ``get`` frames with the same ``data`` frames of
  ``max_chunk`` bytes from memory, read by the same client loop.
* REST: ``GET /v1/partition/{id}`` with httpx. LocalStore: the server streams
  the file. Baseline: a bare static file server (aiohttp ``FileResponse``,
  sendfile) over the very same partition files, read by the same httpx loop;
  an HTTP baseline because a REST download is HTTP, and a bare file read
  (also reported, in ``extra``) has no network at all.
* S3 (moto, smaller file): ``get`` streams from the store, so its baseline is
  bare miniopy-async GETs of the same objects; REST answers with a 307 to a
  presigned URL, so its baseline is bare GETs of those same presigned URLs.

Every download and every baseline first makes one untimed run, as the
upload benchmark warms the server up with an upload: the first WebSocket
download from a fresh server ran at 1,765 MiB/s, the six after it at
2,010-2,223 (page cache already warm), and with two timed runs the best was
often the only warm one.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.baselines import MiB, Payload, baseline_process, fmt_size, mib_per_s
from bench.common import register, scratch_dir, server_process
from bench.report import Result
from bench.upload import (
    REPEAT,
    S3_FULL_PARTS,
    BenchError,
    Inbox,
    moto,
    open_session,
    payload_for,
    s3_flags,
    tessera_upload,
)

#: Requests in flight at once, on the WebSocket and over HTTP alike.
GETS_IN_FLIGHT = 4
TIMEOUT = 600.0


async def _pool(n: int, items: Sequence[Any], work: Callable[[Any], Awaitable[int]]) -> int:
    """Run ``work`` over ``items``, ``n`` at a time; the sum of what it returns."""
    queue = list(reversed(items))
    total = 0

    async def worker() -> None:
        nonlocal total
        while queue:
            n = await work(queue.pop())  # not `total += await ...`: that reads total first
            total += n

    await asyncio.gather(*(worker() for _ in range(n)))
    return total


async def ws_download(
    url: str, token: str | None, parts: Sequence[int], stats: dict[str, int] | None = None
) -> tuple[float, int]:
    """Seconds and bytes to ``get`` every part (first get -> last end), GETS_IN_FLIGHT
    at a time; ``stats`` gets the number of ``data`` frames.

    With a token, a Tessera session (hello first); without, a bare source.
    """
    import websockets

    if token is not None:
        ws, _ = await open_session(url, token, "down")
    else:
        ws = await websockets.connect(url, max_size=None, compression=None)
    inbox = Inbox(ws, 0)
    rid = 0

    async def get(part: int) -> int:
        nonlocal rid
        rid += 1
        reply = await inbox.request({"t": "get", "rid": rid, "part": part})
        if reply["t"] != "data":
            raise BenchError(f"get failed: {reply}")
        return 0

    try:
        started = time.perf_counter()
        await asyncio.wait_for(_pool(GETS_IN_FLIGHT, parts, get), TIMEOUT)
        seconds = time.perf_counter() - started
    finally:
        await inbox.close()
    if stats is not None:
        stats["frames"] = inbox.data_frames
    return seconds, inbox.received


async def http_download(
    urls: Sequence[str], headers: dict[str, str] | None = None
) -> tuple[float, int]:
    """Seconds and bytes to GET every URL (redirects followed), GETS_IN_FLIGHT at a time."""
    timeout = httpx.Timeout(TIMEOUT)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, follow_redirects=True) as client:

        async def get(url: str) -> int:
            n = 0
            async with client.stream("GET", url) as r:
                r.raise_for_status()
                async for piece in r.aiter_raw(MiB):
                    n += len(piece)
            return n

        started = time.perf_counter()
        total = await _pool(GETS_IN_FLIGHT, urls, get)
        return time.perf_counter() - started, total


def file_read(paths: Sequence[Path]) -> float:
    """Seconds to read the files in 1 MiB pieces (the page cache, warm from the server)."""
    buf = bytearray(MiB)
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - started


async def bare_gets(cfg: Any, bucket: str, names: Sequence[str]) -> tuple[float, int]:
    """Seconds and bytes for plain miniopy-async GETs of whole objects."""
    client = cfg.client()
    try:

        async def get(name: str) -> int:
            n = 0
            resp = await client.get_object(bucket, name)
            try:
                async for piece in resp.content.iter_chunked(MiB):
                    n += len(piece)
            finally:
                resp.release()
            return n

        started = time.perf_counter()
        total = await _pool(GETS_IN_FLIGHT, names, get)
        return time.perf_counter() - started, total
    finally:
        await client.close_session()


def _object_parts(http: str, token: str, obj: int) -> list[int]:
    r = httpx.get(f"{http}/v1/object/{obj}", headers={"Authorization": f"Bearer {token}"})
    r.raise_for_status()
    return [int(p["id"]) for p in r.json()["parts"]]


def _checked(what: str, work: Coroutine[Any, Any, tuple[float, int]], want: int) -> float:
    """Run one timed download; its seconds, once its byte count is checked."""
    seconds, got = asyncio.run(work)
    if got != want:
        raise BenchError(f"{what}: received {got} bytes, expected {want}")
    return seconds


Download = Callable[[], Coroutine[Any, Any, tuple[float, int]]]


def _interleaved(
    runs: dict[str, Download], want: int, repeat: int, between: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Seconds of ``repeat`` timed runs of each download, interleaved, after one
    untimed run of each (see the module docstring); ``between`` after each round."""
    for what, download in runs.items():
        _checked(what, download(), want)
    timed: dict[str, list[float]] = {what: [] for what in runs}
    for _ in range(repeat):
        for what, download in runs.items():
            timed[what].append(_checked(what, download(), want))
        if between is not None:
            between()
    return timed


def measure_local(payload: Payload, data_dir: Path, repeat: int) -> dict[str, float]:
    """Each figure and its baseline: best of ``repeat`` runs, interleaved."""
    total = payload.total
    blobs = data_dir / "blobs"
    frames: dict[str, int] = {}
    with server_process(data_dir=data_dir) as srv:
        token = register(srv.http, "bench-download")
        up = asyncio.run(tessera_upload(srv.ws, token, payload))
        chunk = up.limits["max_chunk"]
        ids = _object_parts(srv.http, token, up.object)
        keys = [f"partitions/{up.user}/{i}" for i in ids]
        paths = [blobs / k for k in keys]
        auth = {"Authorization": f"Bearer {token}"}
        urls = [f"{srv.http}/v1/partition/{i}" for i in ids]
        args = ["--part-size", str(payload.part_size), "--parts", str(payload.parts)]
        args += ["--distinct", str(len(payload.blocks)), "--chunk", str(chunk)]
        with (
            baseline_process("source", *args) as bare_ws,
            baseline_process("static", "--root", str(blobs)) as bare_http,
        ):
            # The partition files were just written, so they are in the page cache, as
            # on a busy server; one read first makes sure for every run alike.
            read = [file_read(paths)]
            statics = [f"{bare_http.url}/{k}" for k in keys]
            timed = _interleaved(
                {
                    "websocket": lambda: ws_download(srv.ws, token, ids, frames),
                    "source": lambda: ws_download(bare_ws.url, None, range(payload.parts)),
                    "REST": lambda: http_download(urls, auth),
                    "static": lambda: http_download(statics),
                },
                total,
                repeat,
                lambda: read.append(file_read(paths)),
            )
    return {
        "ws": mib_per_s(total, min(timed["websocket"])),
        "source": mib_per_s(total, min(timed["source"])),
        "rest": mib_per_s(total, min(timed["REST"])),
        "static": mib_per_s(total, min(timed["static"])),
        "file_read": mib_per_s(total, min(read)),
        "chunk": chunk,
        "frame_kib": total / frames["frames"] / 1024,
    }


def measure_s3(payload: Payload, data_dir: Path, repeat: int) -> dict[str, float]:
    total = payload.total
    tag = uuid.uuid4().hex[:10]
    frames: dict[str, int] = {}
    with moto() as cfg, server_process(*s3_flags(cfg, tag), data_dir=data_dir) as srv:
        token = register(srv.http, "bench-download-s3")
        up = asyncio.run(tessera_upload(srv.ws, token, payload))
        ids = _object_parts(srv.http, token, up.object)
        bucket, names = f"b{tag}-partitions", [f"partitions/{up.user}/{i}" for i in ids]
        auth = {"Authorization": f"Bearer {token}"}
        urls = [f"{srv.http}/v1/partition/{i}" for i in ids]
        signed = []
        with httpx.Client(headers=auth) as client:
            for url in urls:
                r = client.get(url)
                if r.status_code != 307:
                    raise BenchError(f"expected a 307 to a presigned URL, got {r.status_code}")
                signed.append(r.headers["location"])
        timed = _interleaved(
            {
                "websocket (S3)": lambda: ws_download(srv.ws, token, ids, frames),
                "bare GET": lambda: bare_gets(cfg, bucket, names),
                "REST (S3)": lambda: http_download(urls, auth),
                "presigned": lambda: http_download(signed),
            },
            total,
            repeat,
        )
    return {
        "ws": mib_per_s(total, min(timed["websocket (S3)"])),
        "bare_get": mib_per_s(total, min(timed["bare GET"])),
        "rest": mib_per_s(total, min(timed["REST (S3)"])),
        "presigned": mib_per_s(total, min(timed["presigned"])),
        "frame_kib": total / frames["frames"] / 1024,
    }


def run(smoke: bool = False) -> list[Result]:
    payload = payload_for(smoke)
    s3_payload = payload_for(smoke, S3_FULL_PARTS)
    repeat = 1 if smoke else REPEAT
    data_dir = scratch_dir("download-")  # both servers: PostgreSQL initialised once
    local = measure_local(payload, data_dir, repeat)
    s3 = measure_s3(s3_payload, data_dir, repeat)
    flight = f"{GETS_IN_FLIGHT} requests in flight"
    settings = f"{payload.describe()}, {flight}, data frames of {fmt_size(int(local['chunk']))}"
    s3_settings = f"{s3_payload.describe()} (moto is slow), {flight}"
    return [
        Result(
            benchmark="download, one session, WebSocket get, LocalStore",
            figure=local["ws"],
            unit="MiB/s",
            target=">= 60 % of baseline",
            met=local["ws"] >= 0.6 * local["source"],
            baseline=local["source"],
            baseline_name="bare websockets source, same data frames from memory",
            settings=settings,
            notes="first get -> last end; the source runs in its own process",
            extra={"mean data frame KiB": local["frame_kib"]},
        ),
        Result(
            benchmark="download, REST GET /v1/partition, LocalStore",
            figure=local["rest"],
            unit="MiB/s",
            target=">= 60 % of baseline",
            met=local["rest"] >= 0.6 * local["static"],
            baseline=local["static"],
            baseline_name="bare aiohttp static file server (sendfile), same files",
            settings=f"{payload.describe()}, {flight}, httpx",
            notes=(
                "the server streams the file. The baseline is HTTP because a REST download "
                "is: a bare read of the same files (page cache, no network) is in extra"
            ),
            extra={"bare file read MiB/s": local["file_read"]},
        ),
        Result(
            benchmark="download, one session, WebSocket get, S3 (moto)",
            figure=s3["ws"],
            unit="MiB/s",
            target=">= 60 % of baseline",
            met=s3["ws"] >= 0.6 * s3["bare_get"],
            baseline=s3["bare_get"],
            baseline_name="bare miniopy-async GETs of the same objects",
            settings=s3_settings,
            notes="the server streams from the store, so the store's own GET is the floor",
            extra={"mean data frame KiB": s3["frame_kib"]},
        ),
        Result(
            benchmark="download, REST GET /v1/partition, S3 (moto)",
            figure=s3["rest"],
            unit="MiB/s",
            target=">= 60 % of baseline",
            met=s3["rest"] >= 0.6 * s3["presigned"],
            baseline=s3["presigned"],
            baseline_name="bare GETs of the same presigned URLs",
            settings=s3_settings + ", httpx",
            notes="307 to a presigned URL, followed; the baseline skips the redirect",
        ),
    ]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    for r in run(args.smoke):
        print(json.dumps({"benchmark": r.benchmark, "figure": r.figure, "baseline": r.baseline}))


if __name__ == "__main__":
    main()
