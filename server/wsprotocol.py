"""uvicorn's websockets-sansio protocol, sending large binary messages uncopied.

websockets serializes a frame into a ``BytesIO`` (one copy of the payload) and
takes its value (another); uvicorn then joins the output list. For a download
that is two copies of every byte on the event loop, on top of the store read
and the socket send. A binary message of ``DIRECT_MIN`` bytes or more is sent
here as its 2-10 byte frame head and the payload itself, in one ``writelines``
(uvloop sends the pair with one ``writev``; no copy).

Only the plain case takes this path: an open connection, no extensions
(permessage-deflate is off) and no fragmented message in progress. Anything
else goes through uvicorn unchanged, and so does every other event.
"""

from __future__ import annotations

import struct
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

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


class WSProtocol(WebSocketsSansIOProtocol):
    async def send(self, message: Any) -> None:
        data = message.get("bytes") if message["type"] == "websocket.send" else None
        if data is None or len(data) < DIRECT_MIN:
            return await super().send(message)
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
            return await super().send(message)  # uvicorn raises or sends as it would
        # Frames websockets queued meanwhile (a pong) go first, whole.
        self.transport.writelines([*conn.data_to_send(), frame_head(len(data)), data])
