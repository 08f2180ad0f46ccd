"""Push latency under load: 10,000 connected sessions, 100 commits/s.

10,000 sessions (100 users x 100 devices) sit synced in load-generator worker
processes, recording every ``change`` they get. A committer worker holds one
more session per user and makes 100 commits/s for 20 s (open loop, each to the
next user in turn; a small file: declare one part of 100 bytes, chunk, commit).
Every commit must reach all 100 devices of its user: a delivery that never
came is *lost*. Latency is from the commit's ``committed`` (taken in the
committer) to each delivery (taken in the receivers); every process reads
CLOCK_MONOTONIC, which on Linux is one clock for the whole machine.

If commits stop being answered (the committer issues them open loop, so any
number may be in flight), the server's database connections by state are
recorded as evidence, the committer is closed (which frees the server), and a
second phase runs with at most 16 commits in flight at once (fewer than the
server's 20 pooled connections), to measure the latency the server reaches.

Baselines, same PostgreSQL, same run: a bare asyncpg LISTEN/NOTIFY round
trip (commit returned -> notified, see push_latency), idle before the load
and sampled every 50 ms during it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import percentile, scratch_dir, server_process
from bench.loadgen import (
    SERVER_FLAGS,
    Worker,
    cpu_seconds,
    cpu_share,
    db_activity,
    maybe_profile,
    now,
    raise_nofile,
    register_users,
    start_sessions,
    total_stats,
    wait_ready,
)
from bench.push_latency import notify_latencies
from bench.report import Result

#: Commits in flight in the second phase: below the server's pool size (server/db.py: 20).
CAPPED_IN_FLIGHT = 16


async def paced_notify(database_url: str, seconds: float, every: float) -> list[float]:
    """Bare NOTIFY (commit returned -> notified, ms), one sample each ``every`` s."""
    listener = await asyncpg.connect(database_url)
    sender = await asyncpg.connect(database_url)
    got: dict[str, float] = {}
    event = asyncio.Event()

    def on_notify(*args: Any) -> None:
        got[args[3]] = now()
        event.set()

    await listener.add_listener("bench_load_baseline", on_notify)
    out: list[float] = []
    end = now() + seconds
    i = 0
    while now() < end:
        event.clear()
        async with sender.transaction():
            await sender.execute("SELECT pg_notify('bench_load_baseline', $1)", str(i))
        acked = now()
        try:
            await asyncio.wait_for(event.wait(), 10)
            out.append((got[str(i)] - acked) * 1000)
        except TimeoutError:
            pass  # a baseline sample that never arrived is left out, not counted as 10 s
        i += 1
        await asyncio.sleep(every)
    await listener.close()
    await sender.close()
    return out


def _phase(
    srv: Any,
    tokens: list[str],
    receivers: list[Worker],
    per_user: int,
    delivered_before: int,
    workdir: Path,
    *,
    tag: str,
    rate: float,
    seconds: float,
    cap: int | None,
    profile: str,
) -> dict[str, Any]:
    """One committer run; returns its commits, stall evidence and the drain time."""
    committer = start_sessions(
        srv.ws,
        tokens,
        len(tokens),
        1,
        workdir,
        tag=tag,
        mode="paced",
        record=False,
        rate=rate,
        count=int(rate * seconds),
        part_size=100,
        max_total_in_flight=cap,
        max_seconds=3 * seconds,  # a capped run whose schedule slips stops issuing then
        finish_timeout=10,
        stop_timeout=5,
    )[0]
    wait_ready([committer], 120)
    time.sleep(2)
    under_load: list[float] = []
    sampler = threading.Thread(
        target=lambda: under_load.extend(asyncio.run(paced_notify(srv.database_url, seconds, 0.05)))
    )
    workers = [*receivers, committer]
    c0, t0 = cpu_seconds(srv.pid, srv.database_url, workers), now()
    profiled = maybe_profile(srv.pid, int(min(15, seconds)), profile)
    committer.send("go")
    committer.expect("going", 30)
    sampler.start()
    while not (st := committer.stats())["paced_done"]:
        time.sleep(0.5)
    commit_end = now()
    cpu = cpu_share(c0, cpu_seconds(srv.pid, srv.database_url, workers), commit_end - t0)
    stall: dict[str, Any] = {}
    if st["commits"] < st["issued"]:
        stall = {
            "answered": st["commits"],
            "issued": st["issued"],
            **asyncio.run(db_activity(srv.database_url)),
        }
    sampler.join()
    profiled()
    result = committer.finish()  # closing its sessions cancels stuck commits
    # Drain: every delivery of the commits answered, or nothing moved for 15 s.
    want = delivered_before + len(result["commits"]) * per_user
    last, moved = -1, now()
    while now() - moved < 15:
        got = total_stats(receivers)["changes"]
        if got >= want:
            break
        if got != last:
            last, moved = got, now()
        time.sleep(0.25)
    drained = now()
    deadline = now() + 30
    while asyncio.run(db_activity(srv.database_url))["busy"] and now() < deadline:
        time.sleep(0.5)
    return {
        "commits": result["commits"],
        "errors": result["errors"],
        "issued": result["issued"],
        "behind": result["behind"],
        "stall": stall,
        "drain_s": drained - commit_end,
        "cpu": cpu,
        "under_load": under_load,
        "delivered": total_stats(receivers)["changes"],
        "cap": cap,
    }


def _figures(phase: dict[str, Any], sessions: list[dict[str, Any]], per_user: int) -> None:
    """Latency and losses of one phase's commits, added to ``phase``."""
    committed: dict[tuple[int, int], float] = {}
    commit_sent: dict[tuple[int, int], float] = {}
    commit_ms = []
    for key, seq, _started, sent, at in phase["commits"]:
        committed[(key, seq)] = at
        commit_sent[(key, seq)] = sent
        commit_ms.append((at - sent) * 1000)
    by_user: dict[int, set[int]] = defaultdict(set)
    for key, seq in committed:
        by_user[key].add(seq)
    latencies: list[float] = []
    from_sent: list[float] = []
    lost = dupes = 0
    for s in sessions:
        want = by_user.get(s["key"], set())
        seen: set[int] = set()
        for seq, t in zip(s["seqs"], s["times"], strict=True):
            if seq in seen:
                dupes += 1
                continue
            seen.add(seq)
            at = committed.get((s["key"], seq))
            if at is not None:
                latencies.append((t - at) * 1000)
                from_sent.append((t - commit_sent[(s["key"], seq)]) * 1000)
        lost += len(want - seen)
    first = min(commit_sent.values(), default=0.0)
    span = max(1e-9, max(committed.values(), default=first) - first)
    phase.update(
        {
            "n_commits": len(committed),
            "commit_rate": len(committed) / span if committed else 0.0,
            "commit_p50": percentile(commit_ms, 50),
            "commit_p99": percentile(commit_ms, 99),
            "deliveries": len(latencies),
            "expected": len(committed) * per_user,
            "lost": lost,
            "dupes": dupes,
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": max(latencies, default=float("nan")),
            "sent_p50": percentile(from_sent, 50),
            "sent_p99": percentile(from_sent, 99),
            "load_base_p50": percentile(phase["under_load"], 50),
            "load_base_p99": percentile(phase["under_load"], 99),
        }
    )
    del phase["commits"], phase["under_load"]


def measure(
    n_sessions: int, n_users: int, rate: float, seconds: float, n_workers: int
) -> dict[str, Any]:
    raise_nofile()
    per_user = n_sessions // n_users
    n_sessions = per_user * n_users
    tmp = scratch_dir("bench-load-")
    with server_process(*SERVER_FLAGS) as srv:
        tokens = register_users(srv.http, "load", n_users)
        base_idle, _ = asyncio.run(notify_latencies(srv.database_url, 500))
        receivers = start_sessions(srv.ws, tokens, n_sessions, n_workers, tmp, tag="rcv")
        ready = wait_ready(receivers, 900)
        time.sleep(3)  # let the connect storm settle
        phases: list[dict[str, Any]] = []
        # Open loop as specified, then (always, so the table keeps the same rows) with
        # at most CAPPED_IN_FLIGHT commits unanswered at once.
        for tag, cap, profile in (
            ("cmt-open", None, "load_latency"),
            ("cmt-capped", CAPPED_IN_FLIGHT, "load_latency_capped"),
        ):
            before = phases[-1]["delivered"] if phases else 0
            phases.append(
                _phase(
                    srv,
                    tokens,
                    receivers,
                    per_user,
                    before,
                    tmp,
                    tag=tag,
                    rate=rate,
                    seconds=seconds,
                    cap=cap,
                    profile=profile,
                )
            )
        sessions = [s for w in receivers for s in w.finish()["sessions"]]
    for p in phases:
        _figures(p, sessions, per_user)
    return {
        "sessions": ready["connected"],
        "users": n_users,
        "closed": sum(s["closed"] is not None for s in sessions),
        "connect_rate": ready["connected"] / ready["seconds"],
        "base_p50": percentile(base_idle, 50),
        "base_p99": percentile(base_idle, 99),
        "phases": phases,
        "workers": n_workers,
        "seconds": seconds,
        "rate": rate,
    }


def _note(p: dict[str, Any]) -> str:
    note = (
        f"{p['n_commits']:,} commits answered of {p['issued']:,} issued "
        f"({p['commit_rate']:.0f}/s; commit sent -> committed p50 {p['commit_p50']:.0f} ms, "
        f"p99 {p['commit_p99']:.0f} ms), {p['deliveries']:,} of {p['expected']:,} deliveries, "
        f"{p['lost']:,} lost, {p['dupes']} duplicated, the last "
        f"{p['drain_s']:.1f} s after the last commit; bare NOTIFY under the same load "
        f"p50 {p['load_base_p50']:.2f} ms, p99 {p['load_base_p99']:.2f} ms; {p['cpu']}"
    )
    if p["cap"]:
        note += f"; the schedule slipped by up to {p['behind']:.1f} s"
    if p["errors"]:
        note += f"; committer errors {p['errors']}"
    return note


def run(smoke: bool = False) -> list[Result]:
    r = measure(50, 5, 10, 2, 1) if smoke else measure(10_000, 100, 100, 20, 4)
    settings = (
        f"{r['sessions']:,} sessions ({r['users']} users x {r['sessions'] // r['users']} "
        f"devices, {r['workers']} load-generator processes), {r['rate']:.0f} commits/s "
        f"for {r['seconds']:.0f} s"
    )
    base = "bare NOTIFY: commit returned -> notified, idle"
    out = []
    for p in r["phases"]:
        capped = p["cap"] is not None
        label = f", at most {p['cap']} commits in flight" if capped else ""
        note = _note(p)
        if p["stall"]:
            st = p["stall"]
            note = (
                f"**commits stopped being answered: {st['answered']:,} of {st['issued']:,} "
                "answered within the window; "
                + ", ".join(f"{k} {v}" for k, v in st.items() if k not in ("answered", "issued"))
                + "** — the commits queue behind the fan-out reads (every session of the user "
                "re-reads the feed per change); " + note
            )
        if r["closed"] and not capped:
            note += f"; {r['closed']} receiving sessions were closed"
        complete = (
            not p["stall"] and p["lost"] == 0 and p["n_commits"] >= 0.95 * r["rate"] * r["seconds"]
        )
        out.append(
            Result(
                benchmark=f"push latency under load{label}: committed -> change, p99",
                figure=p["p99"],
                unit="ms",
                target="p99 <= 100 ms, nothing lost",
                met=complete and p["p99"] <= 100,
                baseline=r["base_p99"],
                baseline_name=base,
                settings=settings + (label if capped else ", open loop"),
                notes=note,
                extra={
                    "lost": float(p["lost"]),
                    "p50 ms": p["p50"],
                    "max ms": p["max"],
                    "commit sent -> change p50 ms": p["sent_p50"],
                    "commit sent -> change p99 ms": p["sent_p99"],
                },
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=10_000, help="receiving sessions")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--rate", type=float, default=100, help="commits per second")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    r = measure(args.n, args.users, args.rate, args.seconds, args.workers)
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
