"""Error codes, close codes and the exceptions the protocol core raises.

Three kinds of failure, because the contract treats them differently:

* :class:`ProtocolViolation` ends the session with a close code (4400, 1009...).
* :class:`RequestError` answers one request with an ``error`` frame; the session
  stays open.
* :class:`UnknownFrameType` is a RequestError with code ``unknown_type``, kept
  separate so callers can count forward-compatibility misses.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    HASH_MISMATCH = "hash_mismatch"
    BAD_OFFSET = "bad_offset"
    TOO_LARGE = "too_large"
    QUOTA_EXCEEDED = "quota_exceeded"
    INCOMPLETE = "incomplete"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"

    @property
    def retry(self) -> bool:
        """Whether the same request may succeed later, as ``error.retry`` says."""
        return self in (ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED)


class CloseCode(IntEnum):
    NORMAL = 1000
    UNSUPPORTED_DATA = 1003  # a text message
    POLICY_VIOLATION = 1008  # too slow a consumer: reconnect and catch up
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    PROTOCOL_VIOLATION = 4400
    UNAUTHORIZED = 4401
    DEVICE_REVOKED = 4403
    HELLO_TIMEOUT = 4408
    TOO_MANY_SESSIONS = 4429


class ProtocolError(Exception):
    """Base of every error the protocol core raises."""


class ProtocolViolation(ProtocolError):
    """The peer broke the contract: the session must close with ``code``."""

    def __init__(self, reason: str, code: CloseCode = CloseCode.PROTOCOL_VIOLATION) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class FrameError(ProtocolViolation):
    """A message that is not a well-formed frame (bad msgpack, missing or mistyped field)."""


class RequestError(ProtocolError):
    """One request fails; answered with an ``error`` frame, the session stays open."""

    def __init__(
        self,
        code: ErrorCode,
        msg: str = "",
        *,
        rid: int | None = None,
        upload: str | None = None,
        part: int | None = None,
        **extra: object,
    ) -> None:
        super().__init__(msg or code.value)
        self.code = code
        self.msg = msg or code.value.replace("_", " ")
        self.rid = rid
        self.upload = upload
        self.part = part
        self.extra = extra


class UnknownFrameType(RequestError):
    def __init__(self, frame_type: str, rid: int | None) -> None:
        super().__init__(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {frame_type!r}", rid=rid)
        self.frame_type = frame_type
