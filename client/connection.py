"""One authenticated sync session, multiplexed: many callers, one socket.

A reader task routes every incoming frame: replies to the request that
carries the same ``rid``, ``part_ok`` and part errors to the part being sent,
``data`` to the download that asked for it, ``credit`` to the send window,
``change``/``synced`` to the change queue. Senders of chunks wait for credit,
so the client never exceeds the server's window.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import websockets
from websockets.asyncio.client import ClientConnection

from protocol.codec import encode

log = logging.getLogger(__name__)

Frame = dict[str, Any]


class ServerClosed(Exception):
    """The session ended; ``code`` says whether and how to reconnect."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason

    @property
    def retryable(self) -> bool:
        """1012 restart, 1008 too slow, network loss: reconnect. 4401: reauth first."""
        return self.code not in (4400, 4403, 1003, 1009)


class RemoteError(Exception):
    """The server answered a request with ``error``."""

    def __init__(self, frame: Frame) -> None:
        super().__init__(f"{frame.get('msg', frame['code'])} ({frame['code']})")
        self.frame = frame
        self.code: str = frame["code"]
        self.retry: bool = bool(frame.get("retry"))


def ws_url(server: str) -> str:
    """http(s)://host:port -> ws(s)://host:port/v1/sync"""
    if server.startswith("https://"):
        return "wss://" + server[len("https://") :].rstrip("/") + "/v1/sync"
    if server.startswith("http://"):
        return "ws://" + server[len("http://") :].rstrip("/") + "/v1/sync"
    return server


class Connection:
    def __init__(
        self, ws: ClientConnection, reauth: Callable[[], Awaitable[str]] | None = None
    ) -> None:
        self.ws = ws
        self.welcome: Frame = {}
        self.changes: asyncio.Queue[Frame] = asyncio.Queue()
        self._reauth = reauth
        self._rids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._parts: dict[tuple[str, int], asyncio.Future[Frame]] = {}
        self._streams: dict[int, asyncio.Queue[Frame | BaseException]] = {}
        self._credit = 0
        self._credit_added = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self.closed: ServerClosed | None = None
        self._last_sent = asyncio.get_running_loop().time()

    @classmethod
    async def open(
        cls,
        url: str,
        token: str,
        device: str,
        cursor: int = 0,
        reauth: Callable[[], Awaitable[str]] | None = None,
    ) -> Connection:
        try:
            ws = await websockets.connect(url, max_size=None, compression=None, open_timeout=20)
        except (OSError, websockets.InvalidHandshake, TimeoutError) as exc:
            raise ServerClosed(None, f"cannot connect: {exc}") from exc
        conn = cls(ws, reauth)
        await ws.send(
            encode({"t": "hello", "v": 1, "token": token, "device": device, "cursor": cursor})
        )
        try:
            first = msgpack.unpackb(await ws.recv(), raw=False)
        except websockets.ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            raise ServerClosed(code, exc.rcvd.reason if exc.rcvd else "") from None
        if first.get("t") != "welcome":
            await ws.close()
            raise ServerClosed(None, f"expected welcome, got {first.get('t')}")
        conn.welcome = first
        conn._credit = first["limits"]["window"]
        conn._reader = asyncio.create_task(conn._read_loop(), name="tessera-reader")
        idle = first.get("idle_timeout")
        if idle:
            task = asyncio.create_task(conn._keepalive(float(idle) / 3))
            conn._tasks.add(task)
            task.add_done_callback(conn._tasks.discard)
        return conn

    async def _keepalive(self, every: float) -> None:
        """The server closes sessions that send nothing for its idle_timeout: ping."""
        loop = asyncio.get_running_loop()
        while self.closed is None:
            await asyncio.sleep(max(0.05, every - (loop.time() - self._last_sent)))
            if self.closed is None and loop.time() - self._last_sent >= every:
                with contextlib.suppress(ServerClosed, RemoteError):
                    await self.request({"t": "ping"})

    @property
    def limits(self) -> dict[str, int]:
        return dict(self.welcome["limits"])

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- reader

    async def _read_loop(self) -> None:
        try:
            async for raw in self.ws:
                if isinstance(raw, bytes):
                    self._route(msgpack.unpackb(raw, raw=False))
            self._fail(ServerClosed(self.ws.close_code, self.ws.close_reason or ""))
        except websockets.ConnectionClosed as exc:
            rcvd = exc.rcvd
            self._fail(ServerClosed(rcvd.code if rcvd else None, rcvd.reason if rcvd else ""))
        except Exception as exc:  # a bug or garbage from the server: fail loudly, not hang
            log.exception("reader failed")
            self._fail(ServerClosed(None, f"client error: {exc}"))

    def _route(self, frame: Frame) -> None:
        t = frame.get("t")
        rid = frame.get("rid")
        if t == "credit":
            self._credit += frame["bytes"]
            self._credit_added.set()
        elif t in ("change", "synced"):
            self.changes.put_nowait(frame)
        elif t == "data" and rid in self._streams:
            self._streams[rid].put_nowait(frame)
        elif rid is not None and rid in self._streams:  # a download's terminal error
            self._streams[rid].put_nowait(RemoteError(frame))
        elif rid is not None and rid in self._pending:
            future = self._pending.pop(rid)
            if not future.done():
                future.set_result(frame)
        elif "upload" in frame and "part" in frame:
            future = self._parts.pop((frame["upload"], frame["part"]), None)
            if future is not None and not future.done():
                future.set_result(frame)
        elif t == "expiring" and self._reauth is not None:
            task = asyncio.create_task(self._refresh_session())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif t == "error":
            log.warning("unsolicited error from server: %s", frame)

    async def _refresh_session(self) -> None:
        assert self._reauth is not None
        try:
            token = await self._reauth()
            await self.request({"t": "reauth", "token": token})
        except Exception as exc:
            log.warning("could not re-authenticate the session: %s", exc)

    def _fail(self, exc: ServerClosed) -> None:
        self.closed = exc
        for future in [*self._pending.values(), *self._parts.values()]:
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()
        self._parts.clear()
        for queue in self._streams.values():
            queue.put_nowait(exc)
        self.changes.put_nowait({"t": "closed", "error": exc})
        self._credit_added.set()

    def _check(self) -> None:
        if self.closed is not None:
            raise self.closed

    # ------------------------------------------------------------- requests

    async def send(self, frame: Frame) -> None:
        self._check()
        self._last_sent = asyncio.get_running_loop().time()
        try:
            await self.ws.send(encode(frame))
        except websockets.ConnectionClosed as exc:
            rcvd = exc.rcvd
            raise ServerClosed(rcvd.code if rcvd else None, rcvd.reason if rcvd else "") from None

    async def request(self, frame: Frame) -> Frame:
        """Send a request and return its reply; RemoteError for an ``error`` reply."""
        self._check()
        rid = next(self._rids)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await self.send({**frame, "rid": rid})
            reply = await future
        finally:
            self._pending.pop(rid, None)
        if reply["t"] == "error":
            raise RemoteError(reply)
        return reply

    # --------------------------------------------------------------- uploads

    async def send_part(self, upload: str, index: int, data: bytes | memoryview) -> None:
        """Send one whole part in chunks within the credit window; wait for ``part_ok``."""
        self._check()
        key = (upload, index)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._parts[key] = future
        view = memoryview(data)
        step = self.limits["max_chunk"]
        try:
            for off in range(0, len(view), step):
                piece = view[off : off + step]
                await self._spend(len(piece))
                await self.send(
                    {
                        "t": "chunk",
                        "upload": upload,
                        "part": index,
                        "off": off,
                        "data": bytes(piece),
                    }
                )
            reply = await future
        finally:
            self._parts.pop(key, None)
        if reply["t"] == "error":
            raise RemoteError(reply)

    async def put(self, frame: Frame) -> Frame:
        """A ``put`` request: its data spends credit like a chunk's."""
        await self._spend(len(frame["data"]))
        return await self.request(frame)

    async def _spend(self, nbytes: int) -> None:
        while self._credit < nbytes:
            self._check()
            self._credit_added.clear()
            await self._credit_added.wait()
        self._check()
        self._credit -= nbytes

    # ------------------------------------------------------------- downloads

    async def get(self, part: int, off: int = 0) -> AsyncIterator[bytes]:
        """Stream the ciphertext of one partition from ``off``."""
        self._check()
        rid = next(self._rids)
        queue: asyncio.Queue[Frame | BaseException] = asyncio.Queue()
        self._streams[rid] = queue
        try:
            await self.send({"t": "get", "rid": rid, "part": part, "off": off})
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item["off"] != off:
                    raise RemoteError({"code": "internal", "msg": "data out of order"})
                off += len(item["data"])
                yield item["data"]
                if item.get("end"):
                    return
        finally:
            self._streams.pop(rid, None)

    async def fetch(self, part: int) -> bytes:
        return b"".join([piece async for piece in self.get(part)])
