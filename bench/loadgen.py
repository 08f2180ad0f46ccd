"""Load-generator worker: thousands of WebSocket sessions in one process.

The benchmarks never run load inside the server, nor (for the big ones) in
their own process: they start several of these workers with
``python -m bench.loadgen SPEC.json`` and drive them over stdin/stdout, one
JSON object per line.

Spec (JSON file)::

    {"mode": "idle" | "commit_loop" | "paced" | "catchup",
     "url": "ws://...", "out": "/path/result.json",
     "sessions": [[token, device, user_key, cursor], ...],
     "concurrency": 64,          # handshakes in flight while connecting
     "record": true,             # keep (seq, arrival time) of every change
     # commit_loop: part_size, stop_timeout, put (one ``put`` frame per file)
     # paced: rate, count, part_size, max_in_flight (per session),
     #        max_total_in_flight, max_seconds, finish_timeout, stop_timeout}

Modes: ``idle`` sessions only receive; ``commit_loop`` sessions each commit
small files back to back; ``paced`` issues ``count`` commits at ``rate`` per
second round-robin over its sessions (open loop); ``catchup`` opens one
session per ``go`` and times ``hello`` -> ``synced``.

Events written to stdout: ``ready`` (all sessions connected and ``synced``),
``stats`` (answer to the ``stats`` command), ``done`` (results written to
``out``), ``error``. Commands read from stdin: ``go``, ``stats``, ``stop``.

Times are ``time.monotonic()``, i.e. CLOCK_MONOTONIC, which on Linux is one
clock for every process of the machine, so an arrival time taken here can be
subtracted from a commit time taken in another process.

The parent-side helpers (:class:`Worker`, :func:`raise_nofile`,
:func:`profile_server`, :func:`summarise_profile`) live here too, so each
benchmark module stays about its own measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import resource
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack
import websockets

now = time.monotonic  # CLOCK_MONOTONIC: system-wide on Linux

REPO = Path(__file__).resolve().parent.parent


def raise_nofile() -> int:
    """Soft open-files limit up to the hard one; returns the new soft limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _pack(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


_unpack = msgpack.unpackb


async def ws_connect(url: str) -> Any:
    return await websockets.connect(
        url,
        compression=None,
        max_size=None,
        ping_interval=None,  # the server pings; keep the client side idle
        open_timeout=120,
        close_timeout=2,
    )


class Sess:
    """One session of a worker: its socket, what it received, its pending requests."""

    def __init__(self, token: str, device: str, key: Any, cursor: int) -> None:
        self.token = token
        self.device = device
        self.key = key
        self.cursor = cursor
        self.ws: Any = None
        self.seqs: list[int] = []
        self.times: list[float] = []
        self.changes = 0
        self.synced_at = 0.0
        self.closed: str | None = None
        self.rid = 0
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.parts: dict[str, asyncio.Future[dict[str, Any]]] = {}
        #: When the last ``commit`` frame left (for "commit sent -> ..." figures).
        self.commit_sent = 0.0

    async def open(self, url: str) -> dict[str, Any]:
        """Connect, hello, read up to ``synced``; return the welcome frame."""
        self.ws = await ws_connect(url)
        await self.ws.send(
            _pack(
                {
                    "t": "hello",
                    "v": 1,
                    "token": self.token,
                    "device": self.device,
                    "cursor": self.cursor,
                }
            )
        )
        welcome: dict[str, Any] = {}
        while True:
            frame = _unpack(await self.ws.recv())
            t = frame["t"]
            if t == "welcome":
                welcome = frame
            elif t == "change":
                self.changes += 1
            elif t == "synced":
                self.synced_at = now()
                return welcome
            elif t == "error":
                raise RuntimeError(f"error before synced: {frame}")

    async def read_forever(self, record: bool) -> None:
        """Dispatch every frame until the socket closes: changes are counted (and
        timed), replies resolve the futures of requests in flight."""
        ws = self.ws
        try:
            async for message in ws:
                frame = _unpack(message)
                t = frame["t"]
                if t == "change":
                    self.changes += 1
                    if record:
                        self.times.append(now())
                        self.seqs.append(frame["seq"])
                    continue
                rid = frame.get("rid")
                if rid is not None:
                    fut = self.replies.pop(rid, None)
                    if fut is not None and not fut.done():
                        fut.set_result(frame)
                    continue
                upload = frame.get("upload")
                if upload is not None and t in ("part_ok", "error"):
                    pfut = self.parts.pop(upload, None)
                    if pfut is not None and not pfut.done():
                        pfut.set_result(frame)
        except websockets.ConnectionClosed as exc:
            self.closed = f"{exc.rcvd.code if exc.rcvd else 'no close frame'}"
        else:
            rcvd = ws.close_code
            self.closed = str(rcvd)
        for fut in [*self.replies.values(), *self.parts.values()]:
            if not fut.done():
                fut.set_exception(ConnectionError(f"session closed ({self.closed})"))

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        self.rid += 1
        rid = frame["rid"] = self.rid
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[rid] = fut
        await self.ws.send(_pack(frame))
        return await fut

    async def small_commit(self, size: int, wait_part: bool) -> tuple[str, dict[str, Any]]:
        """Declare one part of ``size`` bytes, send it, (wait for part_ok,) commit.

        Returns ("ok", committed frame) or (error code, error frame).
        """
        data = os.urandom(size)
        part = {"size": size, "sha256": hashlib.sha256(data).digest(), "key": b"k", "salt": b"s"}
        meta = {"name": os.urandom(48), "mtime": os.urandom(28), "key": b"k" * 60, "salt": b"s"}
        reply = await self.request({"t": "upload", "kind": "file", "meta": meta, "parts": [part]})
        if reply["t"] != "upload_ok":
            return str(reply.get("code", reply["t"])), reply
        upload = reply["upload"]
        pfut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.parts[upload] = pfut
        chunk = {"t": "chunk", "upload": upload, "part": 0, "off": 0, "data": data}
        await self.ws.send(_pack(chunk))
        if wait_part:
            got = await pfut
            if got["t"] != "part_ok":
                return str(got.get("code", got["t"])), got
        else:
            self.parts.pop(upload, None)
        sent = self.commit_sent = now()
        reply = await self.request({"t": "commit", "upload": upload})
        if reply["t"] != "committed":
            return str(reply.get("code", reply["t"])), reply
        reply["sent_at"] = sent
        return "ok", reply

    async def small_put(self, size: int) -> tuple[str, dict[str, Any]]:
        """The same file as ``small_commit`` in one ``put`` (declare, data and commit
        in one frame). One put in flight per session: far below the credit window."""
        data = os.urandom(size)
        part = {"size": size, "sha256": hashlib.sha256(data).digest(), "key": b"k", "salt": b"s"}
        meta = {"name": os.urandom(48), "mtime": os.urandom(28), "key": b"k" * 60, "salt": b"s"}
        upload = secrets.token_urlsafe(16)
        sent = self.commit_sent = now()
        reply = await self.request(
            {"t": "put", "upload": upload, "meta": meta, "part": part, "data": data}
        )
        if reply["t"] != "committed":
            return str(reply.get("code", reply["t"])), reply
        reply["sent_at"] = sent
        return "ok", reply


# ---------------------------------------------------------------- the worker


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class _Commands:
    """stdin lines -> an asyncio queue (a thread, so the event loop never blocks)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def pump() -> None:
            for line in sys.stdin:
                if line.strip():
                    loop.call_soon_threadsafe(self.queue.put_nowait, json.loads(line))
            loop.call_soon_threadsafe(self.queue.put_nowait, {"cmd": "stop"})

        threading.Thread(target=pump, daemon=True).start()

    async def get(self) -> dict[str, Any]:
        return await self.queue.get()


async def _connect_all(spec: dict[str, Any], sessions: list[Sess]) -> dict[str, Any]:
    sem = asyncio.Semaphore(int(spec.get("concurrency", 64)))
    failures: Counter[str] = Counter()
    durations: list[float] = []

    async def one(s: Sess) -> None:
        async with sem:
            for attempt in range(3):
                started = now()
                try:
                    await s.open(spec["url"])
                    durations.append(now() - started)
                    return
                except Exception as exc:
                    failures[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                    if s.ws is not None:
                        with contextlib.suppress(Exception):
                            await s.ws.close()
                        s.ws = None
                    if attempt == 2:
                        return
                    await asyncio.sleep(0.5 * (attempt + 1))

    started = now()
    await asyncio.gather(*(one(s) for s in sessions))
    durations.sort()
    return {
        "connected": sum(s.ws is not None for s in sessions),
        "failures": dict(failures),
        "started": started,
        "finished": now(),
        "connect_p50": durations[len(durations) // 2] if durations else 0.0,
        "connect_max": durations[-1] if durations else 0.0,
    }


async def _worker(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    commands = _Commands(loop)
    mode = spec["mode"]
    sessions = [Sess(t, d, k, int(c)) for t, d, k, c in spec["sessions"]]
    record = bool(spec.get("record", True))

    if mode == "catchup":
        await _catchup(spec, sessions[0], commands)
        return

    info = await _connect_all(spec, sessions)
    live = [s for s in sessions if s.ws is not None]
    readers = [asyncio.create_task(s.read_forever(record)) for s in live]
    _emit({"ev": "ready", **info})

    #: (user key, seq, upload sent, commit sent, committed received)
    commits: list[tuple[Any, int, float, float, float]] = []
    errors: Counter[str] = Counter()
    stop = asyncio.Event()
    drivers: list[asyncio.Task[None]] = []

    async def commit_loop(s: Sess) -> None:
        size = int(spec.get("part_size", 1024))
        one_frame = bool(spec.get("put"))
        while not stop.is_set():
            sent = now()
            try:
                if one_frame:
                    code, frame = await s.small_put(size)
                else:
                    code, frame = await s.small_commit(size, wait_part=True)
            except (ConnectionError, websockets.ConnectionClosed) as exc:
                errors[f"session closed: {exc}"] += 1
                return
            if code == "ok":
                commits.append((s.key, frame["seq"], sent, frame["sent_at"], now()))
            else:
                errors[code] += 1
                await asyncio.sleep(0.05)

    issued = 0
    behind = 0.0  # seconds the schedule slipped, at most (total cap reached)

    async def paced() -> None:
        """Open loop: commit k is issued at t0 + k / rate on session k % n. With
        ``max_total_in_flight``, issuing waits while that many are unanswered
        (the schedule then slips; ``behind`` says how far)."""
        nonlocal issued, behind
        rate = float(spec["rate"])
        total = int(spec["count"])
        size = int(spec.get("part_size", 100))
        cap = int(spec.get("max_in_flight", 32))
        total_cap = asyncio.Semaphore(int(spec.get("max_total_in_flight") or 1_000_000))
        in_flight: Counter[int] = Counter()
        tasks: set[asyncio.Task[None]] = set()

        async def one(i: int, s: Sess) -> None:
            sent = now()
            try:
                code, frame = await s.small_commit(size, wait_part=False)
            except (ConnectionError, websockets.ConnectionClosed) as exc:
                errors[f"session closed: {exc}"] += 1
                return
            finally:
                in_flight[i] -= 1
                total_cap.release()
            if code == "ok":
                commits.append((s.key, frame["seq"], sent, frame["sent_at"], now()))
            else:
                errors[code] += 1

        t0 = now() + 0.05
        give_up = t0 + float(spec.get("max_seconds") or 1e9)
        for k in range(total):
            if now() > give_up:
                errors["not issued: max_seconds passed"] += total - k
                break
            due = t0 + k / rate
            if due > now():
                await asyncio.sleep(due - now())
            i = k % len(live)
            if in_flight[i] >= cap:
                errors["skipped: session had max_in_flight commits pending"] += 1
                continue
            await total_cap.acquire()
            behind = max(behind, now() - due)
            in_flight[i] += 1
            issued += 1
            task = asyncio.create_task(one(i, live[i]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=float(spec.get("finish_timeout", 120)))

    def stats() -> dict[str, Any]:
        return {
            "ev": "stats",
            "changes": sum(s.changes for s in sessions),
            "closed": sum(s.closed is not None for s in live),
            "commits": len(commits),
            "issued": issued,
            "behind": behind,
            "errors": dict(errors),
            "paced_done": bool(drivers) and all(d.done() for d in drivers),
        }

    while True:
        cmd = (await commands.get())["cmd"]
        if cmd == "go":
            if mode == "commit_loop":
                drivers = [asyncio.create_task(commit_loop(s)) for s in live]
            elif mode == "paced":
                drivers = [asyncio.create_task(paced())]
            _emit({"ev": "going", "at": now()})
        elif cmd == "stats":
            _emit(stats())
        elif cmd == "stop":
            stop.set()
            if drivers:
                _, late = await asyncio.wait(drivers, timeout=float(spec.get("stop_timeout", 30)))
                for d in late:  # e.g. waiting for a reply a stuck server never sends
                    d.cancel()
            result = {
                **info,
                **stats(),
                "commits": commits,
                "sessions": [
                    {"key": s.key, "seqs": s.seqs, "times": s.times, "closed": s.closed}
                    for s in sessions
                ]
                if record
                else [],
            }
            await asyncio.to_thread(Path(spec["out"]).write_text, json.dumps(result))
            for s in live:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(s.ws.close(), 2)
            for r in readers:
                r.cancel()
            _emit({"ev": "done"})
            return


async def _catchup(spec: dict[str, Any], s: Sess, commands: _Commands) -> None:
    """One device with an old cursor: time ``hello`` -> ``synced``, count the changes."""
    _emit({"ev": "ready", "connected": 1})
    runs: list[dict[str, Any]] = []
    while True:
        cmd = await commands.get()
        if cmd["cmd"] == "stop":
            await asyncio.to_thread(Path(spec["out"]).write_text, json.dumps({"runs": runs}))
            _emit({"ev": "done"})
            return
        if cmd["cmd"] != "go":
            continue
        ws = await ws_connect(spec["url"])
        device = cmd.get("device", s.device)
        cpu0 = time.process_time()
        sent = now()
        await ws.send(
            _pack({"t": "hello", "v": 1, "token": s.token, "device": device, "cursor": s.cursor})
        )
        welcome_at = first_at = 0.0
        changes = 0
        last_seq = 0
        ordered = True
        async for message in ws:
            frame = _unpack(message)
            t = frame["t"]
            if t == "change":
                if not changes:
                    first_at = now()
                changes += 1
                seq = frame["seq"]
                ordered = ordered and seq > last_seq
                last_seq = seq
            elif t == "welcome":
                welcome_at = now()
            elif t == "synced":
                break
            elif t == "error":
                raise RuntimeError(f"catch-up error: {frame}")
        synced = now()
        cpu = time.process_time() - cpu0
        await ws.close()
        run = {
            "elapsed": synced - sent,
            "welcome": welcome_at - sent,
            "first_change": first_at - sent if changes else None,
            "changes": changes,
            "last_seq": last_seq,
            "ordered": ordered,
            "client_cpu": cpu,
        }
        runs.append(run)
        _emit({"ev": "caught_up", **run})


def main() -> None:
    raise_nofile()
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        runner(_worker(spec))
    except Exception as exc:
        _emit({"ev": "error", "error": f"{type(exc).__name__}: {exc}"})
        raise


# ------------------------------------------------------------ parent side


class WorkerError(RuntimeError):
    """A load-generator worker process failed or said something unexpected."""


class Worker:
    """A ``bench.loadgen`` subprocess, driven line by line."""

    def __init__(self, spec: dict[str, Any], workdir: Path, name: str) -> None:
        self.name = name
        spec_path = workdir / f"{name}.spec.json"
        self.out = workdir / f"{name}.out.json"
        spec = {**spec, "out": str(self.out)}
        spec_path.write_text(json.dumps(spec))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", str(spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=REPO,
        )
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self._events.put(json.loads(line))
        self._events.put(None)

    def send(self, cmd: str, **extra: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **extra}) + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = now() + timeout
        while True:
            try:
                got = self._events.get(timeout=max(0.01, deadline - now()))
            except queue.Empty:
                raise WorkerError(f"{self.name}: no {event!r} within {timeout}s") from None
            if got is None:
                raise WorkerError(f"{self.name}: exited with {self.proc.wait()}")
            if got.get("ev") == "error":
                raise WorkerError(f"{self.name}: {got.get('error')}")
            if got.get("ev") == event:
                return got

    def stats(self, timeout: float = 30) -> dict[str, Any]:
        self.send("stats")
        return self.expect("stats", timeout)

    def finish(self, timeout: float = 120) -> dict[str, Any]:
        self.send("stop")
        self.expect("done", timeout)
        result: dict[str, Any] = json.loads(self.out.read_text())
        self.close()
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def split(items: list[Any], n: int) -> list[list[Any]]:
    """``items`` in ``n`` nearly equal contiguous slices."""
    size, rest = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < rest else 0)
        out.append(items[start:end])
        start = end
    return out


def total_stats(workers: Iterable[Worker]) -> dict[str, Any]:
    stats = [w.stats() for w in workers]
    errors: Counter[str] = Counter()
    for s in stats:
        errors.update(s["errors"])
    return {
        "changes": sum(s["changes"] for s in stats),
        "closed": sum(s["closed"] for s in stats),
        "commits": sum(s["commits"] for s in stats),
        "issued": sum(s["issued"] for s in stats),
        "errors": dict(errors),
        "paced_done": all(s["paced_done"] for s in stats),
    }


#: Server flags every session-scale benchmark needs: limits it must exceed, and a
#: cheap password hash so registering a hundred users is setup, not the benchmark.
SERVER_FLAGS = (
    "--max-sessions-per-user",
    "20000",
    "--frame-rate",
    "100000",
    "--login-max-failures",
    "1000000",
    "--access-ttl",
    "3600",
    "--argon2-memory-cost",
    "8192",
    "--argon2-time-cost",
    "1",
)


def register_users(http: str, prefix: str, n: int) -> list[str]:
    """Access tokens of ``n`` fresh users ``prefix-0`` ... (setup, not measured)."""
    from bench.common import register

    return [register(http, f"{prefix}-{i}") for i in range(n)]


def start_sessions(
    url: str,
    tokens: list[str],
    n_sessions: int,
    n_workers: int,
    workdir: Path,
    *,
    tag: str,
    mode: str = "idle",
    concurrency: int = 64,
    record: bool = True,
    **options: Any,
) -> list[Worker]:
    """``n_sessions`` sessions (session i belongs to user i % len(tokens), key = that
    index, device ``tag-i``) spread over ``n_workers`` worker processes; returns
    without waiting for them to connect (see :func:`wait_ready`)."""
    sessions = [
        [tokens[i % len(tokens)], f"{tag}-{i}", i % len(tokens), 0] for i in range(n_sessions)
    ]
    return [
        Worker(
            {
                "mode": mode,
                "url": url,
                "sessions": chunk,
                "concurrency": concurrency,
                "record": record,
                **options,
            },
            workdir,
            f"{tag}-w{w}",
        )
        for w, chunk in enumerate(split(sessions, n_workers))
    ]


def wait_ready(workers: list[Worker], timeout: float) -> dict[str, Any]:
    """Wait for every worker's ``ready``; the connect figures of the whole group."""
    ready = [w.expect("ready", timeout) for w in workers]
    failures: Counter[str] = Counter()
    for r in ready:
        failures.update(r.get("failures", {}))
    started = min(r["started"] for r in ready)
    finished = max(r["finished"] for r in ready)
    return {
        "connected": sum(r["connected"] for r in ready),
        "failures": dict(failures),
        "seconds": finished - started,
        "connect_p50": max(r["connect_p50"] for r in ready),
        "connect_max": max(r["connect_max"] for r in ready),
    }


async def db_activity(database_url: str) -> dict[str, int]:
    """The server's database connections by state, how many of them wait on a lock,
    and how many are busy (in any state but idle): evidence when commits stop
    being answered."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT coalesce(state, 'unknown') AS state, count(*) AS n, "
            "count(*) FILTER (WHERE wait_event_type = 'Lock') AS locked "
            "FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() GROUP BY 1"
        )
    finally:
        await conn.close()
    out = {f"backends {r['state']}": int(r["n"]) for r in rows}
    out["waiting on a lock"] = sum(int(r["locked"]) for r in rows)
    out["busy"] = sum(int(r["n"]) for r in rows if r["state"] != "idle")
    return out


def cpu_seconds(
    server_pid: int, database_url: str = "", workers: Iterable[Worker] = ()
) -> dict[str, float]:
    """CPU time (user + system) so far of the server, of its PostgreSQL (the postmaster
    whose command line names the socket directory in ``database_url``, and its
    children), of the given workers, and of everything else on the machine: a
    difference of two of these says who used the cores. Other sessions may be
    running tests on the same machine; "other" makes that visible."""
    import psutil

    def cpu(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
        except psutil.Error:
            return 0.0
        return float(t.user + t.system)

    postgres = 0.0
    pgdata = database_url.rpartition("host=")[2]
    if pgdata:
        for p in psutil.process_iter(["name", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                if p.info["name"] == "postgres" and pgdata in " ".join(p.info["cmdline"] or []):
                    postgres += cpu(p) + sum(cpu(c) for c in p.children(recursive=True))
    t = psutil.cpu_times()
    busy = float(sum(t) - t.idle - getattr(t, "iowait", 0.0))
    server = psutil.Process(server_pid)
    server_sys = 0.0
    with contextlib.suppress(psutil.Error):
        server_sys = float(server.cpu_times().system)
    ours = {
        "server": cpu(server),
        "server_sys": server_sys,
        "postgres": postgres,
        "loadgen": sum(cpu(psutil.Process(w.pid)) for w in workers if w.proc.poll() is None),
    }
    return {**ours, "machine": busy}


def cpu_share(before: dict[str, float], after: dict[str, float], seconds: float) -> str:
    """``server 1.20 cores, postgres 0.50, loadgen 0.25`` over ``seconds`` of wall time."""
    used = {k: (after[k] - before[k]) / seconds for k in after}
    server_sys = used.pop("server_sys")
    used["other processes"] = max(0.0, used.pop("machine") - sum(used.values()))
    text = ", ".join(f"{k} {v:.2f}" for k, v in used.items())
    return f"CPU cores used: {text} (server in the kernel {server_sys:.2f})"


# --------------------------------------------------------------- profiling


PROFILE_ENV = "TESSERA_BENCH_PROFILE"


def maybe_profile(pid: int, seconds: int, name: str) -> Callable[[], None]:
    """With ``$TESSERA_BENCH_PROFILE`` set to a directory, py-spy the server for
    ``seconds`` into ``<dir>/<name>.raw``; the returned call waits for it and writes
    the summary to ``<dir>/<name>.txt``. Without the variable, it does nothing."""
    where = os.environ.get(PROFILE_ENV)
    if not where:
        return lambda: None
    directory = Path(where)
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / f"{name}.raw"
    proc = profile_server(pid, seconds, raw)

    def finish() -> None:
        if proc is None:
            return
        proc.wait(seconds + 60)
        if raw.exists():
            try:
                summary = summarise_profile(raw, 25)
            except Exception as exc:  # a profile must never cost the measurement
                summary = f"could not summarise {raw}: {exc!r}"
            (directory / f"{name}.txt").write_text(summary + "\n")

    return finish


def profile_server(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes] | None:
    """Start ``py-spy record`` on the server (raw collapsed stacks, per thread, 100 Hz);
    None without py-spy."""
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        return None
    return subprocess.Popen(
        [
            str(exe),
            "record",
            "-f",
            "raw",
            "-o",
            str(out),
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--nonblocking",
            "--threads",
            "--rate",
            "100",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return f"{name} ({file})" if file else name


def summarise_profile(path: Path, top: int = 15) -> str:
    """Where the server's threads were seen (py-spy samples threads that are running
    or runnable, so a thread preempted inside a syscall counts there): the share of
    the event-loop thread and of the worker threads, then for the event loop the top
    leaf frames and the top inclusive server / protocol / asyncpg / starlette frames,
    and the top leaf frames of the worker threads."""
    loop: list[tuple[list[str], int]] = []
    others: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith("thread (") else ""
        rest = frames[1:] if thread else frames
        if not rest:
            continue
        (loop if thread.endswith("MainThread") or not thread else others).append((rest, int(count)))
    n_loop = sum(c for _, c in loop)
    n_other = sum(c for _, c in others)
    total = (n_loop + n_other) or 1

    def leaves(stacks: list[tuple[list[str], int]], of: int) -> list[str]:
        own: Counter[str] = Counter()
        for frames, count in stacks:
            own[_frame_name(frames[-1])] += count
        return [f"  {100 * c / of:5.1f}%  {n}" for n, c in own.most_common(top)]

    incl: Counter[str] = Counter()
    for frames, count in loop:
        seen = set()
        for f in frames:
            name = _frame_name(f)
            keep = any(k in f for k in ("/server/", "/protocol/", "asyncpg", "starlette"))
            if keep and name not in seen:
                seen.add(name)
                incl[name] += count
    lines = [
        f"{total} samples: event loop (MainThread) {100 * n_loop / total:.0f} %, "
        f"worker threads {100 * n_other / total:.0f} %",
        "event loop, leaf frames (% of event-loop samples):",
        *leaves(loop, n_loop or 1),
        "event loop, inclusive server/protocol/asyncpg/starlette frames:",
        *[f"  {100 * c / (n_loop or 1):5.1f}%  {n}" for n, c in incl.most_common(top)],
        "worker threads, leaf frames (% of worker-thread samples):",
        *leaves(others, n_other or 1),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
