"""The REST API: accounts, the fallback upload and download paths, health.

Bytes (encrypted names, keys, salts, hashes) travel as standard base64 strings
in JSON. Errors are ``{"error": {"code", "message"}}`` with the HTTP status of
the code, so a REST client and a WebSocket client see the same error codes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from protocol.errors import ErrorCode, FrameError, RequestError
from protocol.frames import MAX_DEVICE, parse_client_frame, parse_meta, parse_parts
from protocol.frames import Put as PutFrame
from protocol.frames import Upload as UploadFrame
from server.auth import AccessClaims, AuthError, Throttled
from server.changes import read_changes
from server.db import TRANSIENT_DB_ERRORS
from server.metrics import CONTENT_TYPE_LATEST, render
from server.services import Services
from server.stores import BlobNotFound, StoreError

STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.HASH_MISMATCH: 400,
    ErrorCode.BAD_OFFSET: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.QUOTA_EXCEEDED: 413,
    ErrorCode.INCOMPLETE: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}

#: Largest JSON request body (an upload declaration of max_parts parts fits).
JSON_LIMIT_FACTOR = 2
#: Request bodies are written to the spool in pieces of about this size.
SPOOL_PIECE = 1 << 20


class ApiError(RequestError):
    """A RequestError raised by REST code, optionally with extra headers."""

    def __init__(
        self, code: ErrorCode, msg: str = "", headers: dict[str, str] | None = None, **extra: object
    ) -> None:
        super().__init__(code, msg, **extra)
        self.headers = headers or {}


# ----------------------------------------------------------------- helpers


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def reply(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(_jsonable(body), status_code=status)


def error_response(exc: RequestError) -> JSONResponse:
    body: dict[str, Any] = {"code": exc.code.value, "message": exc.msg}
    body.update(_jsonable(exc.extra))
    headers = getattr(exc, "headers", None)
    return JSONResponse({"error": body}, status_code=STATUS[exc.code], headers=headers)


def services(request: Request) -> Services:
    return request.app.state.services


async def authenticate(request: Request) -> AccessClaims:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            ErrorCode.UNAUTHORIZED, "missing bearer token", {"WWW-Authenticate": "Bearer"}
        )
    auth = services(request).auth
    try:
        claims = auth.verify_access(token.strip())
        await auth.check_live(claims)
    except AuthError as exc:
        raise ApiError(ErrorCode.UNAUTHORIZED, str(exc), {"WWW-Authenticate": "Bearer"}) from None
    return claims


async def read_json(request: Request) -> dict[str, Any]:
    limit = services(request).settings.max_frame * JSON_LIMIT_FACTOR
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(ErrorCode.TOO_LARGE, f"request body over {limit} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(ErrorCode.TOO_LARGE, f"request body over {limit} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(ErrorCode.BAD_FRAME, "body must be JSON") from None
    if not isinstance(data, dict):
        raise ApiError(ErrorCode.BAD_FRAME, "body must be a JSON object")
    if _holds_nul(data):
        raise ApiError(ErrorCode.BAD_FRAME, "strings must not contain NUL (\\u0000)")
    return data


def _holds_nul(value: Any) -> bool:
    """Whether a decoded JSON value has a NUL in any string: PostgreSQL's text holds
    none, so such a value would fail its statement (a 500, or in a batch of several
    requests' writes, theirs too)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(map(_holds_nul, value))
    return False


def _string(data: dict[str, Any], name: str, max_len: int = 1024) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise ApiError(ErrorCode.BAD_FRAME, f"{name!r} must be a non-empty string")
    return value


def _int_param(request: Request, name: str, default: int, lo: int = 0, hi: int = 2**62) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(ErrorCode.BAD_FRAME, f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise ApiError(ErrorCode.BAD_FRAME, f"{name} must be {lo}..{hi}")
    return value


def _float_param(request: Request, name: str, default: float, lo: float, hi: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(ErrorCode.BAD_FRAME, f"{name} must be a number") from None
    if not lo <= value <= hi:
        raise ApiError(ErrorCode.BAD_FRAME, f"{name} must be {lo}..{hi}")
    return value


def _path_int(request: Request, name: str) -> int:
    try:
        value = int(request.path_params[name])
    except ValueError:
        raise ApiError(ErrorCode.NOT_FOUND, f"no such {name}") from None
    if not 0 < value < 2**63:
        raise ApiError(ErrorCode.NOT_FOUND, f"no such {name}")
    return value


def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise FrameError(f"{name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FrameError(f"{name} is not valid base64") from None


Handler = Callable[[Request], Awaitable[Response]]


def endpoint(handler: Handler) -> Handler:
    """Turn the errors of a handler into the contract's JSON errors."""

    async def wrapped(request: Request) -> Response:
        try:
            # No id holds a NUL (%00), and no statement may be given one.
            if any("\x00" in value for value in request.path_params.values()):
                raise ApiError(ErrorCode.NOT_FOUND, "no such resource")
            return await handler(request)
        except RequestError as exc:
            error = exc
        except FrameError as exc:
            error = ApiError(ErrorCode.BAD_FRAME, exc.reason)
        except Throttled as exc:
            retry = {"Retry-After": str(math.ceil(exc.retry_after))}
            error = ApiError(ErrorCode.RATE_LIMITED, str(exc), retry)
        except BlobNotFound:
            error = ApiError(ErrorCode.INTERNAL, "stored data is missing")
        except (StoreError, *TRANSIENT_DB_ERRORS) as exc:
            error = ApiError(ErrorCode.UNAVAILABLE, f"backend unavailable: {type(exc).__name__}")
        services(request).counters.error("rest", error.code.value)
        return error_response(error)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


# ------------------------------------------------------------------- auth


def _address(request: Request) -> str:
    """The peer's address, for throttling per address ("" when unknown)."""
    # Capped: from a trusted proxy it is what the proxy reports, and it becomes a
    # key in PostgreSQL (an IPv6 address is at most 45 characters).
    return request.client.host[:64] if request.client else ""


@endpoint
async def register(request: Request) -> Response:
    data = await read_json(request)
    user = await services(request).auth.register(
        _string(data, "username", 64), _string(data, "password", 1024)
    )
    return reply({"user": user, "username": data["username"]}, 201)


#: Longest device name (``login``, ``PATCH /v1/devices/{id}``), in characters.
MAX_DEVICE_NAME = 100


def _device_name(data: dict[str, Any]) -> str | None:
    """A device's name as the user calls it ("Alice's laptop"), so that the device
    list is worth reading before revoking one; None when not given."""
    name = data.get("device_name")
    if name is None:
        return None
    if not isinstance(name, str) or len(name) > MAX_DEVICE_NAME or not name.isprintable():
        raise ApiError(
            ErrorCode.BAD_FRAME,
            f"device_name must be printable text of at most {MAX_DEVICE_NAME} characters",
        )
    return name.strip()


@endpoint
async def login(request: Request) -> Response:
    data = await read_json(request)
    device = data.get("device")
    if device is not None and (not isinstance(device, str) or not 0 < len(device) <= MAX_DEVICE):
        raise ApiError(ErrorCode.BAD_FRAME, "device must be a short string")
    name = _device_name(data)
    if name is not None and device is None:
        raise ApiError(ErrorCode.BAD_FRAME, "device_name names the login's device: send device")
    try:
        pair = await services(request).auth.login(
            _string(data, "username", 64),
            _string(data, "password", 1024),
            device,
            _address(request),
            device_name=name,
        )
    except AuthError as exc:
        raise ApiError(ErrorCode.UNAUTHORIZED, str(exc)) from None
    return reply(pair.as_json())


@endpoint
async def refresh(request: Request) -> Response:
    data = await read_json(request)
    try:
        pair = await services(request).auth.refresh(_string(data, "refresh", 256))
    except AuthError as exc:
        raise ApiError(ErrorCode.UNAUTHORIZED, str(exc)) from None
    return reply(pair.as_json())


@endpoint
async def logout(request: Request) -> Response:
    data = await read_json(request)
    await services(request).auth.logout(_string(data, "refresh", 256))
    return Response(status_code=204)


@endpoint
async def account(request: Request) -> Response:
    claims = await authenticate(request)
    return await _account(request, claims.user)


async def _account(request: Request, user: int) -> Response:
    row = await services(request).pool.fetchrow(
        "SELECT username, created_at, used, quota, change_seq FROM users WHERE id = $1",
        user,
    )
    if row is None:
        raise ApiError(ErrorCode.UNAUTHORIZED, "account no longer exists")
    return reply(
        {
            "user": user,
            "username": row["username"],
            "member_since": row["created_at"].isoformat(),
            "used": row["used"],
            "quota": row["quota"],
            "head": row["change_seq"],
        }
    )


MAX_KEY_BUNDLE = 64 * 1024


@endpoint
async def patch_account(request: Request) -> Response:
    """Change the password (``{"password": {"current", "new"}, "key_bundle"?}``)."""
    claims = await authenticate(request)
    data = await read_json(request)
    unknown = set(data) - {"password", "key_bundle"}
    if unknown:
        raise ApiError(ErrorCode.BAD_FRAME, f"cannot change {', '.join(sorted(unknown))}")
    change = data.get("password")
    if not isinstance(change, dict):
        raise ApiError(ErrorCode.BAD_FRAME, "password must be {current, new}")
    bundle = _bundle(data["key_bundle"]) if data.get("key_bundle") is not None else None
    try:
        await services(request).auth.change_password(
            claims.user,
            _string(change, "current", 1024),
            _string(change, "new", 1024),
            claims.device,
            bundle,
            _address(request),
        )
    except AuthError as exc:
        raise ApiError(ErrorCode.FORBIDDEN, str(exc)) from None
    # Not re-authenticated: a token bound to no device is signed out by the change
    # it just made, and must still learn that the change happened.
    return await _account(request, claims.user)


def _bundle(value: Any) -> bytes:
    bundle = _b64(value, "key_bundle")
    if not 0 < len(bundle) <= MAX_KEY_BUNDLE:
        raise ApiError(ErrorCode.TOO_LARGE, f"key_bundle must be 1..{MAX_KEY_BUNDLE} bytes")
    return bundle


@endpoint
async def get_keys(request: Request) -> Response:
    claims = await authenticate(request)
    bundle = await services(request).pool.fetchval(
        "SELECT key_bundle FROM users WHERE id = $1", claims.user
    )
    return reply({"key_bundle": bytes(bundle) if bundle is not None else None})


@endpoint
async def put_keys(request: Request) -> Response:
    """Store the key bundle. ``"replace": false`` refuses to overwrite one (409), so two
    first devices racing to create a master key cannot clobber each other."""
    claims = await authenticate(request)
    data = await read_json(request)
    bundle = _bundle(data.get("key_bundle"))
    replace = data.get("replace", True)
    if not isinstance(replace, bool):
        raise ApiError(ErrorCode.BAD_FRAME, "replace must be a boolean")
    stored = await services(request).pool.fetchval(
        "UPDATE users SET key_bundle = $2 WHERE id = $1 AND ($3 OR key_bundle IS NULL) RETURNING 1",
        claims.user,
        bundle,
        replace,
    )
    if not stored:
        raise ApiError(ErrorCode.CONFLICT, "a key bundle already exists")
    return Response(status_code=204)


_DEVICE_COLUMNS = "id, name, created_at, last_seen, acked, revoked_at"


def _device_json(r: asyncpg.Record, current: str | None) -> dict[str, Any]:
    return {
        "id": r["id"],
        "name": r["name"],
        "created_at": r["created_at"].isoformat(),
        "last_seen": r["last_seen"].isoformat(),
        "acked": r["acked"],
        "revoked": r["revoked_at"] is not None,
        "current": r["id"] == current,
    }


@endpoint
async def list_devices(request: Request) -> Response:
    claims = await authenticate(request)
    rows = await services(request).pool.fetch(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user_id = $1 ORDER BY created_at, id",
        claims.user,
    )
    return reply({"devices": [_device_json(r, claims.device) for r in rows]})


@endpoint
async def rename_device(request: Request) -> Response:
    claims = await authenticate(request)
    data = await read_json(request)
    name = _device_name(data)
    if name is None:
        raise ApiError(ErrorCode.BAD_FRAME, "send device_name")
    row = await services(request).pool.fetchrow(
        f"UPDATE devices SET name = $3 WHERE user_id = $1 AND id = $2 RETURNING {_DEVICE_COLUMNS}",
        claims.user,
        request.path_params["device"],
        name,
    )
    if row is None:
        raise ApiError(ErrorCode.NOT_FOUND, "no such device")
    return reply(_device_json(row, claims.device))


@endpoint
async def revoke_device(request: Request) -> Response:
    claims = await authenticate(request)
    device = request.path_params["device"]
    if not await services(request).auth.revoke_device(claims.user, device):
        raise ApiError(ErrorCode.NOT_FOUND, "no such device")
    return Response(status_code=204)


# ----------------------------------------------------------------- objects


@endpoint
async def list_objects(request: Request) -> Response:
    claims = await authenticate(request)
    after = _int_param(request, "after", 0)
    limit = _int_param(request, "limit", 100, 1, 1000)
    objects = await services(request).objects.list(claims.user, after, limit)
    next_after = objects[-1]["object"] if len(objects) == limit else None
    return reply({"objects": objects, "next": next_after})


@endpoint
async def get_object(request: Request) -> Response:
    claims = await authenticate(request)
    return reply(await services(request).objects.get(claims.user, _path_int(request, "id")))


@endpoint
async def delete_object(request: Request) -> Response:
    claims = await authenticate(request)
    base = _int_param(request, "base", -1, 1)
    if base < 1:
        raise ApiError(ErrorCode.BAD_FRAME, "base (the revision being deleted) is required")
    svc = services(request)
    result = await svc.objects.delete(claims.user, _path_int(request, "id"), base, claims.device)
    svc.counters.deletes += 1
    return reply({"object": result.object, "rev": result.rev, "seq": result.seq})


class _Waiter:
    """A long-poll's subscription to the hub."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def poke(self, seq: int | None) -> None:
        self.event.set()

    def control(self, action: str, device: str) -> None:
        """Long-polls are stateless: the next one re-authenticates."""


@endpoint
async def changes(request: Request) -> Response:
    """The change feed over HTTP; ``wait=`` seconds long-polls for the next change."""
    claims = await authenticate(request)
    svc = services(request)
    since = _int_param(request, "since", 0)
    limit = _int_param(request, "limit", 500, 1, 1000)
    wait = _float_param(request, "wait", 0.0, 0.0, svc.settings.long_poll_max)
    cap = svc.settings.max_long_polls
    if wait > 0 and svc.hub.count(claims.user, _Waiter) >= cap:
        # Each waiting poll holds a request and a subscription: bounded per user.
        raise ApiError(
            ErrorCode.RATE_LIMITED,
            f"at most {cap} long-polls at once",
            {"Retry-After": "1"},
        )
    waiter = _Waiter()
    svc.hub.subscribe(claims.user, waiter)  # before the read: no change slips between
    try:
        found = await read_changes(svc.pool, claims.user, since, limit)
        deadline = asyncio.get_running_loop().time() + wait
        # A poke is a hint (a listener reconnect pokes everyone): keep waiting
        # until a read finds something or the deadline passes.
        while not found and (left := deadline - asyncio.get_running_loop().time()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await waiter.event.wait()
            waiter.event.clear()
            found = await read_changes(svc.pool, claims.user, since, limit)
    finally:
        svc.hub.unsubscribe(claims.user, waiter)
    cursor = found[-1]["seq"] if found else since
    return reply({"changes": found, "cursor": cursor, "more": len(found) == limit})


# -------------------------------------------------------------- partitions


@endpoint
async def partition_info(request: Request) -> Response:
    claims = await authenticate(request)
    part = await services(request).objects.partition(claims.user, _path_int(request, "id"))
    return reply(part.info())


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single byte range; None means the whole body.

    Raises ApiError 416-style (bad_offset) for an unsatisfiable range.
    """
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if not match:
        return None  # multiple or malformed ranges: RFC 9110 lets us send it all
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":
        length = int(last)
        if length == 0:
            raise _unsatisfiable(size)
        return max(0, size - length), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or end <= start:
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> ApiError:
    return ApiError(
        ErrorCode.BAD_OFFSET, "range not satisfiable", {"Content-Range": f"bytes */{size}"}
    )


@endpoint
async def download(request: Request) -> Response:
    claims = await authenticate(request)
    svc = services(request)
    part = await svc.objects.partition(claims.user, _path_int(request, "id"))
    url = await svc.store.presign_get(part.store_key, svc.settings.presign_ttl)
    if url is not None:
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    try:
        span = parse_range(request.headers.get("range"), part.size)
    except ApiError as exc:
        response = error_response(exc)
        response.status_code = 416
        return response
    start, end = span or (0, part.size)
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Length": str(end - start),
        "ETag": f'"{part.sha256.hex()}"',
        "Cache-Control": "private, no-transform",
    }
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{part.size}"
    # Open the stream before answering, so a missing blob is a clean error.
    chunks = svc.store.read(part.store_key, start, end - start)
    first = await anext(aiter(chunks), b"")

    counters = svc.counters

    async def body() -> AsyncIterator[bytes]:
        yield first
        counters.download_bytes += len(first)
        async for piece in chunks:
            yield piece
            counters.download_bytes += len(piece)

    return StreamingResponse(
        body(),
        status_code=206 if span is not None else 200,
        headers=headers,
        media_type="application/octet-stream",
    )


# ----------------------------------------------------------------- uploads


def _meta_json(raw: Any) -> dict[str, bytes]:
    """``meta`` of a JSON request, its base64 fields decoded (checked by the protocol)."""
    if not isinstance(raw, dict):
        raise FrameError("meta must be an object")
    return {k: _b64(raw.get(k), f"meta.{k}") for k in ("name", "mtime", "key", "salt")}


def _part_json(raw: Any, where: str) -> dict[str, Any]:
    """One part spec of a JSON request, its base64 fields decoded."""
    if not isinstance(raw, dict):
        raise FrameError(f"{where} must be an object")
    fields = {k: _b64(raw.get(k), f"{where}.{k}") for k in ("sha256", "key", "salt")}
    return {"size": raw.get("size"), **fields}


def _upload_frame(data: dict[str, Any], request: Request) -> UploadFrame:
    limits = services(request).settings.limits
    meta = parse_meta({"meta": _meta_json(data.get("meta"))})
    parts_raw = data.get("parts")
    if not isinstance(parts_raw, list):
        raise FrameError("parts must be a list")
    parts = parse_parts([_part_json(p, f"parts[{i}]") for i, p in enumerate(parts_raw)], limits)
    kind = data.get("kind")
    if kind not in ("file", "dir") or (kind == "dir" and parts):
        raise FrameError("kind must be 'file' or 'dir' (a dir has no parts)")
    obj, base = data.get("object"), data.get("base")
    for name, value in (("object", obj), ("base", base)):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise FrameError(f"{name} must be a positive integer")
    if (obj is None) != (base is None):
        raise FrameError("'object' and 'base' go together")
    return UploadFrame(rid=0, object=obj, base=base, kind=kind, meta=meta, parts=parts)


@endpoint
async def create_upload(request: Request) -> Response:
    claims = await authenticate(request)
    frame = _upload_frame(await read_json(request), request)
    record = await services(request).uploads.create(claims.user, claims.device, frame)
    return reply({"upload": record.id, "have": []}, 201)


@endpoint
async def upload_status(request: Request) -> Response:
    claims = await authenticate(request)
    record = await services(request).uploads.open(claims.user, request.path_params["upload"])
    return reply({"upload": record.id, "have": record.have, "parts": len(record.sizes)})


@endpoint
async def abort_upload(request: Request) -> Response:
    claims = await authenticate(request)
    await services(request).uploads.abort(claims.user, request.path_params["upload"])
    return Response(status_code=204)


@endpoint
async def put_part(request: Request) -> Response:
    claims = await authenticate(request)
    svc = services(request)
    upload_id = request.path_params["upload"]
    record = await svc.uploads.open(claims.user, upload_id)
    index = _int_param_path(request, "index")
    if index >= len(record.sizes):
        raise ApiError(ErrorCode.NOT_FOUND, "no such part")
    size = record.sizes[index]
    if index in record.received:
        return reply({"upload": upload_id, "part": index, "stored": True})
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) != size:
        code = ErrorCode.TOO_LARGE if int(declared) > size else ErrorCode.BAD_FRAME
        raise ApiError(code, f"part {index} is {size} bytes, the body is {declared}")
    writer = svc.uploads.writer(record, index)
    try:
        pending = bytearray()
        async for piece in request.stream():
            writer.accepted += len(piece)
            if writer.accepted > size:
                raise ApiError(ErrorCode.TOO_LARGE, f"part {index} is {size} bytes")
            pending += piece
            svc.counters.upload_bytes += len(piece)
            if len(pending) >= SPOOL_PIECE:
                await writer.call(writer.write_blocking, bytes(pending))
                pending.clear()
        if pending:
            await writer.call(writer.write_blocking, bytes(pending))
        if writer.accepted < size:
            raise ApiError(
                ErrorCode.BAD_FRAME, f"part {index} is {size} bytes, got {writer.accepted}"
            )
        await svc.uploads.store_part(record, writer)
    finally:
        await writer.call(writer.discard_blocking)
    return reply({"upload": upload_id, "part": index, "stored": True})


def _int_param_path(request: Request, name: str) -> int:
    raw = request.path_params[name]
    if not raw.isdigit() or len(raw) > 9:
        raise ApiError(ErrorCode.NOT_FOUND, "no such part")
    return int(raw)


@endpoint
async def commit_upload(request: Request) -> Response:
    claims = await authenticate(request)
    svc = services(request)
    result = await svc.uploads.commit(claims.user, request.path_params["upload"], claims.device)
    svc.counters.commits += 1
    return reply({"object": result.object, "rev": result.rev, "seq": result.seq})


@endpoint
async def put_file(request: Request) -> Response:
    """The WebSocket's ``put`` (docs §4.10) as one request: the same frame in JSON."""
    claims = await authenticate(request)
    svc = services(request)
    frame = _put_frame(await read_json(request), request)
    result = await svc.uploads.put(claims.user, claims.device, frame)
    svc.counters.upload_bytes += len(frame.data)
    svc.counters.commits += 1
    return reply({"object": result.object, "rev": result.rev, "seq": result.seq})


def _put_frame(data: dict[str, Any], request: Request) -> PutFrame:
    limits = services(request).settings.limits
    meta, part = _meta_json(data.get("meta")), _part_json(data.get("part"), "part")
    body = _b64(data.get("data"), "data")
    if len(body) > limits.max_chunk:
        raise ApiError(
            ErrorCode.TOO_LARGE, f"data is {len(body)} bytes, at most {limits.max_chunk}"
        )
    frame = {
        "t": "put",
        "rid": 0,
        "upload": data.get("upload"),
        "meta": meta,
        "part": part,
        "data": body,
    }
    for name in ("object", "base"):
        if data.get(name) is not None:
            frame[name] = data[name]
    parsed = parse_client_frame(frame, limits)
    assert isinstance(parsed, PutFrame)
    return parsed


# ------------------------------------------------------------------ health


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    """Prometheus text format; aggregate counts only, nothing about any user."""
    body = await asyncio.to_thread(render, services(request).metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def readyz(request: Request) -> Response:
    svc = services(request)
    problems = {}
    try:
        await asyncio.wait_for(svc.pool.fetchval("SELECT 1"), 5)
    except Exception as exc:
        problems["database"] = f"{type(exc).__name__}: {exc}"
    try:
        await asyncio.wait_for(svc.store.ping(), 5)
    except Exception as exc:
        problems["store"] = f"{type(exc).__name__}: {exc}"
    if problems:
        return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ready"})


def routes() -> list[BaseRoute]:
    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/v1/auth/register", register, methods=["POST"]),
        Route("/v1/auth/login", login, methods=["POST"]),
        Route("/v1/auth/refresh", refresh, methods=["POST"]),
        Route("/v1/auth/logout", logout, methods=["POST"]),
        Route("/v1/account", account),
        Route("/v1/account", patch_account, methods=["PATCH"]),
        Route("/v1/account/keys", get_keys),
        Route("/v1/account/keys", put_keys, methods=["PUT"]),
        Route("/v1/devices", list_devices),
        Route("/v1/devices/{device}", revoke_device, methods=["DELETE"]),
        Route("/v1/devices/{device}", rename_device, methods=["PATCH"]),
        Route("/v1/object", list_objects),
        Route("/v1/object/{id}", get_object),
        Route("/v1/object/{id}", delete_object, methods=["DELETE"]),
        Route("/v1/changes", changes),
        Route("/v1/partition/{id}/info", partition_info),
        Route("/v1/partition/{id}", download),
        Route("/v1/upload", create_upload, methods=["POST"]),
        Route("/v1/upload/{upload}", upload_status),
        Route("/v1/upload/{upload}", abort_upload, methods=["DELETE"]),
        Route("/v1/upload/{upload}/part/{index}", put_part, methods=["PUT"]),
        Route("/v1/upload/{upload}/commit", commit_upload, methods=["POST"]),
        Route("/v1/put", put_file, methods=["POST"]),
    ]


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {
        401: ErrorCode.UNAUTHORIZED,
        403: ErrorCode.FORBIDDEN,
        404: ErrorCode.NOT_FOUND,
        429: ErrorCode.RATE_LIMITED,
        503: ErrorCode.UNAVAILABLE,
    }.get(exc.status_code, ErrorCode.BAD_FRAME)
    body = {"error": {"code": code.value, "message": str(exc.detail)}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(
        {"error": {"code": "internal", "message": "internal error"}}, status_code=500
    )


def exception_handlers() -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    return {HTTPException: _http_error, 500: _server_error}
