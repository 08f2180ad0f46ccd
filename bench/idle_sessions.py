"""Idle sessions: memory of the server process per authenticated, synced session.

RSS of the ``tessera-server`` process (psutil; the embedded PostgreSQL is other
processes and not counted) after a warm-up with no sessions, then with
10,000 sessions that said ``hello`` and got ``synced`` and now sit idle,
opened by load-generator worker processes. KiB per session = growth / count.
The connect rate (hello -> synced for all of them, 64 handshakes in flight
per worker) is reported too.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import psutil

from bench.common import scratch_dir, server_process
from bench.loadgen import (
    SERVER_FLAGS,
    raise_nofile,
    register_users,
    start_sessions,
    total_stats,
    wait_ready,
)
from bench.report import Result

KiB = 1024


def settle_rss(proc: psutil.Process, least: float, most: float) -> tuple[int, float]:
    """Sample RSS each second for at least ``least`` s until three samples in a row are
    within 0.5 %; (last RSS, seconds waited)."""
    started = time.monotonic()
    samples: list[int] = []
    while True:
        samples.append(proc.memory_info().rss)
        waited = time.monotonic() - started
        last = samples[-3:]
        if waited >= least and len(last) == 3 and (max(last) - min(last)) <= 0.005 * max(last):
            return samples[-1], waited
        if waited >= most:
            return samples[-1], waited
        time.sleep(1)


def measure(n_sessions: int, n_users: int, n_workers: int, settle: float) -> dict[str, Any]:
    raise_nofile()  # the server inherits it
    tmp = scratch_dir("bench-idle-")
    with server_process(*SERVER_FLAGS) as srv:
        proc = psutil.Process(srv.pid)
        tokens = register_users(srv.http, "idle", n_users)
        # Warm-up: open and close a batch, so lazy imports, pool connections and
        # caches are in the "0 sessions" figure and not charged to the sessions.
        warm = start_sessions(
            srv.ws, tokens, min(200, n_sessions), 1, tmp, tag="warm", record=False
        )
        wait_ready(warm, 120)
        for w in warm:
            w.finish()
        rss0, _ = settle_rss(proc, settle, 60)
        fds0 = proc.num_fds()

        workers = start_sessions(
            srv.ws, tokens, n_sessions, n_workers, tmp, tag="idle", record=False
        )
        ready = wait_ready(workers, 900)
        rss1, waited = settle_rss(proc, settle, 90)
        fds1 = proc.num_fds()
        stats = total_stats(workers)
        for w in workers:
            w.finish()
    growth = rss1 - rss0
    return {
        "sessions": ready["connected"],
        "failures": ready["failures"],
        "users": n_users,
        "closed": stats["closed"],
        "rss0_mib": rss0 / KiB / KiB,
        "rss1_mib": rss1 / KiB / KiB,
        "kib_per_session": growth / KiB / max(1, ready["connected"]),
        "connect_s": ready["seconds"],
        "connect_rate": ready["connected"] / ready["seconds"] if ready["seconds"] else 0.0,
        "connect_p50_ms": ready["connect_p50"] * 1000,
        "connect_max_ms": ready["connect_max"] * 1000,
        "settle_s": waited,
        "server_fds": fds1 - fds0,
        "workers": n_workers,
    }


def run(smoke: bool = False) -> list[Result]:
    n = 50 if smoke else 10_000
    r = measure(n, 5 if smoke else 100, 1 if smoke else 4, 1 if smoke else 5)
    settings = (
        f"{r['sessions']:,} sessions of {r['users']} users, {r['workers']} load-generator "
        "processes, embedded PostgreSQL"
    )
    problems = []
    if r["sessions"] < n:
        problems.append(f"only {r['sessions']} of {n} connected: {r['failures']}")
    if r["closed"]:
        problems.append(f"{r['closed']} sessions were closed while idle")
    note = (
        f"server RSS {r['rss0_mib']:.0f} MiB with no sessions (after a warm-up), "
        f"{r['rss1_mib']:.0f} MiB with them ({r['settle_s']:.0f} s to settle); "
        f"server fds +{r['server_fds']:,}. Centrifugo (Go) is about 30 KB per connection."
    )
    if problems:
        note += " " + "; ".join(problems)
    ok = r["sessions"] >= n and not r["closed"]
    return [
        Result(
            benchmark="idle sessions: server memory per authenticated session",
            figure=r["kib_per_session"],
            unit="KiB/session",
            target="10,000 sessions, <= 48 KiB each",
            met=ok and r["kib_per_session"] <= 48,
            baseline=None,
            baseline_name="",
            settings=settings,
            notes=note,
            extra={
                "RSS with 0 sessions MiB": r["rss0_mib"],
                "RSS with sessions MiB": r["rss1_mib"],
            },
        ),
        Result(
            benchmark="idle sessions: connect rate (hello -> synced)",
            figure=r["connect_rate"],
            unit="sessions/s",
            target="(no target)",
            met=None,
            settings=f"{settings}, 64 handshakes in flight per process",
            notes=f"{r['sessions']:,} sessions in {r['connect_s']:.1f} s",
            extra={"p50 ms": r["connect_p50_ms"], "max ms": r["connect_max_ms"]},
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=10_000, help="sessions")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(measure(args.n, args.users, args.workers, 5), indent=1))


if __name__ == "__main__":
    main()
