"""The server side of a session as a pure state machine (the h11 / websockets model).

The session loop feeds every incoming message to :meth:`ServerConnection.receive`
and gets a validated frame back, or an exception saying how to react. The
machine owns the two pieces of per-session state the contract defines: the
handshake phase and the upload credit window. It does no I/O, so every rule is
unit-tested without a socket.
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Any

from protocol import frames
from protocol.codec import decode
from protocol.errors import CloseCode, ErrorCode, ProtocolViolation, RequestError
from protocol.frames import Chunk, ClientFrame, Hello, Put
from protocol.limits import Limits


class State(Enum):
    AWAIT_HELLO = auto()
    OPEN = auto()
    CLOSED = auto()


class ServerConnection:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.state = State.AWAIT_HELLO
        #: Bytes the client may still send before it must wait for ``credit``.
        self.credit = limits.window
        #: Bytes processed but not yet returned to the client.
        self._owed = 0

    def receive(self, message: bytes | str) -> ClientFrame:
        """Validate one WebSocket message.

        Raises ProtocolViolation (close the session with its code), or
        RequestError / UnknownFrameType (answer with ``error``, keep going).
        """
        if self.state is State.CLOSED:
            raise ProtocolViolation("session is closed")
        if isinstance(message, str):
            raise ProtocolViolation("text messages are not allowed", CloseCode.UNSUPPORTED_DATA)
        raw = decode(message, self.limits.max_frame)
        if self.state is State.AWAIT_HELLO:
            if raw["t"] != "hello":
                raise ProtocolViolation(f"first frame must be hello, got {raw['t']!r}")
            hello = frames.parse_client_frame(raw, self.limits)
            assert isinstance(hello, Hello)
            if hello.v != frames.VERSION:
                raise ProtocolViolation(f"unsupported protocol version {hello.v}")
            self.state = State.OPEN
            return hello
        frame = frames.parse_client_frame(raw, self.limits)
        if isinstance(frame, Hello):
            raise ProtocolViolation("hello after the session started")
        if isinstance(frame, Chunk):
            self._spend("chunk", len(frame.data), upload=frame.upload, part=frame.part)
        elif isinstance(frame, Put):
            self._spend("put data", len(frame.data), rid=frame.rid, upload=frame.upload)
        return frame

    def _spend(self, what: str, size: int, **where: Any) -> None:
        """Charge chunk (or put) data to the window: the bytes held in memory at once."""
        if size > self.credit:
            raise ProtocolViolation(
                f"{what} of {size} bytes exceeds the remaining credit of {self.credit}"
            )
        if size > self.limits.max_chunk:
            # Not charged: the data is dropped at once, so the window is unaffected.
            raise RequestError(
                ErrorCode.TOO_LARGE,
                f"{what} of {size} bytes exceeds max_chunk {self.limits.max_chunk}",
                **where,
            )
        self.credit -= size

    def release(self, nbytes: int) -> dict[str, Any] | None:
        """The server is done with ``nbytes`` of chunk data; maybe return credit.

        Credit is returned in batches (a quarter window) to keep ``credit``
        frames rare, but always once nothing is outstanding, so a client that
        waits for credit can never deadlock.
        """
        if nbytes < 0 or self.credit + self._owed + nbytes > self.limits.window:
            raise ValueError("released more bytes than were spent")
        self._owed += nbytes
        outstanding = self.limits.window - self.credit - self._owed
        if self._owed and (self._owed >= self.limits.window // 4 or outstanding == 0):
            returned, self._owed = self._owed, 0
            self.credit += returned
            return frames.credit(returned)
        return None

    def close(self) -> None:
        self.state = State.CLOSED
