"""The outgoing side of a session: one writer task, two classes of traffic.

Control frames (replies, ``part_ok``, ``credit``, errors, changes) always go
first. Download data comes from :class:`DataStream` objects, each holding at
most a couple of encoded frames; ready streams are served round-robin, so
concurrent ``get``s share the socket fairly and a large download can delay a
control frame by at most one data frame.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from protocol.codec import encode

#: An encoded frame: bytes, or (a download's data) the pieces that make one up, in
#: order, sent as one WebSocket message without being joined.
Message = bytes | tuple[bytes | memoryview, ...]


class OutboxClosed(Exception):
    """The session is gone; nothing more can be sent."""


class DataStream:
    def __init__(self, outbox: Outbox, depth: int) -> None:
        self._outbox = outbox
        self._frames: deque[Message] = deque()
        self._depth = depth
        self._space = asyncio.Event()
        self._space.set()

    async def put(self, frame: dict[str, Any]) -> None:
        """Queue one data frame, waiting while the stream already holds ``depth``."""
        await self.put_message(encode(frame))

    async def put_message(self, message: Message) -> None:
        """``put`` for a frame already encoded."""
        while len(self._frames) >= self._depth:
            self._space.clear()
            await self._space.wait()
            self._outbox.check_open()
        self._outbox.check_open()
        self._frames.append(message)
        if len(self._frames) == 1:
            self._outbox.ready(self)

    def take(self) -> tuple[Message, bool]:
        """Pop the next frame; the flag says whether more are waiting."""
        message = self._frames.popleft()
        self._space.set()
        return message, bool(self._frames)

    def wake(self) -> None:
        self._space.set()


class Outbox:
    def __init__(
        self,
        send: Callable[[Message], Awaitable[None]],
        stream_depth: int = 2,
        high_water: int = 1024,
    ) -> None:
        self._send = send
        self._high_water = high_water
        self._room = asyncio.Event()
        self._room.set()
        self._control: deque[bytes] = deque()
        self._ready: deque[DataStream] = deque()
        self._streams: set[DataStream] = set()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._closed = False
        self._depth = stream_depth

    @property
    def has_room(self) -> bool:
        """Fewer than ``high_water`` control frames are queued."""
        return self._room.is_set()

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        if self._closed:
            raise OutboxClosed

    def send(self, frame: dict[str, Any]) -> None:
        """Queue a control frame; silently dropped once the session is closed."""
        self.send_encoded(encode(frame))

    def send_encoded(self, message: bytes) -> None:
        """``send`` for a frame encoded once and shared (a change to many sessions)."""
        if self._closed:
            return
        self._control.append(message)
        if len(self._control) >= self._high_water:
            self._room.clear()
        self._wake.set()

    def stream(self) -> DataStream:
        self.check_open()
        stream = DataStream(self, self._depth)
        self._streams.add(stream)
        return stream

    def release(self, stream: DataStream) -> None:
        self._streams.discard(stream)

    def ready(self, stream: DataStream) -> None:
        self._ready.append(stream)
        self._wake.set()

    async def run(self) -> None:
        """The writer loop; returns when closed, raises when the socket fails."""
        try:
            while not self._closed:
                if self._control:
                    await self._send(self._control.popleft())
                    if len(self._control) < self._high_water:
                        self._room.set()
                    if not self._control:
                        self._drained.set()
                elif self._ready:
                    stream = self._ready.popleft()
                    message, more = stream.take()
                    if more:
                        self._ready.append(stream)
                    await self._send(message)
                else:
                    self._wake.clear()
                    await self._wake.wait()
        finally:
            self.close()

    async def wait_room(self, limit: float) -> bool:
        """Wait until fewer than ``high_water`` control frames are queued.

        False when that did not happen within ``limit`` seconds: the peer is
        not reading, and the caller should stop feeding it.
        """
        if self._room.is_set():
            return True
        try:
            async with asyncio.timeout(limit):
                await self._room.wait()
        except TimeoutError:
            return False
        return True

    async def flush(self, limit: float) -> None:
        """Wait (at most ``limit`` s) until queued control frames are written, e.g. before
        a close, so the client sees the error that explains it."""
        if not self._control or self._closed:
            return
        self._drained.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await self._drained.wait()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._drained.set()
        self._room.set()
        for stream in self._streams:
            stream.wake()
