"""Push latency: ``committed`` on device A -> ``change`` on device B.

Baseline in the same run: a bare asyncpg LISTEN/NOTIFY round trip (commit of
a NOTIFY-ing transaction on one connection -> notification on another) against
the same PostgreSQL the server uses.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import time
from typing import Any

import asyncpg
import msgpack
import websockets

from bench.common import percentile, register, server_process
from bench.report import Result
from protocol.codec import encode


async def _connect(url: str, token: str, device: str) -> Any:
    ws = await websockets.connect(url, max_size=None, compression=None)
    await ws.send(encode({"t": "hello", "v": 1, "token": token, "device": device, "cursor": 0}))
    while msgpack.unpackb(await ws.recv())["t"] != "synced":
        pass
    return ws


async def tessera_latencies(ws_url: str, token: str, n: int) -> tuple[list[float], list[float]]:
    """(committed on A -> change on B, commit sent by A -> change on B), in ms."""
    a = await _connect(ws_url, token, "bench-a")
    b = await _connect(ws_url, token, "bench-b")
    arrivals: dict[int, float] = {}
    done = asyncio.Event()

    async def watch_b() -> None:
        while len(arrivals) < n:
            frame = msgpack.unpackb(await b.recv())
            if frame["t"] == "change":
                arrivals[frame["seq"]] = time.perf_counter()
        done.set()

    watcher = asyncio.create_task(watch_b())
    committed: dict[int, float] = {}
    sent: dict[int, float] = {}
    data = os.urandom(64)
    part = {"size": 64, "sha256": hashlib.sha256(data).digest(), "key": b"k", "salt": b"s"}
    meta = {"name": b"n", "mtime": b"m", "key": b"k", "salt": b"s"}
    for i in range(n):
        await a.send(
            encode({"t": "upload", "rid": i, "kind": "file", "meta": meta, "parts": [part]})
        )
        upload = await _reply(a, i)
        await a.send(
            encode({"t": "chunk", "upload": upload["upload"], "part": 0, "off": 0, "data": data})
        )
        started = time.perf_counter()
        await a.send(encode({"t": "commit", "rid": i, "upload": upload["upload"]}))
        reply = await _reply(a, i)
        committed[reply["seq"]] = time.perf_counter()
        sent[reply["seq"]] = started
    await asyncio.wait_for(done.wait(), 60)
    watcher.cancel()
    await a.close()
    await b.close()
    after_ack = [(arrivals[s] - committed[s]) * 1000 for s in committed]
    round_trip = [(arrivals[s] - sent[s]) * 1000 for s in committed]
    return after_ack, round_trip


async def _reply(ws: Any, rid: int) -> dict[str, Any]:
    while True:
        frame = msgpack.unpackb(await ws.recv())
        if frame.get("rid") == rid:
            assert frame["t"] in ("upload_ok", "committed"), frame
            return frame


async def notify_latencies(database_url: str, n: int) -> tuple[list[float], list[float]]:
    """(commit returned -> notification, transaction begun -> notification), in ms."""
    listener = await asyncpg.connect(database_url)
    sender = await asyncpg.connect(database_url)
    arrivals: dict[str, float] = {}
    got = asyncio.Event()

    def on_notify(*args: Any) -> None:
        arrivals[args[3]] = time.perf_counter()
        got.set()

    await listener.add_listener("bench_baseline", on_notify)
    after_ack, round_trip = [], []
    for i in range(n):
        got.clear()
        started = time.perf_counter()
        async with sender.transaction():
            await sender.execute("SELECT pg_notify('bench_baseline', $1)", str(i))
        acked = time.perf_counter()
        await asyncio.wait_for(got.wait(), 10)
        after_ack.append((arrivals[str(i)] - acked) * 1000)
        round_trip.append((arrivals[str(i)] - started) * 1000)
    await listener.close()
    await sender.close()
    return after_ack, round_trip


def measure(n: int) -> dict[str, float]:
    with server_process() as srv:
        token = register(srv.http, "bench-latency")

        async def measure() -> tuple[tuple[list[float], list[float]], ...]:
            base = await notify_latencies(srv.database_url, n)
            ours = await tessera_latencies(srv.ws, token, n)
            return ours, base

        (ours_ack, ours_rt), (base_ack, base_rt) = asyncio.run(measure())
    return {
        "n": len(ours_ack),
        "p50": percentile(ours_ack, 50),
        "p99": percentile(ours_ack, 99),
        "rt_p50": percentile(ours_rt, 50),
        "rt_p99": percentile(ours_rt, 99),
        "base_p50": percentile(base_ack, 50),
        "base_p99": percentile(base_ack, 99),
        "base_rt_p50": percentile(base_rt, 50),
        "base_rt_p99": percentile(base_rt, 99),
    }


def run(smoke: bool = False) -> list[Result]:
    n = 20 if smoke else 1000
    r = measure(n)
    settings = f"{r['n']} commits, LocalStore, embedded PostgreSQL"
    base = "bare asyncpg LISTEN/NOTIFY round trip"
    return [
        Result(
            benchmark="push latency, idle: committed on A -> change on B, p50",
            figure=r["p50"],
            unit="ms",
            target="p50 <= 3 ms",
            met=r["p50"] <= 3,
            baseline=r["base_p50"],
            baseline_name="bare NOTIFY: commit returned -> notified",
            settings=settings,
        ),
        Result(
            benchmark="push latency, idle: committed on A -> change on B, p99",
            figure=r["p99"],
            unit="ms",
            target="p99 <= 15 ms",
            met=r["p99"] <= 15,
            baseline=r["base_p99"],
            baseline_name="bare NOTIFY: commit returned -> notified",
            settings=settings,
        ),
        Result(
            benchmark="push round trip: commit sent by A -> change on B, p50",
            figure=r["rt_p50"],
            unit="ms",
            target="(no target; includes the commit itself)",
            met=None,
            baseline=r["base_rt_p50"],
            baseline_name=f"{base}: begin -> notified",
            settings=settings,
            extra={"p99 ms": r["rt_p99"], "baseline p99 ms": r["base_rt_p99"]},
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=1000, help="commits to measure")
    args = parser.parse_args()
    r = measure(args.n)
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
