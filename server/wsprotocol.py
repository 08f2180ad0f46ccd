"""uvicorn's websockets-sansio protocol, moving large binary messages with fewer copies.

websockets serializes a frame into a ``BytesIO`` (one copy of the payload) and
takes its value (another); uvicorn then joins the output list. For a download
that is two copies of every byte on the event loop, on top of the store read
and the socket send. A binary message of ``DIRECT_MIN`` bytes or more is sent
here as its 2-10 byte frame head and the payload itself, in one ``writelines``
(uvloop sends them with one ``writev``; no copy). The payload may come as a
tuple of pieces (a download frame's head and the pieces its store read
returned); smaller or unusual messages are joined and go through uvicorn.

Only the plain case takes this path: an open connection, no extensions
(permessage-deflate is off) and no fragmented message in progress. Anything
else goes through uvicorn unchanged, and so does every other event.

Received frames: websockets appends every piece the socket hands over to one
buffer (a copy), slices each payload out of it (another) and unmasks it (a
third). ``FrameReader`` copies the pieces of a large payload straight into a
buffer of the payload's size instead, once an eighth of it has arrived: 0.32-0.38
s/GiB of event-loop time became 0.17-0.22 (1 MiB frames in 256 KiB pieces,
unmasking included). Waiting for that eighth means a client makes the server
hold at most 8 times what it sent, never more than a frame (``max_frame``),
as before: a bare frame head commits no memory.
"""

from __future__ import annotations

import struct
from collections.abc import Generator
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State
from websockets.streams import StreamReader

#: Smaller messages (control frames) are not worth the second code path.
DIRECT_MIN = 64 * 1024

_FIN_BINARY = 0x82


def frame_head(size: int) -> bytes:
    """The head of an unmasked, final binary frame of ``size`` payload bytes (RFC 6455 5.2)."""
    if size < 126:
        return bytes((_FIN_BINARY, size))
    if size < 1 << 16:
        return struct.pack("!BBH", _FIN_BINARY, 126, size)
    return struct.pack("!BBQ", _FIN_BINARY, 127, size)


class FrameReader(StreamReader):
    """websockets' stream reader, except that a payload of ``DIRECT_MIN`` bytes or
    more is gathered in a buffer of its own size, each piece copied there once."""

    def __init__(self) -> None:
        super().__init__()
        self._target: bytearray | None = None
        self._filled = 0

    def feed_data(self, data: bytes | bytearray) -> None:
        if self.eof:
            raise EOFError("stream ended")
        target = self._target
        if target is None:
            self.buffer += data
            return
        filled = self._filled
        room = len(target) - filled
        if len(data) <= room:
            target[filled : filled + len(data)] = data
            self._filled = filled + len(data)
            return
        # The payload ends inside this piece: the rest begins the next frame.
        with memoryview(data) as view:
            target[filled:] = view[:room]
            self.buffer += view[room:]
        self._filled = len(target)

    def read_exact(self, n: int) -> Generator[None, None, bytearray]:
        if n < DIRECT_MIN:
            return (yield from super().read_exact(n))
        while len(self.buffer) < n:
            if len(self.buffer) >= n >> 3:
                break  # an eighth is here: gather the rest directly
            if self.eof:
                raise EOFError(f"stream ends after {len(self.buffer)} bytes, expected {n} bytes")
            yield
        else:  # it arrived whole
            whole = self.buffer[:n]
            del self.buffer[:n]
            return whole
        target = bytearray(n)
        filled = len(self.buffer)
        target[:filled] = self.buffer
        self.buffer.clear()  # everything buffered belongs to this payload
        self._target, self._filled = target, filled
        try:
            while self._filled < n:
                if self.eof:
                    raise EOFError(f"stream ends after {self._filled} bytes, expected {n} bytes")
                yield
        finally:
            # Also when the parser is dropped mid-payload (the connection failed):
            # what arrives from then on is buffered as websockets would.
            self._target = None
        return target


class WSProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Before any byte arrives: start websockets' parser again on our reader
        # (its first step, waiting for the request line, bound the old one).
        conn = self.conn
        conn.reader = FrameReader()
        conn.parser = conn.parse()
        next(conn.parser)

    async def send(self, message: Any) -> None:
        data = message.get("bytes") if message["type"] == "websocket.send" else None
        if data is None:
            return await super().send(message)
        # A tuple is one message in pieces (a download's frame: head, then data).
        if isinstance(data, tuple):
            pieces, size = data, sum(map(len, data))
        elif isinstance(data, bytes) and len(data) < DIRECT_MIN:
            return await super().send(message)  # every reply and change, as before
        else:
            pieces, size = (data,), len(data)
        if size < DIRECT_MIN:
            return await super().send(_joined(message, pieces))
        await self.writable.wait()  # flow control, as uvicorn does
        if self.disconnected:
            raise ClientDisconnected()
        conn = self.conn
        if (
            not self.handshake_complete
            or self.close_sent
            or self.initial_response is not None
            or conn.state is not State.OPEN
            or conn.extensions
            or conn.expect_continuation_frame
        ):
            # uvicorn raises or sends as it would
            return await super().send(_joined(message, pieces))
        # Frames websockets queued meanwhile (a pong) go first, whole.
        self.transport.writelines([*conn.data_to_send(), frame_head(size), *pieces])


def _joined(message: dict[str, Any], pieces: tuple[Any, ...]) -> dict[str, Any]:
    """The message with its pieces as one bytes object, for uvicorn's own path."""
    if len(pieces) == 1 and isinstance(pieces[0], bytes):
        return message
    return {**message, "bytes": b"".join(pieces)}
