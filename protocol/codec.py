"""msgpack framing: bytes <-> frame maps, with hard caps so hostile input stays cheap."""

from __future__ import annotations

from typing import Any

import msgpack

from protocol.errors import CloseCode, FrameError, ProtocolViolation

# Caps on any single msgpack object, independent of the negotiated limits: they
# stop a small message from making the decoder allocate a huge container.
_MAX_CONTAINER = 100_000
_MAX_STR = 1 << 20


def _no_ext(code: int, data: bytes) -> Any:
    raise FrameError(f"msgpack extension type {code} is not allowed")


def encode(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def decode(message: bytes, max_frame: int) -> dict[str, Any]:
    """Decode one message into a frame map with a string ``t``.

    Raises ProtocolViolation(1009) for oversize messages and FrameError (4400)
    for anything that is not a msgpack map with string keys and a string ``t``.
    """
    if len(message) > max_frame:
        raise ProtocolViolation(
            f"message of {len(message)} bytes exceeds max_frame {max_frame}",
            CloseCode.MESSAGE_TOO_BIG,
        )
    try:
        obj = msgpack.unpackb(
            message,
            raw=False,
            use_list=True,
            strict_map_key=False,
            ext_hook=_no_ext,
            timestamp=0,
            max_bin_len=max_frame,
            max_str_len=min(max_frame, _MAX_STR),
            max_array_len=_MAX_CONTAINER,
            max_map_len=_MAX_CONTAINER,
            max_ext_len=0,
        )
    except FrameError:
        raise
    except Exception as exc:  # msgpack raises many types: all mean "not msgpack"
        raise FrameError(f"not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise FrameError("a frame must be a msgpack map")
    for key in obj:
        if not isinstance(key, str):
            raise FrameError("frame keys must be strings")
    t = obj.get("t")
    if not isinstance(t, str):
        raise FrameError("frame lacks a string 't'")
    return obj


#: Room to leave in front of a payload for :func:`data_head` (its longest result is 49).
DATA_HEAD_ROOM = 64


def data_head(rid: int, off: int, size: int, end: bool) -> bytes:
    """A ``data`` frame up to its payload of ``size`` bytes, ``data`` last.

    ``data_head(...) + payload`` decodes to ``frames.data(rid, off, payload, end)``;
    the server reads the payload into a buffer straight behind this head, instead
    of having msgpack copy each 1 MiB chunk once more.
    """
    return b"".join(
        (
            _HEAD_END if end else _HEAD,
            _RID,
            msgpack.packb(rid),
            _OFF,
            msgpack.packb(off),
            _END if end else b"",
            _DATA,
            _bin_header(size),
        )
    )


# The constant pieces of a data frame's head: map header and "t": "data", the keys.
_HEAD = bytes([0x84]) + msgpack.packb("t") + msgpack.packb("data")
_HEAD_END = bytes([0x85]) + _HEAD[1:]
_RID, _OFF, _DATA = msgpack.packb("rid"), msgpack.packb("off"), msgpack.packb("data")
_END = msgpack.packb("end") + msgpack.packb(True)


def _bin_header(size: int) -> bytes:
    if size < 0x100:
        return bytes([0xC4, size])
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")
