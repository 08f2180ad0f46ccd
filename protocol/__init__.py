"""The Tessera sync protocol, version 1: frames, codec, limits, errors (sans-I/O)."""

from protocol.codec import decode, encode
from protocol.connection import ServerConnection, State
from protocol.errors import (
    CloseCode,
    ErrorCode,
    FrameError,
    ProtocolError,
    ProtocolViolation,
    RequestError,
    UnknownFrameType,
)
from protocol.limits import Limits

__all__ = [
    "CloseCode",
    "ErrorCode",
    "FrameError",
    "Limits",
    "ProtocolError",
    "ProtocolViolation",
    "RequestError",
    "ServerConnection",
    "State",
    "UnknownFrameType",
    "decode",
    "encode",
]
