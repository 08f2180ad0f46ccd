"""Server memory during a 1 GiB upload: RSS growth over the RSS before it.

The server is warmed up first with an upload of a few MiB (imports, pools,
worker threads), then its RSS (``psutil``, the server process only; the
embedded PostgreSQL is a separate process) is sampled every 50 ms from the
bench process while the lean client of :mod:`bench.upload` sends 1 GiB. The
bound comes from the limits the server announces in ``welcome``: credit keeps
at most a window of chunk data in flight, and a part being stored may be held
whole, hence ``2 x window + 2 x max_partition``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.baselines import MiB, Payload, fmt_size
from bench.common import register, scratch_dir, server_process
from bench.report import Result
from bench.upload import S3_FULL_PARTS, moto, payload_for, s3_flags, tessera_upload

INTERVAL = 0.05
WARM_PARTS = 4


@dataclass
class Sampler:
    pid: int
    samples: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.perf_counter() of each sample
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        proc = psutil.Process(self.pid)
        while not self._stop.is_set():
            self.samples.append(proc.memory_info().rss)
            self.times.append(time.perf_counter())
            self._stop.wait(INTERVAL)

    @contextmanager
    def running(self) -> Iterator[Sampler]:
        thread = threading.Thread(target=self.run, name="rss-sampler", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


def rss_now(pid: int, seconds: float = 1.0) -> int:
    """The median RSS over ``seconds`` of samples."""
    sampler = Sampler(pid)
    with sampler.running():
        time.sleep(seconds)
    return int(statistics.median(sampler.samples))


def measure(payload: Payload, *flags: str, data_dir: Path | None = None) -> dict[str, float]:
    with server_process(*flags, data_dir=data_dir) as srv:
        token = register(srv.http, "bench-memory")
        warm = Payload(payload.part_size, WARM_PARTS, distinct=WARM_PARTS)
        limits = asyncio.run(tessera_upload(srv.ws, token, warm)).limits
        before = rss_now(srv.pid)
        sampler = Sampler(srv.pid)
        with sampler.running():
            run = asyncio.run(tessera_upload(srv.ws, token, payload))
        after = rss_now(srv.pid)
    peak = max(sampler.samples)

    def peak_in(start: float, end: float) -> float:
        inside = [
            m for t, m in zip(sampler.times, sampler.samples, strict=True) if start <= t <= end
        ]
        return (max(inside, default=before) - before) / MiB

    return {
        "receiving": peak_in(run.started, run.all_ok),
        "committing": peak_in(run.all_ok, run.finished),
        "growth": (peak - before) / MiB,
        "bound": (2 * limits["window"] + 2 * limits["max_partition"]) / MiB,
        "before": before / MiB,
        "peak": peak / MiB,
        "after": (after - before) / MiB,
        "samples": len(sampler.samples),
        "mib_s": payload.total / MiB / run.seconds,
        "window": limits["window"],
        "max_partition": limits["max_partition"],
    }


def _result(name: str, payload: Payload, r: dict[str, float], extra_settings: str) -> Result:
    return Result(
        benchmark=name,
        figure=r["growth"],
        unit="MiB",
        target=(
            f"growth <= 2 x window + 2 x max_partition = {r['bound']:.0f} MiB "
            f"(window {fmt_size(int(r['window']))}, max_partition "
            f"{fmt_size(int(r['max_partition']))})"
        ),
        met=r["growth"] <= r["bound"],
        baseline=r["before"],
        baseline_name="RSS before the upload (after a warm-up upload)",
        settings=f"{payload.describe()}{extra_settings}, RSS every {INTERVAL * 1000:.0f} ms",
        notes=f"peak over the pre-upload RSS, {r['samples']:.0f} samples at {r['mib_s']:.0f} MiB/s",
        extra={
            "peak RSS MiB": r["peak"],
            "growth until the last part_ok MiB": r["receiving"],
            "growth during the commit MiB": r["committing"],
            "growth still held 1 s after MiB": r["after"],
        },
    )


def run(smoke: bool = False) -> list[Result]:
    payload = payload_for(smoke)
    s3_payload = payload_for(smoke, S3_FULL_PARTS)
    data_dir = scratch_dir("upload-memory-")  # both servers: PostgreSQL initialised once
    local = measure(payload, data_dir=data_dir)
    with moto() as cfg:
        s3 = measure(s3_payload, *s3_flags(cfg, uuid.uuid4().hex[:10]), data_dir=data_dir)
    return [
        _result("server memory during an upload, LocalStore", payload, local, ""),
        _result("server memory during an upload, S3 (moto)", s3_payload, s3, " (moto is slow)"),
    ]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    for r in run(args.smoke):
        print(json.dumps({"benchmark": r.benchmark, "figure": r.figure, "extra": r.extra}))


if __name__ == "__main__":
    main()
