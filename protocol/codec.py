"""msgpack framing: bytes <-> frame maps, with hard caps so hostile input stays cheap."""

from __future__ import annotations

import struct
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
    if len(message) >= LIFT_MIN:
        chunk = _decode_chunk(message)
        if chunk is not None:
            return chunk
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


#: A ``chunk`` message at least this long has its bin values of this size or more
#: handed on as memoryviews of the message rather than copied by msgpack: on the
#: server's event loop that copy was one of five of every uploaded byte.
LIFT_MIN = 16 * 1024

#: A lifted ``data`` keeps its whole message alive while the window is charged
#: for ``data`` alone, so the rest of the message must be small: a chunk padded
#: with other keys is copied as before. Likewise a chunk has five keys; a map of
#: more is left to msgpack, which is faster at many small entries.
LIFT_SLACK = 1024
LIFT_KEYS = 8

_STRUCTS = {n: struct.Struct(f">{c}") for n, c in ((1, "B"), (2, "H"), (4, "I"), (8, "Q"))}
_SIGNED = {n: struct.Struct(f">{c}") for n, c in ((1, "b"), (2, "h"), (4, "i"), (8, "q"))}
_FLOATS = {0xCA: struct.Struct(">f"), 0xCB: struct.Struct(">d")}
_UINT = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_INT = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_STR = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_BIN = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_CONST = {0xC0: None, 0xC2: False, 0xC3: True}


class _NotFlat(Exception):
    """Not a flat map of scalars and bins: leave it to msgpack."""


def _decode_chunk(message: bytes) -> dict[str, Any] | None:
    """A ``chunk`` frame (a flat map of scalars and bins) with its large bins as
    memoryviews; None for anything else, valid or not, which msgpack then decodes
    (and judges) as usual. Accepts only what msgpack would decode the same way."""
    view = memoryview(message)
    end = len(message)
    pos = 0

    def length(width: int) -> int:
        nonlocal pos
        if pos + width > end:
            raise _NotFlat
        (n,) = _STRUCTS[width].unpack_from(message, pos)
        pos += width
        return int(n)

    def take(n: int) -> memoryview:
        nonlocal pos
        if pos + n > end:
            raise _NotFlat
        pos += n
        return view[pos - n : pos]

    def text(n: int) -> str:
        if n > _MAX_STR:
            raise _NotFlat
        try:
            return str(take(n), "utf-8")
        except UnicodeDecodeError:
            raise _NotFlat from None

    def value() -> Any:
        nonlocal pos
        b = message[pos] if pos < end else -1
        pos += 1
        if 0 <= b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0xA0 <= b <= 0xBF:
            return text(b & 0x1F)
        if b in _BIN:
            data = take(length(_BIN[b]))
            return data if len(data) >= LIFT_MIN else bytes(data)
        if b in _STR:
            return text(length(_STR[b]))
        if b in _UINT:
            return length(_UINT[b])
        if b in _INT:
            width = _INT[b]
            (n,) = _SIGNED[width].unpack_from(take(width))
            return int(n)
        if b in _FLOATS:
            (x,) = _FLOATS[b].unpack_from(take(_FLOATS[b].size))
            return float(x)
        if b in _CONST:
            return _CONST[b]
        raise _NotFlat  # containers, ext, reserved bytes, the end

    try:
        head = message[0]
        pos = 1
        if 0x80 <= head <= 0x8F:
            entries = head & 0x0F
        elif head in (0xDE, 0xDF):
            entries = length(2 if head == 0xDE else 4)
        else:
            return None
        if entries > LIFT_KEYS:
            return None
        frame: dict[str, Any] = {}
        for _ in range(entries):
            key = value()
            if not isinstance(key, str):
                return None
            frame[key] = value()
            if key == "t" and frame["t"] != "chunk":
                return None  # a put (say) of the same size: msgpack decodes it
        if pos != end or frame.get("t") != "chunk":
            return None
        data = frame.get("data")
        if end - (len(data) if isinstance(data, memoryview) else 0) > LIFT_SLACK:
            return None  # no data view, or one holding a large message alive
    except _NotFlat:
        return None
    return frame


def data_head(rid: int, off: int, size: int, end: bool) -> bytes:
    """A ``data`` frame up to its payload of ``size`` bytes, ``data`` last.

    ``data_head(...) + payload`` decodes to ``frames.data(rid, off, payload, end)``;
    the server sends this head and then the payload as its store read it, instead
    of having msgpack copy each 1 MiB chunk once more. At most 49 bytes.
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
