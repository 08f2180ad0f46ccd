"""Catch-up: a device that missed 100,000 changes.

Setup (not measured): 100,000 files of one user are written straight into
the database with ``INSERT ... SELECT generate_series`` (objects, one
partition row each, access-list rows with seqs 1..100,000, and
``users.change_seq = 100,000``; the blobs themselves are not needed), then
VACUUM ANALYZE. Measured: a device in a load-generator process connects with
``cursor 0``; from sending ``hello`` to receiving ``synced``, counting the
100,000 ``change`` frames (each must arrive, in seq order). Repeated three
times with a fresh device each time; worst and median reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from typing import Any

import asyncpg

from bench.common import register, scratch_dir, server_process
from bench.loadgen import (
    SERVER_FLAGS,
    Worker,
    cpu_seconds,
    cpu_share,
    maybe_profile,
    now,
    raise_nofile,
)
from bench.report import Result


async def seed(database_url: str, username: str, n: int) -> int:
    """``n`` one-part files of ``username`` with seqs 1..n, straight into the tables."""
    conn = await asyncpg.connect(database_url)
    try:
        user = await conn.fetchval("SELECT id FROM users WHERE username = $1", username)
        async with conn.transaction():
            # Setup, not traffic: skip the per-row NOTIFY trigger (and FK checks).
            await conn.execute("SET LOCAL session_replication_role = replica")
            # Sizes like real ciphertext: 64-byte name, 28-byte mtime, 60-byte key.
            await conn.execute(
                """INSERT INTO objects (owner_id, kind, rev, size, enc_name, enc_mtime,
                       enc_key, salt, origin)
                   SELECT $1, 'file', 1, 100,
                          sha256(int8send(g)) || sha256(int8send(-g)),
                          substr(sha256(int8send(g + 1)), 1, 28),
                          sha256(int8send(g + 2)) || substr(sha256(int8send(g + 3)), 1, 28),
                          substr(sha256(int8send(g + 4)), 1, 16), 'seed-device'
                   FROM generate_series(1, $2) g""",
                user,
                n,
            )
            await conn.execute(
                """INSERT INTO partitions (id, object_id, rev, idx, store_key, size, sha256,
                       salt, enc_key)
                   SELECT p.id, p.object_id, 1, 0, 'partitions/' || $1::text || '/' || p.id,
                          100, sha256(int8send(p.id)), substr(sha256(int8send(-p.id)), 1, 16),
                          sha256(int8send(p.id + 1)) || substr(sha256(int8send(p.id + 2)), 1, 28)
                   FROM (SELECT nextval('partitions_id_seq') AS id, o.id AS object_id
                         FROM objects o WHERE o.owner_id = $1) p""",
                user,
            )
            await conn.execute(
                """UPDATE objects o SET head_partition = p.id FROM partitions p
                   WHERE p.object_id = o.id AND o.owner_id = $1""",
                user,
            )
            await conn.execute(
                """INSERT INTO access_list (user_id, object_id, role, status, seq)
                   SELECT $1, id, 'owner', 'active', row_number() OVER (ORDER BY id)
                   FROM objects WHERE owner_id = $1""",
                user,
            )
            await conn.execute(
                "UPDATE users SET change_seq = $2::bigint, used = $2::bigint * 100 WHERE id = $1",
                user,
                n,
            )
        for table in ("objects", "partitions", "access_list", "users"):
            await conn.execute(f"VACUUM ANALYZE {table}")
        return int(await conn.fetchval("SELECT change_seq FROM users WHERE id = $1", user))
    finally:
        await conn.close()


def measure(n: int, runs: int) -> dict[str, Any]:
    raise_nofile()
    tmp = scratch_dir("bench-catchup-")
    with server_process(*SERVER_FLAGS) as srv:
        token = register(srv.http, "catchup")
        head = asyncio.run(seed(srv.database_url, "catchup", n))
        worker = Worker(
            {"mode": "catchup", "url": srv.ws, "sessions": [[token, "catchup", 0, 0]]},
            tmp,
            "catchup",
        )
        worker.expect("ready", 60)
        got = []
        c0, t0 = cpu_seconds(srv.pid, srv.database_url, [worker]), now()
        profiled = maybe_profile(srv.pid, 10, "catchup")
        for i in range(runs):
            worker.send("go", device=f"catchup-{i}")
            got.append(worker.expect("caught_up", 600))
        cpu = cpu_share(c0, cpu_seconds(srv.pid, srv.database_url, [worker]), now() - t0)
        profiled()
        worker.finish()
    elapsed = [g["elapsed"] for g in got]
    return {
        "n": n,
        "head": head,
        "runs": got,
        "worst": max(elapsed),
        "median": statistics.median(elapsed),
        "complete": all(g["changes"] == n and g["ordered"] for g in got),
        "cpu": cpu,
    }


def run(smoke: bool = False) -> list[Result]:
    r = measure(1000 if smoke else 100_000, 1 if smoke else 3)
    settings = (
        f"{r['n']:,} changes (one-part files, seeded in the database), cursor 0, "
        f"{len(r['runs'])} runs"
    )
    per_run = "; ".join(
        f"{g['elapsed']:.2f} s ({g['changes']:,} changes, welcome after "
        f"{g['welcome'] * 1000:.0f} ms, client CPU {g['client_cpu']:.1f} s)"
        for g in r["runs"]
    )
    note = f"per run: {per_run}; {r['cpu']}"
    if not r["complete"]:
        note += f"; **incomplete or out of order** (head {r['head']})"
    best_rate = r["n"] / min(g["elapsed"] for g in r["runs"])
    return [
        Result(
            benchmark="catch-up: hello -> synced after 100,000 missed changes, worst run",
            figure=r["worst"],
            unit="s",
            target="synced <= 5 s after hello",
            met=r["complete"] and r["worst"] <= 5,
            settings=settings,
            notes=note,
            extra={"median s": r["median"], "changes/s (best run)": best_rate},
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=100_000, help="missed changes")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.n, args.runs), indent=1))


if __name__ == "__main__":
    main()
