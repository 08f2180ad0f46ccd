"""A small protocol client for tests: raw frames over a real WebSocket.

It is deliberately thin (the SDK is a separate thing): tests must be able to
send anything, including what a correct client never would.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import secrets
import socket
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import msgpack
import websockets
from websockets.asyncio.client import ClientConnection

from protocol.codec import encode

Frame = dict[str, Any]


def meta(name: bytes = b"enc-name") -> dict[str, bytes]:
    return {"name": name, "mtime": b"enc-mtime", "key": b"wrapped-key", "salt": os.urandom(16)}


def part_spec(data: bytes) -> dict[str, Any]:
    return {
        "size": len(data),
        "sha256": hashlib.sha256(data).digest(),
        "key": b"part-key-" + os.urandom(8),
        "salt": os.urandom(12),
    }


class SyncClient:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buffer: list[Frame] = []
        self.welcome: Frame = {}
        self.credit = 0
        self._rids = itertools.count(1)

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str,
        device: str = "device-a",
        cursor: int = 0,
        *,
        synced: bool = True,
        small_buffers: bool = False,
    ) -> SyncClient:
        sock = None
        if small_buffers:
            # A small receive window keeps the kernel from holding many frames in
            # flight, so what the client sees reflects the server's own ordering.
            host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        ws = await websockets.connect(url, max_size=None, compression=None, sock=sock)
        client = cls(ws)
        await client.send(
            {"t": "hello", "v": 1, "token": token, "device": device, "cursor": cursor}
        )
        client.welcome = await client.next()
        assert client.welcome["t"] == "welcome", client.welcome
        client.credit = client.welcome["limits"]["window"]
        if synced:
            await client.wait_for(lambda f: f["t"] == "synced")
        return client

    @property
    def limits(self) -> dict[str, int]:
        return self.welcome["limits"]

    def rid(self) -> int:
        return next(self._rids)

    async def send(self, frame: Frame) -> None:
        await self.ws.send(encode(frame))

    async def close(self) -> None:
        await self.ws.close()

    async def _read(self, timeout: float) -> Frame:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(raw, bytes), f"server sent text: {raw!r}"
        frame = msgpack.unpackb(raw, raw=False)
        if frame["t"] == "credit":
            self.credit += frame["bytes"]
        return frame

    async def next(self, timeout: float = 10) -> Frame:
        if self.buffer:
            return self.buffer.pop(0)
        return await self._read(timeout)

    async def wait_for(self, match: Callable[[Frame], bool], timeout: float = 15) -> Frame:
        for i, frame in enumerate(self.buffer):
            if match(frame):
                return self.buffer.pop(i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await self._read(max(0.01, deadline - loop.time()))
            if match(frame):
                return frame
            self.buffer.append(frame)

    async def request(self, frame: Frame, timeout: float = 30) -> Frame:
        frame.setdefault("rid", self.rid())
        await self.send(frame)
        rid = frame["rid"]
        return await self.wait_for(lambda f: f.get("rid") == rid and f["t"] != "data", timeout)

    async def closed(self, timeout: float = 10) -> tuple[int | None, str]:
        """Read until the server closes; return (code, reason)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        except websockets.ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd else None), (exc.rcvd.reason if exc.rcvd else "")

    # ------------------------------------------------------------ uploads

    async def start_upload(
        self,
        parts: Sequence[bytes],
        *,
        kind: str = "file",
        obj: int | None = None,
        base: int | None = None,
        name: bytes = b"enc-name",
    ) -> Frame:
        frame: Frame = {
            "t": "upload",
            "kind": kind,
            "meta": meta(name),
            "parts": [part_spec(p) for p in parts],
        }
        if obj is not None:
            frame["object"], frame["base"] = obj, base
        reply = await self.request(frame)
        return reply

    async def send_chunk(self, upload: str, part: int, off: int, data: bytes) -> None:
        await self.wait_credit(len(data))
        await self.send({"t": "chunk", "upload": upload, "part": part, "off": off, "data": data})

    async def send_parts(
        self,
        upload: str,
        parts: Sequence[bytes],
        indexes: Sequence[int] | None = None,
        chunk: int = 64 * 1024,
        *,
        wait: bool = True,
    ) -> None:
        """Send whole parts with their chunks interleaved round-robin across parts."""
        indexes = list(range(len(parts))) if indexes is None else list(indexes)
        offsets = {i: 0 for i in indexes}
        while offsets:
            for i in list(offsets):
                off = offsets[i]
                piece = parts[i][off : off + chunk]
                await self.send_chunk(upload, i, off, piece)
                if off + len(piece) >= len(parts[i]):
                    del offsets[i]
                else:
                    offsets[i] = off + len(piece)
        if wait:
            pending = set(indexes)
            while pending:
                frame = await self.wait_for(
                    lambda f: f.get("upload") == upload and f["t"] in ("part_ok", "error")
                )
                assert frame["t"] == "part_ok", frame
                pending.discard(frame["part"])

    async def push(self, parts: Sequence[bytes], **kw: Any) -> Frame:
        """Upload and commit; return the ``committed`` frame."""
        ok = await self.start_upload(parts, **kw)
        assert ok["t"] == "upload_ok", ok
        await self.send_parts(ok["upload"], parts)
        done = await self.request({"t": "commit", "upload": ok["upload"]})
        assert done["t"] == "committed", done
        return done

    async def wait_credit(self, nbytes: int) -> None:
        while self.credit < nbytes:
            frame = await self._read(15)
            if frame["t"] != "credit":
                self.buffer.append(frame)
        self.credit -= nbytes

    def put_frame(
        self,
        data: bytes,
        *,
        upload: str | None = None,
        obj: int | None = None,
        base: int | None = None,
        spec: dict[str, Any] | None = None,
    ) -> Frame:
        """A ``put`` of ``data`` as one part (a fresh client id unless given)."""
        frame: Frame = {
            "t": "put",
            "rid": self.rid(),
            "upload": upload or secrets.token_urlsafe(16),
            "meta": meta(),
            "part": spec or part_spec(data),
            "data": data,
        }
        if obj is not None:
            frame["object"], frame["base"] = obj, base
        return frame

    async def put(self, frame: Frame, timeout: float = 30) -> Frame:
        """Send a ``put`` (spending credit for its data, as a client must) and return
        its reply."""
        await self.wait_credit(len(frame["data"]))
        await self.send(frame)
        return await self.wait_for(lambda f: f.get("rid") == frame["rid"], timeout)

    async def download(self, part: int, off: int = 0) -> bytes:
        rid = self.rid()
        await self.send({"t": "get", "rid": rid, "part": part, "off": off})
        out = bytearray()
        while True:
            frame = await self.wait_for(lambda f: f.get("rid") == rid)
            assert frame["t"] == "data", frame
            assert frame["off"] == off + len(out)
            out += frame["data"]
            if frame.get("end"):
                return bytes(out)


async def register_login(
    http: str, username: str, password: str = "correct horse battery", device: str | None = None
) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=http) as client:
        r = await client.post(
            "/v1/auth/register", json={"username": username, "password": password}
        )
        assert r.status_code == 201, r.text
        body: dict[str, Any] = {"username": username, "password": password}
        if device:
            body["device"] = device
        r = await client.post("/v1/auth/login", json=body)
        assert r.status_code == 200, r.text
        return r.json()


async def login_device(
    http: str, username: str, device: str, password: str = "correct horse battery"
) -> dict[str, Any]:
    """Log an existing account in as ``device``: its tokens open only that device's
    sessions."""
    async with httpx.AsyncClient(base_url=http) as client:
        r = await client.post(
            "/v1/auth/login", json={"username": username, "password": password, "device": device}
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]
