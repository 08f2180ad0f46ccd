"""Frame definitions and validation.

Client frames are parsed into frozen dataclasses by :func:`parse_client_frame`;
server frames are built by the small constructor functions at the bottom, so
that every frame the server sends has one definition.

Validation is strict about *shape* (a missing or mistyped field is a protocol
violation, close 4400) and polite about *size* (a request over a limit gets
``error{code:"too_large"}`` and the session stays open). Unknown keys are
ignored, as the contract asks for forward compatibility.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from protocol.errors import ErrorCode, FrameError, RequestError, UnknownFrameType
from protocol.limits import Limits

VERSION: Final = 1
MAX_ID: Final = (1 << 63) - 1
SHA256_LEN: Final = 32

#: Caps on opaque client bytes. They are generous for any sane cipher; they
#: exist so the metadata store cannot be used as a free blob store.
MAX_KEY: Final = 1024
MAX_SALT: Final = 1024
MAX_NAME: Final = 16 * 1024
MAX_MTIME: Final = 1024
MAX_TOKEN: Final = 8 * 1024
MAX_DEVICE: Final = 128
MAX_UPLOAD_ID: Final = 64
#: A client-chosen upload id (``put``) has at least this many characters.
MIN_PUT_ID: Final = 16

Kind = Literal["file", "dir"]

# --------------------------------------------------------------------- fields


def _field(m: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    if name not in m:
        raise FrameError(f"{m.get('t', 'frame')}: missing field {name!r}")
    value = m[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FrameError(f"{m.get('t', 'frame')}.{name} must be {what}")
    return value


def req_int(m: Mapping[str, Any], name: str, lo: int = 0, hi: int = MAX_ID) -> int:
    value = _field(m, name, int, "an integer")
    if isinstance(value, bool) or not lo <= value <= hi:
        raise FrameError(f"{m.get('t', 'frame')}.{name} out of range {lo}..{hi}")
    return value


def opt_int(m: Mapping[str, Any], name: str, lo: int = 0, hi: int = MAX_ID) -> int | None:
    if m.get(name) is None:
        return None
    return req_int(m, name, lo, hi)


def req_str(m: Mapping[str, Any], name: str, max_len: int, min_len: int = 1) -> str:
    value = _field(m, name, str, "a string")
    if not min_len <= len(value) <= max_len:
        raise FrameError(f"{m.get('t', 'frame')}.{name} must be {min_len}..{max_len} characters")
    if "\x00" in value:  # no text PostgreSQL can store holds one
        raise FrameError(f"{m.get('t', 'frame')}.{name} must not contain NUL")
    return value


def req_bytes(m: Mapping[str, Any], name: str, max_len: int, *, rid: int | None = None) -> bytes:
    """Opaque client bytes: over ``max_len`` is a size error, not a shape error."""
    value = _field(m, name, bytes, "bytes (msgpack bin)")
    if len(value) > max_len:
        raise RequestError(
            ErrorCode.TOO_LARGE, f"{name} is {len(value)} bytes, at most {max_len}", rid=rid
        )
    return value


def req_map(m: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = _field(m, name, dict, "a map")
    if any(not isinstance(k, str) for k in value):
        raise FrameError(f"{m.get('t', 'frame')}.{name} keys must be strings")
    return value


def req_list(m: Mapping[str, Any], name: str) -> list[Any]:
    return _field(m, name, list, "a list")


# ----------------------------------------------------------- client frames


@dataclass(frozen=True, slots=True)
class Meta:
    """Encrypted object metadata: the server stores and returns it untouched."""

    name: bytes
    mtime: bytes
    key: bytes
    salt: bytes

    def as_map(self) -> dict[str, bytes]:
        return {"name": self.name, "mtime": self.mtime, "key": self.key, "salt": self.salt}


@dataclass(frozen=True, slots=True)
class PartSpec:
    size: int
    sha256: bytes
    key: bytes
    salt: bytes


@dataclass(frozen=True, slots=True)
class Hello:
    v: int
    token: str
    device: str
    cursor: int


@dataclass(frozen=True, slots=True)
class Ack:
    cursor: int


@dataclass(frozen=True, slots=True)
class Upload:
    rid: int
    object: int | None
    base: int | None
    kind: Kind
    meta: Meta
    parts: tuple[PartSpec, ...]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


@dataclass(frozen=True, slots=True)
class Put:
    """A one-part file declared, sent and committed in one frame (small files).

    ``upload`` is chosen by the client, so that a put resent after a lost reply
    gets the first one's result instead of creating the object twice."""

    rid: int
    upload: str
    object: int | None
    base: int | None
    meta: Meta
    part: PartSpec
    data: bytes

    def as_upload(self) -> Upload:
        return Upload(self.rid, self.object, self.base, "file", self.meta, (self.part,))


@dataclass(frozen=True, slots=True)
class Chunk:
    upload: str
    part: int
    off: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Commit:
    rid: int
    upload: str


@dataclass(frozen=True, slots=True)
class Resume:
    rid: int
    upload: str


@dataclass(frozen=True, slots=True)
class Abort:
    rid: int
    upload: str


@dataclass(frozen=True, slots=True)
class Delete:
    rid: int
    object: int
    base: int


@dataclass(frozen=True, slots=True)
class Get:
    rid: int
    part: int
    off: int


@dataclass(frozen=True, slots=True)
class Info:
    rid: int
    part: int


@dataclass(frozen=True, slots=True)
class Ping:
    rid: int


@dataclass(frozen=True, slots=True)
class Reauth:
    rid: int
    token: str


ClientFrame = (
    Hello
    | Ack
    | Upload
    | Put
    | Chunk
    | Commit
    | Resume
    | Abort
    | Delete
    | Get
    | Info
    | Ping
    | Reauth
)


def parse_meta(m: Mapping[str, Any], rid: int | None = None) -> Meta:
    meta = req_map(m, "meta")
    return Meta(
        name=req_bytes(meta, "name", MAX_NAME, rid=rid),
        mtime=req_bytes(meta, "mtime", MAX_MTIME, rid=rid),
        key=req_bytes(meta, "key", MAX_KEY, rid=rid),
        salt=req_bytes(meta, "salt", MAX_SALT, rid=rid),
    )


def parse_parts(raw: list[Any], limits: Limits, rid: int | None = None) -> tuple[PartSpec, ...]:
    if len(raw) > limits.max_parts:
        raise RequestError(
            ErrorCode.TOO_LARGE, f"{len(raw)} parts, at most {limits.max_parts}", rid=rid
        )
    return tuple(
        parse_part(item, limits, f"upload.parts[{index}]", index, rid)
        for index, item in enumerate(raw)
    )


def parse_part(item: Any, limits: Limits, where: str, index: int, rid: int | None) -> PartSpec:
    if not isinstance(item, dict):
        raise FrameError(f"{where} must be a map")
    size = req_int(item, "size", 0)
    if not 1 <= size <= limits.max_partition:
        raise RequestError(
            ErrorCode.TOO_LARGE,
            f"part {index} is {size} bytes; sizes are 1..{limits.max_partition}",
            rid=rid,
            part=index,
        )
    sha = _field(item, "sha256", bytes, "32 bytes")
    if len(sha) != SHA256_LEN:
        raise FrameError(f"{where}.sha256 must be 32 bytes")
    return PartSpec(
        size=size,
        sha256=sha,
        key=req_bytes(item, "key", MAX_KEY, rid=rid),
        salt=req_bytes(item, "salt", MAX_SALT, rid=rid),
    )


def _hello(m: Mapping[str, Any], limits: Limits) -> Hello:
    v = req_int(m, "v", 0)
    return Hello(
        v=v,
        token=req_str(m, "token", MAX_TOKEN),
        device=req_str(m, "device", MAX_DEVICE),
        cursor=req_int(m, "cursor", 0),
    )


def _ack(m: Mapping[str, Any], limits: Limits) -> Ack:
    return Ack(cursor=req_int(m, "cursor", 0))


def _object_base(m: Mapping[str, Any]) -> tuple[int | None, int | None]:
    obj = opt_int(m, "object", 1)
    base = opt_int(m, "base", 1)
    if (obj is None) != (base is None):
        raise FrameError(f"{m['t']}: 'object' and 'base' go together")
    return obj, base


def _upload(m: Mapping[str, Any], limits: Limits) -> Upload:
    rid = req_int(m, "rid")
    obj, base = _object_base(m)
    kind = _field(m, "kind", str, "a string")
    if kind not in ("file", "dir"):
        raise FrameError("upload.kind must be 'file' or 'dir'")
    meta = parse_meta(m, rid)
    parts = parse_parts(req_list(m, "parts"), limits, rid)
    if kind == "dir" and parts:
        raise FrameError("upload: a dir has no parts")
    return Upload(rid=rid, object=obj, base=base, kind=kind, meta=meta, parts=parts)


#: A client's upload id for ``put``: url-safe, long enough that nobody guesses one.
_PUT_ID = re.compile(rf"[A-Za-z0-9_-]{{{MIN_PUT_ID},{MAX_UPLOAD_ID}}}")


def _put(m: Mapping[str, Any], limits: Limits) -> Put:
    rid = req_int(m, "rid")
    upload = req_str(m, "upload", MAX_UPLOAD_ID)
    if not _PUT_ID.fullmatch(upload):
        raise FrameError(
            f"put.upload must be {MIN_PUT_ID}..{MAX_UPLOAD_ID} characters of A-Z a-z 0-9 _ -"
        )
    obj, base = _object_base(m)
    return Put(
        rid=rid,
        upload=upload,
        object=obj,
        base=base,
        meta=parse_meta(m, rid),
        part=parse_part(m.get("part"), limits, "put.part", 0, rid),
        data=_field(m, "data", bytes, "bytes (msgpack bin)"),
    )


def _chunk(m: Mapping[str, Any], limits: Limits) -> Chunk:
    return Chunk(
        upload=req_str(m, "upload", MAX_UPLOAD_ID),
        part=req_int(m, "part", 0, limits.max_parts - 1),
        off=req_int(m, "off", 0),
        # A memoryview of the message when large (see codec.LIFT_MIN): no copy.
        data=_field(m, "data", (bytes, memoryview), "bytes (msgpack bin)"),
    )


def _rid_upload(cls: type[Commit] | type[Resume] | type[Abort]) -> Callable[..., Any]:
    def parse(m: Mapping[str, Any], limits: Limits) -> Any:
        return cls(rid=req_int(m, "rid"), upload=req_str(m, "upload", MAX_UPLOAD_ID))

    return parse


def _delete(m: Mapping[str, Any], limits: Limits) -> Delete:
    return Delete(rid=req_int(m, "rid"), object=req_int(m, "object", 1), base=req_int(m, "base", 1))


def _get(m: Mapping[str, Any], limits: Limits) -> Get:
    return Get(rid=req_int(m, "rid"), part=req_int(m, "part", 1), off=opt_int(m, "off") or 0)


def _info(m: Mapping[str, Any], limits: Limits) -> Info:
    return Info(rid=req_int(m, "rid"), part=req_int(m, "part", 1))


def _ping(m: Mapping[str, Any], limits: Limits) -> Ping:
    return Ping(rid=req_int(m, "rid"))


def _reauth(m: Mapping[str, Any], limits: Limits) -> Reauth:
    return Reauth(rid=req_int(m, "rid"), token=req_str(m, "token", MAX_TOKEN))


_PARSERS: dict[str, Callable[[Mapping[str, Any], Limits], ClientFrame]] = {
    "hello": _hello,
    "ack": _ack,
    "upload": _upload,
    "put": _put,
    "chunk": _chunk,
    "commit": _rid_upload(Commit),
    "resume": _rid_upload(Resume),
    "abort": _rid_upload(Abort),
    "delete": _delete,
    "get": _get,
    "info": _info,
    "ping": _ping,
    "reauth": _reauth,
}

CLIENT_FRAME_TYPES: Final = frozenset(_PARSERS)


def parse_client_frame(m: Mapping[str, Any], limits: Limits) -> ClientFrame:
    """Validate a decoded frame map into its dataclass.

    Raises FrameError (close 4400), UnknownFrameType or RequestError (reply).
    """
    t = m["t"]
    parser = _PARSERS.get(t)
    if parser is None:
        rid = m.get("rid")
        valid_rid = isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_ID
        raise UnknownFrameType(t, rid if valid_rid else None)
    return parser(m, limits)


# ----------------------------------------------------------- server frames
# Builders return plain maps; the codec turns them into bytes.


def welcome(session: str, user: int, device: str, head: int, limits: Limits) -> dict[str, Any]:
    return {
        "t": "welcome",
        "v": VERSION,
        "session": session,
        "user": user,
        "device": device,
        "head": head,
        "limits": limits.as_map(),
    }


def upload_ok(rid: int, upload: str, have: list[int]) -> dict[str, Any]:
    return {"t": "upload_ok", "rid": rid, "upload": upload, "have": have}


def credit(nbytes: int) -> dict[str, Any]:
    return {"t": "credit", "bytes": nbytes}


def part_ok(upload: str, part: int) -> dict[str, Any]:
    return {"t": "part_ok", "upload": upload, "part": part}


def committed(rid: int, obj: int, rev: int, seq: int) -> dict[str, Any]:
    return {"t": "committed", "rid": rid, "object": obj, "rev": rev, "seq": seq}


def ok(rid: int) -> dict[str, Any]:
    return {"t": "ok", "rid": rid}


def pong(rid: int) -> dict[str, Any]:
    return {"t": "pong", "rid": rid}


def data(rid: int, off: int, payload: bytes, end: bool) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": "data", "rid": rid, "off": off, "data": payload}
    if end:
        frame["end"] = True
    return frame


def part_info(
    rid: int | None,
    *,
    id: int,
    object: int,
    size: int,
    sha256: bytes,
    key: bytes,
    salt: bytes,
    next: int | None,
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "t": "part_info",
        "id": id,
        "object": object,
        "size": size,
        "sha256": sha256,
        "key": key,
        "salt": salt,
        "next": next,
    }
    if rid is not None:
        frame["rid"] = rid
    return frame


def expiring(seconds: int) -> dict[str, Any]:
    return {"t": "expiring", "in": seconds}


def error(
    code: ErrorCode,
    msg: str = "",
    *,
    rid: int | None = None,
    upload: str | None = None,
    part: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "t": "error",
        "code": code.value,
        "msg": msg or code.value.replace("_", " "),
        "retry": code.retry,
    }
    if rid is not None:
        frame["rid"] = rid
    if upload is not None:
        frame["upload"] = upload
    if part is not None:
        frame["part"] = part
    frame.update(extra)
    return frame


def error_from(exc: RequestError) -> dict[str, Any]:
    return error(exc.code, exc.msg, rid=exc.rid, upload=exc.upload, part=exc.part, **exc.extra)
