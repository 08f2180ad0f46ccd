"""Hostile input over the WebSocket: every bad thing gets its exact code, and the
server is unharmed afterwards (committed data still downloads byte-identical over
a new session; for request errors the same session still answers ``ping``)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import jwt
import msgpack
import pytest
import websockets

from protocol.codec import encode
from tests.conftest import unique
from tests.support.client import SyncClient, meta, part_spec, register_login
from tests.support.server import TEST_JWT_SECRET, RunningServer

KiB = 1024

#: Small limits keep every case fast. max_frame is the smallest valid value
#: (max_chunk + 64 KiB); window holds two chunks so credit can be exceeded quickly.
LIMITS: dict[str, Any] = {
    "max_chunk": 64 * KiB,
    "max_frame": 128 * KiB,
    "window": 128 * KiB,
    "max_partition": 256 * KiB,
    "max_parts": 4,
}


@dataclass
class Env:
    server: RunningServer
    tokens: dict[str, Any]
    user: int
    object: int
    rev: int
    part_ids: list[int]
    parts: list[bytes]
    db: asyncpg.Connection

    @property
    def token(self) -> str:
        return self.tokens["access"]

    async def connect(self, device: str | None = None) -> SyncClient:
        return await SyncClient.connect(self.server.ws, self.token, device or unique("dev"))

    async def raw(self) -> SyncClient:
        """A bare WebSocket (no hello sent yet), wrapped for ``closed()``."""
        ws = await websockets.connect(self.server.ws, max_size=None, compression=None)
        return SyncClient(ws)

    async def raw_open(self) -> SyncClient:
        """A bare WebSocket after a valid hello/welcome (catch-up frames not consumed)."""
        client = await self.raw()
        await client.send(
            {"t": "hello", "v": 1, "token": self.token, "device": unique("dev"), "cursor": 0}
        )
        welcome = await client.next()
        assert welcome["t"] == "welcome", welcome
        return client


async def rest_object(server: RunningServer, token: str, obj: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.http) as http:
        r = await http.get(f"/v1/object/{obj}", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return r.json()


async def user_id(server: RunningServer, token: str) -> int:
    async with httpx.AsyncClient(base_url=server.http) as http:
        r = await http.get("/v1/account", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return int(r.json()["user"])


@pytest.fixture
async def env(make_server, db) -> Env:
    server = make_server(**LIMITS)
    tokens = await register_login(server.http, unique("alice"))
    uid = await user_id(server, tokens["access"])
    parts = [os.urandom(100 * KiB), os.urandom(30 * KiB)]
    c = await SyncClient.connect(server.ws, tokens["access"], "setup")
    done = await c.push(parts)
    await c.close()
    body = await rest_object(server, tokens["access"], done["object"])
    return Env(
        server=server,
        tokens=tokens,
        user=uid,
        object=done["object"],
        rev=done["rev"],
        part_ids=[p["id"] for p in body["parts"]],
        parts=parts,
        db=db,
    )


async def assert_unharmed(env: Env) -> None:
    """The committed object still downloads byte-identical over a new session, its
    metadata is unchanged, and no partition row of the user points at a missing blob."""
    c = await env.connect()
    try:
        for pid, data in zip(env.part_ids, env.parts, strict=True):
            assert await c.download(pid) == data
        pong = await c.request({"t": "ping"})
        assert pong["t"] == "pong"
    finally:
        await c.close()
    body = await rest_object(env.server, env.token, env.object)
    assert body["rev"] == env.rev and body["status"] == "active"
    assert [p["id"] for p in body["parts"]] == env.part_ids
    await assert_partitions_intact(env)


async def assert_partitions_intact(env: Env) -> None:
    rows = await env.db.fetch(
        "SELECT p.store_key, p.size FROM partitions p JOIN objects o ON o.id = p.object_id "
        "WHERE o.owner_id = $1",
        env.user,
    )
    assert rows
    store = app_state(env.server).services.store
    for row in rows:
        info = env.server.call(lambda key=row["store_key"]: store.stat(key))
        assert info is not None, f"partition row points at a missing blob {row['store_key']}"
        assert info.size == row["size"]


async def assert_pong(c: SyncClient) -> None:
    rid = c.rid()
    reply = await c.request({"t": "ping", "rid": rid})
    assert reply == {"t": "pong", "rid": rid}


async def open_upload(c: SyncClient, parts: list[bytes], **kw: Any) -> str:
    ok = await c.start_upload(parts, **kw)
    assert ok["t"] == "upload_ok", ok
    assert ok["have"] == []
    return ok["upload"]


async def upload_error(c: SyncClient, upload: str, part: int | None = None) -> dict[str, Any]:
    return await c.wait_for(
        lambda f: (
            f["t"] == "error"
            and f.get("upload") == upload
            and (part is None or f.get("part") == part)
        )
    )


async def commit(c: SyncClient, upload: str) -> dict[str, Any]:
    done = await c.request({"t": "commit", "upload": upload})
    assert done["t"] == "committed", done
    return done


async def assert_object_content(c: SyncClient, env: Env, obj: int, parts: list[bytes]) -> None:
    body = await rest_object(env.server, env.token, obj)
    assert [p["size"] for p in body["parts"]] == [len(p) for p in parts]
    for p, data in zip(body["parts"], parts, strict=True):
        assert await c.download(p["id"]) == data


def burst(c: SyncClient, frames: list[dict[str, Any]]) -> None:
    """Write several frames with one socket write, so the server reads them together."""
    for frame in frames:
        c.ws.protocol.send_binary(encode(frame))
    c.ws.transport.write(b"".join(c.ws.protocol.data_to_send()))


def app_state(server: RunningServer) -> Any:
    """The app's state. (RunningServer.services assumes a wrapped app, which it is not
    when uvicorn runs without proxy_headers; walk the wrappers, whichever it is.)"""
    assert server._server is not None
    app = server._server.config.loaded_app
    while not hasattr(app, "state"):
        app = app.app
    return app.state


def mint(user: int, *, exp: float, **extra: Any) -> str:
    claims = {"sub": str(user), "aud": "tessera", "typ": "access", "exp": int(exp), **extra}
    return jwt.encode(claims, TEST_JWT_SECRET, algorithm="HS256")


# ------------------------------------------------------------ close codes


# Each group runs its cases one after another on one server: a fresh session per
# case, the exact close code, then the unharmed check. Failures are collected so
# one run names every case that misbehaves.

GARBAGE: dict[str, bytes] = {
    "c1": b"\xc1\xff\x00garbage",  # 0xc1 is never valid msgpack
    "truncated": encode({"t": "ping", "rid": 1})[:-1],
    "huge-map": b"\xdf\xff\xff\xff\xff",  # a map header claiming 4 billion entries
    "huge-bin": b"\xc6\x7f\xff\xff\xff",  # a bin header claiming 2 GiB
    "trailing": b"\x81\xa1t\xa4ping\xc0",  # a complete map followed by junk
    "ext": msgpack.packb({"t": "ping", "rid": 1, "x": msgpack.ExtType(5, b"ext")}),
    "timestamp": msgpack.packb({"t": "ping", "rid": 1, "x": msgpack.Timestamp(1, 0)}),
    "empty": b"",
}

NOT_A_MAP: dict[str, bytes] = {
    name: msgpack.packb(value, use_bin_type=True)
    for name, value in {
        "list": [1, 2, 3],
        "str": "ping",
        "int": 42,
        "nil": None,
        "bin": b"\x00\x01",
        "list-of-map": [{"t": "ping", "rid": 1}],
    }.items()
}

NO_STRING_T: dict[str, bytes] = {
    name: msgpack.packb(frame, use_bin_type=True)
    for name, frame in {
        "no-t": {"rid": 1},
        "type-not-t": {"type": "ping", "rid": 1},
        "t-int": {"t": 7, "rid": 1},
        "t-bin": {"t": b"ping", "rid": 1},
        "t-nil": {"t": None, "rid": 1},
        "non-str-key": {1: "x", "t": "ping", "rid": 1},
    }.items()
}

MISSING_FIELD: dict[str, dict[str, Any]] = {
    "ping-rid": {"t": "ping"},
    "commit-upload": {"t": "commit", "rid": 1},
    "resume-rid": {"t": "resume", "upload": "u"},
    "get-part": {"t": "get", "rid": 1},
    "info-part": {"t": "info", "rid": 1},
    "delete-base": {"t": "delete", "rid": 1, "object": 1},
    "chunk-data": {"t": "chunk", "upload": "u", "part": 0, "off": 0},
    "chunk-off": {"t": "chunk", "upload": "u", "part": 0, "data": b"x"},
    "upload-meta": {"t": "upload", "rid": 1, "kind": "file", "parts": []},
    "upload-kind": {"t": "upload", "rid": 1, "meta": meta(), "parts": []},
    "meta-salt": {
        "t": "upload",
        "rid": 1,
        "kind": "file",
        "meta": {"name": b"n", "mtime": b"m", "key": b"k"},
        "parts": [],
    },
    "part-sha256": {
        "t": "upload",
        "rid": 1,
        "kind": "file",
        "meta": meta(),
        "parts": [{"size": 1, "key": b"k", "salt": b"s"}],
    },
    "ack-cursor": {"t": "ack"},
    "reauth-token": {"t": "reauth", "rid": 1},
}

WRONG_TYPE: dict[str, dict[str, Any]] = {
    "rid-str": {"t": "ping", "rid": "1"},
    "rid-bool": {"t": "ping", "rid": True},
    "rid-negative": {"t": "ping", "rid": -1},
    "rid-float": {"t": "ping", "rid": 1.5},
    "rid-nil": {"t": "ping", "rid": None},
    "part-str": {"t": "get", "rid": 1, "part": "7"},
    "part-zero": {"t": "get", "rid": 1, "part": 0},
    "off-negative": {"t": "get", "rid": 1, "part": 1, "off": -1},
    "upload-int": {"t": "commit", "rid": 1, "upload": 123},
    "upload-long": {"t": "resume", "rid": 1, "upload": "u" * 65},
    "data-str": {"t": "chunk", "upload": "u", "part": 0, "off": 0, "data": "text, not bin"},
    "chunk-part-over-max-parts": {
        "t": "chunk",
        "upload": "u",
        "part": LIMITS["max_parts"],
        "off": 0,
        "data": b"x",
    },
    "chunk-empty-upload-id": {"t": "chunk", "upload": "", "part": 0, "off": 0, "data": b"x"},
    "meta-list": {"t": "upload", "rid": 1, "kind": "file", "meta": [1], "parts": []},
    "meta-name-str": {
        "t": "upload",
        "rid": 1,
        "kind": "file",
        "meta": {**meta(), "name": "plain text"},
        "parts": [],
    },
    "kind-unknown": {"t": "upload", "rid": 1, "kind": "blob", "meta": meta(), "parts": []},
    "parts-str": {"t": "upload", "rid": 1, "kind": "file", "meta": meta(), "parts": "none"},
    "part-list": {"t": "upload", "rid": 1, "kind": "file", "meta": meta(), "parts": [[1, 2]]},
    "sha-short": {
        "t": "upload",
        "rid": 1,
        "kind": "file",
        "meta": meta(),
        "parts": [{**part_spec(b"x"), "sha256": b"short"}],
    },
    "object-without-base": {
        "t": "upload",
        "rid": 1,
        "kind": "file",
        "meta": meta(),
        "parts": [],
        "object": 5,
    },
    "dir-with-parts": {
        "t": "upload",
        "rid": 1,
        "kind": "dir",
        "meta": meta(),
        "parts": [part_spec(b"x")],
    },
    "delete-base-zero": {"t": "delete", "rid": 1, "object": 1, "base": 0},
    "ack-cursor-str": {"t": "ack", "cursor": "5"},
}


async def expect_close_each(env: Env, cases: dict[str, bytes], expected: int) -> None:
    failures = []
    for name, message in cases.items():
        c = await env.connect()
        await c.ws.send(message)
        code, reason = await c.closed()
        if code != expected or not reason:
            failures.append(f"{name}: closed with {code} {reason!r}, expected {expected}")
        await assert_unharmed(env)
    assert not failures, "\n".join(failures)


async def test_garbage_bytes_close_4400(env):
    await expect_close_each(env, GARBAGE, 4400)


async def test_msgpack_not_a_map_close_4400(env):
    await expect_close_each(env, NOT_A_MAP, 4400)


async def test_map_without_string_t_close_4400(env):
    await expect_close_each(env, NO_STRING_T, 4400)


async def test_missing_required_field_close_4400(env):
    await expect_close_each(env, {k: encode(v) for k, v in MISSING_FIELD.items()}, 4400)


async def test_wrong_field_types_close_4400(env):
    await expect_close_each(env, {k: encode(v) for k, v in WRONG_TYPE.items()}, 4400)


@pytest.mark.parametrize("when", ["after-hello", "before-hello"])
async def test_text_message_close_1003(env, when):
    c = await (env.connect() if when == "after-hello" else env.raw())
    await c.ws.send('{"t": "ping", "rid": 1}')
    code, _ = await c.closed()
    assert code == 1003
    await assert_unharmed(env)


@pytest.mark.parametrize("when", ["after-hello", "before-hello"])
async def test_oversize_message_close_1009(env, when):
    c = await (env.connect() if when == "after-hello" else env.raw())
    pad = b"\x00" * (LIMITS["max_frame"] + 1)
    await c.send({"t": "ping", "rid": 1, "pad": pad})
    code, _ = await c.closed()
    assert code == 1009
    await assert_unharmed(env)


async def test_oversize_chunk_close_1009(env):
    c = await env.connect()
    data = os.urandom(LIMITS["max_partition"])
    upload = await open_upload(c, [data])
    await c.send({"t": "chunk", "upload": upload, "part": 0, "off": 0, "data": data[: 130 * KiB]})
    code, _ = await c.closed()
    assert code == 1009
    await assert_unharmed(env)
    # The upload itself is not harmed: it resumes with nothing received and completes.
    c = await env.connect()
    ok = await c.request({"t": "resume", "upload": upload})
    assert ok["have"] == []
    await c.send_parts(upload, [data])
    done = await commit(c, upload)
    await assert_object_content(c, env, done["object"], [data])
    await c.close()


async def test_first_frame_not_hello_close_4400(env):
    c = await env.raw()
    await c.send({"t": "ping", "rid": 1})
    code, _ = await c.closed()
    assert code == 4400
    await assert_unharmed(env)


async def test_chunk_before_hello_close_4400(env):
    c = await env.raw()
    await c.send({"t": "chunk", "upload": "x", "part": 0, "off": 0, "data": b"abc"})
    code, _ = await c.closed()
    assert code == 4400
    await assert_unharmed(env)


async def test_no_hello_in_time_close_4408(make_server):
    server = make_server(hello_timeout=0.5, **LIMITS)
    ws = await websockets.connect(server.ws, max_size=None, compression=None)
    started = time.monotonic()
    code, _ = await SyncClient(ws).closed(timeout=10)
    elapsed = time.monotonic() - started
    assert code == 4408
    assert 0.3 <= elapsed < 5, elapsed
    # The server still serves a well-behaved client.
    tokens = await register_login(server.http, unique("alice"))
    c = await SyncClient.connect(server.ws, tokens["access"])
    await assert_pong(c)
    await c.close()


async def test_expired_token_close_4401(env):
    c = await env.raw()
    token = mint(env.user, exp=time.time() - 120, iat=int(time.time()) - 1000)
    await c.send({"t": "hello", "v": 1, "token": token, "device": "d", "cursor": 0})
    code, reason = await c.closed()
    assert code == 4401, (code, reason)
    await assert_unharmed(env)


async def test_valid_minted_token_is_accepted(env):
    """Control for the expired-token case: the same minting with a future exp works."""
    token = mint(env.user, exp=time.time() + 600)
    c = await SyncClient.connect(env.server.ws, token, "minted")
    assert c.welcome["user"] == env.user
    await assert_pong(c)
    await c.close()


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b.c",
        jwt.encode(
            {"sub": "1", "aud": "tessera", "typ": "access", "exp": 4102444800},
            "wrong-secret-0123456789abcdef0123456789",
            algorithm="HS256",
        ),
    ],
    ids=["garbage", "three-dots", "wrong-secret"],
)
async def test_malformed_token_close_4401(env, token):
    c = await env.raw()
    await c.send({"t": "hello", "v": 1, "token": token, "device": "d", "cursor": 0})
    code, _ = await c.closed()
    assert code == 4401
    await assert_unharmed(env)


async def test_refresh_typed_token_close_4401(env):
    token = mint(env.user, exp=time.time() + 600, typ="refresh")
    c = await env.raw()
    await c.send({"t": "hello", "v": 1, "token": token, "device": "d", "cursor": 0})
    code, _ = await c.closed()
    assert code == 4401
    await assert_unharmed(env)


@pytest.mark.parametrize(
    "change",
    [{"device": ""}, {"device": "d" * 129}, {"cursor": -1}, {"token": 5}, {"v": "1"}],
    ids=["device-empty", "device-long", "cursor-negative", "token-int", "v-str"],
)
async def test_malformed_hello_close_4400(env, change):
    c = await env.raw()
    await c.send({"t": "hello", "v": 1, "token": env.token, "device": "d", "cursor": 0, **change})
    code, _ = await c.closed()
    assert code == 4400
    await assert_unharmed(env)


async def test_hello_v2_close_4400(env):
    c = await env.raw()
    await c.send({"t": "hello", "v": 2, "token": env.token, "device": "d", "cursor": 0})
    code, _ = await c.closed()
    assert code == 4400
    await assert_unharmed(env)


async def test_second_hello_close_4400(env):
    c = await env.connect()
    await c.send({"t": "hello", "v": 1, "token": env.token, "device": "again", "cursor": 0})
    code, _ = await c.closed()
    assert code == 4400
    await assert_unharmed(env)


async def test_chunk_beyond_credit_close_4400(env):
    c = await env.connect()
    data = os.urandom(LIMITS["max_partition"])
    upload = await open_upload(c, [data])
    step = LIMITS["max_chunk"]
    # Three full chunks in one write: 192 KiB against a 128 KiB window, never
    # waiting for credit. The server reads them together, so it cannot have
    # returned credit in between.
    frames = [
        {"t": "chunk", "upload": upload, "part": 0, "off": off, "data": data[off : off + step]}
        for off in range(0, 3 * step, step)
    ]
    burst(c, frames)
    code, reason = await c.closed()
    assert code == 4400, (code, reason)
    assert "credit" in reason
    await assert_unharmed(env)


# --------------------------------------------------------- request errors


async def test_unknown_type_keeps_session(env):
    c = await env.connect()
    reply = await c.request({"t": "frobnicate", "rid": 77, "x": 1})
    assert reply["t"] == "error"
    assert reply["code"] == "unknown_type"
    assert reply["rid"] == 77
    assert reply["retry"] is False
    await assert_pong(c)
    # Without a rid it is still answered, and the session still stays open.
    await c.send({"t": "frobnicate"})
    err = await c.wait_for(lambda f: f["t"] == "error")
    assert err["code"] == "unknown_type" and "rid" not in err
    await assert_pong(c)
    await c.close()
    await assert_unharmed(env)


async def test_unknown_keys_are_ignored(env):
    c = await env.connect()
    rid = c.rid()
    reply = await c.request({"t": "ping", "rid": rid, "future": {"x": [1, 2]}, "y": b"z"})
    assert reply == {"t": "pong", "rid": rid}
    await c.close()


async def test_chunk_over_max_chunk_within_credit_too_large(env):
    c = await env.connect()
    data = os.urandom(LIMITS["max_partition"])
    upload = await open_upload(c, [data])
    big = data[: LIMITS["max_chunk"] + 1]
    assert len(big) <= c.credit
    await c.send({"t": "chunk", "upload": upload, "part": 0, "off": 0, "data": big})
    err = await upload_error(c, upload, 0)
    assert err["code"] == "too_large"
    await assert_pong(c)
    # Nothing was taken: the part is still expected from offset 0 and completes.
    await c.send_parts(upload, [data])
    done = await commit(c, upload)
    await assert_object_content(c, env, done["object"], [data])
    await c.close()
    await assert_unharmed(env)


async def test_chunk_at_wrong_offset_bad_offset(env):
    c = await env.connect()
    data = os.urandom(200 * KiB)
    upload = await open_upload(c, [data])
    await c.send_chunk(upload, 0, 10, data[10:100])
    err = await upload_error(c, upload, 0)
    assert err["code"] == "bad_offset"
    assert err["expected"] == 0
    await c.send_chunk(upload, 0, 0, data[:1000])
    await c.send_chunk(upload, 0, 500, data[500:1500])  # overlaps
    err = await upload_error(c, upload, 0)
    assert (err["code"], err["expected"]) == ("bad_offset", 1000)
    await c.send_chunk(upload, 0, 5000, data[5000:6000])  # a gap
    err = await upload_error(c, upload, 0)
    assert (err["code"], err["expected"]) == ("bad_offset", 1000)
    await assert_pong(c)
    # Continuing at the right offset completes the part.
    for off in range(1000, len(data), 50 * KiB):
        await c.send_chunk(upload, 0, off, data[off : off + 50 * KiB])
    ok = await c.wait_for(lambda f: f.get("upload") == upload and f["t"] in ("part_ok", "error"))
    assert ok["t"] == "part_ok", ok
    # A chunk for a part that is already stored is refused too.
    await c.send_chunk(upload, 0, 0, data[:10])
    err = await upload_error(c, upload, 0)
    assert err["code"] == "bad_offset"
    done = await commit(c, upload)
    await assert_object_content(c, env, done["object"], [data])
    await c.close()
    await assert_unharmed(env)


async def test_chunk_past_declared_part_size_too_large(env):
    c = await env.connect()
    data = os.urandom(1000)
    upload = await open_upload(c, [data])
    await c.send_chunk(upload, 0, 0, data[:600])
    await c.send_chunk(upload, 0, 600, os.urandom(600))  # ends at 1200 > 1000
    err = await upload_error(c, upload, 0)
    assert err["code"] == "too_large"
    await assert_pong(c)
    # The part was discarded: it is resent from 0 and commits fine.
    await c.send_parts(upload, [data])
    done = await commit(c, upload)
    await assert_object_content(c, env, done["object"], [data])
    await c.close()
    await assert_unharmed(env)


async def test_single_chunk_longer_than_part_too_large(env):
    c = await env.connect()
    data = os.urandom(1000)
    upload = await open_upload(c, [data])
    await c.send_chunk(upload, 0, 0, data + b"extra")
    err = await upload_error(c, upload, 0)
    assert err["code"] == "too_large"
    await c.send_parts(upload, [data])
    done = await commit(c, upload)
    await assert_object_content(c, env, done["object"], [data])
    await c.close()
    await assert_unharmed(env)


async def test_chunk_for_undeclared_part_not_found(env):
    c = await env.connect()
    data = os.urandom(1000)
    upload = await open_upload(c, [data])
    await c.send_chunk(upload, 1, 0, b"x")
    err = await upload_error(c, upload, 1)
    assert err["code"] == "not_found"
    await c.send_chunk("no-such-upload", 0, 0, b"x")
    err = await upload_error(c, "no-such-upload", 0)
    assert err["code"] == "not_found"
    await assert_pong(c)
    await c.send_parts(upload, [data])
    await commit(c, upload)
    await c.close()
    await assert_unharmed(env)


async def test_wrong_sha256_hash_mismatch_then_resend(env):
    c = await env.connect()
    good = [os.urandom(150 * KiB), os.urandom(5000)]
    upload = await open_upload(c, good)
    wrong = bytearray(good[0])
    wrong[-1] ^= 0xFF
    await c.send_parts(upload, [bytes(wrong), good[1]], wait=False)
    seen: dict[int, dict[str, Any]] = {}
    while len(seen) < 2:
        f = await c.wait_for(lambda f: f.get("upload") == upload and f["t"] in ("part_ok", "error"))
        seen[f["part"]] = f
    assert seen[0]["t"] == "error" and seen[0]["code"] == "hash_mismatch", seen[0]
    assert seen[1]["t"] == "part_ok", seen[1]
    await assert_pong(c)
    # A commit now is incomplete: part 0 was discarded.
    err = await c.request({"t": "commit", "upload": upload})
    assert (err["t"], err["code"], err["missing"]) == ("error", "incomplete", [0])
    # Resent correctly from offset 0: part_ok, commit, identical download.
    await c.send_parts(upload, good, indexes=[0])
    done = await commit(c, upload)
    await assert_object_content(c, env, done["object"], good)
    await c.close()
    await assert_unharmed(env)


@pytest.mark.parametrize("size", [0, LIMITS["max_partition"] + 1], ids=["zero", "over-max"])
async def test_declared_part_size_too_large(env, size):
    c = await env.connect()
    spec = part_spec(b"x")
    spec["size"] = size
    frame = {"t": "upload", "kind": "file", "meta": meta(), "parts": [part_spec(b"ok"), spec]}
    err = await c.request(frame)
    assert err["t"] == "error" and err["code"] == "too_large", err
    assert err["rid"] == frame["rid"]
    await assert_pong(c)
    await c.close()
    await assert_unharmed(env)


async def test_too_many_parts_too_large(env):
    c = await env.connect()
    parts = [b"p%d" % i for i in range(LIMITS["max_parts"] + 1)]
    err = await c.start_upload(parts)
    assert err["t"] == "error" and err["code"] == "too_large", err
    await assert_pong(c)
    # Exactly max_parts is fine.
    done = await c.push(parts[: LIMITS["max_parts"]])
    await assert_object_content(c, env, done["object"], parts[: LIMITS["max_parts"]])
    await c.close()
    await assert_unharmed(env)


async def test_commit_with_missing_part_incomplete(env):
    c = await env.connect()
    parts = [os.urandom(1000), os.urandom(2000), os.urandom(3000), os.urandom(10)]
    upload = await open_upload(c, parts)
    await c.send_parts(upload, parts, indexes=[0, 2])
    err = await c.request({"t": "commit", "upload": upload})
    assert err["t"] == "error" and err["code"] == "incomplete", err
    assert err["missing"] == [1, 3]
    assert err["upload"] == upload
    await assert_pong(c)
    await c.send_parts(upload, parts, indexes=[1, 3])
    done = await commit(c, upload)
    await assert_object_content(c, env, done["object"], parts)
    await c.close()
    await assert_unharmed(env)


async def test_commit_and_resume_unknown_upload_not_found(env):
    c = await env.connect()
    for t in ("commit", "resume", "abort"):
        err = await c.request({"t": t, "upload": "does-not-exist"})
        assert err["t"] == "error" and err["code"] == "not_found", (t, err)
    err = await c.request({"t": "get", "part": 2**62})
    assert err["t"] == "error" and err["code"] == "not_found", err
    err = await c.request({"t": "info", "part": 2**62})
    assert err["t"] == "error" and err["code"] == "not_found", err
    await assert_pong(c)
    await c.close()
    await assert_unharmed(env)


async def test_oversize_metadata_too_large(env):
    c = await env.connect()
    frame = {"t": "upload", "kind": "file", "meta": meta(b"n" * (16 * KiB + 1)), "parts": []}
    err = await c.request(frame)
    assert (err["t"], err["code"], err["rid"]) == ("error", "too_large", frame["rid"])
    spec = part_spec(b"x")
    spec["key"] = b"k" * 1025
    err = await c.request({"t": "upload", "kind": "file", "meta": meta(), "parts": [spec]})
    assert (err["t"], err["code"]) == ("error", "too_large"), err
    await assert_pong(c)
    await c.close()
    await assert_unharmed(env)


async def test_get_beyond_the_end_bad_offset(env):
    c = await env.connect()
    size = len(env.parts[0])
    err = await c.request({"t": "get", "part": env.part_ids[0], "off": size + 1})
    assert (err["t"], err["code"], err["expected"]) == ("error", "bad_offset", size)
    # At exactly the end: one empty, final data frame.
    assert await c.download(env.part_ids[0], off=size) == b""
    assert await c.download(env.part_ids[0], off=size - 10) == env.parts[0][-10:]
    await assert_pong(c)
    await c.close()
    await assert_unharmed(env)


async def test_request_flood_gets_one_reply_each(env):
    """More requests in flight than the server allows: each rid still gets exactly one
    terminal reply (its answer, or rate_limited with retry), and the session stays."""
    c = await env.connect()
    rids = list(range(1000, 1300))
    burst(c, [{"t": "info", "rid": r, "part": env.part_ids[0]} for r in rids])
    replies: dict[int, dict[str, Any]] = {}
    while len(replies) < len(rids):
        f = await c.wait_for(lambda f: f.get("rid") in rids)
        assert f["rid"] not in replies, ("two replies", f, replies[f["rid"]])
        replies[f["rid"]] = f
    kinds = {(f["t"], f.get("code")) for f in replies.values()}
    assert kinds <= {("part_info", None), ("error", "rate_limited")}, kinds
    # The first 64 (MAX_PENDING_REQUESTS) are always taken; a burst of 300 overflows.
    answered = [f for f in replies.values() if f["t"] == "part_info"]
    assert len(answered) >= 64
    assert ("error", "rate_limited") in kinds
    for f in replies.values():
        if f["t"] == "error":
            assert f["retry"] is True
        else:
            assert (f["id"], f["size"]) == (env.part_ids[0], len(env.parts[0]))
    await assert_pong(c)
    with pytest.raises(TimeoutError):  # and nothing more arrives for those rids
        await c.wait_for(lambda f: f.get("rid") in rids, timeout=0.3)
    await c.close()
    await assert_unharmed(env)


async def test_download_flood_gets_one_reply_each(env):
    c = await env.connect()
    rids = list(range(2000, 2040))
    burst(c, [{"t": "get", "rid": r, "part": env.part_ids[1]} for r in rids])
    done: dict[int, bytes | str] = {}
    partial: dict[int, bytearray] = {r: bytearray() for r in rids}
    while len(done) < len(rids):
        f = await c.wait_for(lambda f: f.get("rid") in rids)
        assert f["rid"] not in done, f
        if f["t"] == "data":
            assert f["off"] == len(partial[f["rid"]])
            partial[f["rid"]] += f["data"]
            if f.get("end"):
                done[f["rid"]] = bytes(partial[f["rid"]])
        else:
            assert (f["t"], f["code"], f["retry"]) == ("error", "rate_limited", True), f
            assert not partial[f["rid"]]
            done[f["rid"]] = "rate_limited"
    downloads = [v for v in done.values() if isinstance(v, bytes)]
    assert len(downloads) >= 16  # max_gets
    assert "rate_limited" in done.values()
    assert all(d == env.parts[1] for d in downloads)
    await assert_pong(c)
    await c.close()
    await assert_unharmed(env)


async def test_commit_right_after_last_chunk(env):
    """A commit sent before part_ok arrives waits for parts already fully received."""
    c = await env.connect()
    parts = [os.urandom(120 * KiB), os.urandom(90 * KiB)]
    upload = await open_upload(c, parts)
    await c.send_parts(upload, parts, wait=False)
    done = await c.request({"t": "commit", "upload": upload})
    assert done["t"] == "committed", done
    await assert_object_content(c, env, done["object"], parts)
    await c.close()
    await assert_unharmed(env)


async def test_duplicate_commit_is_idempotent_and_leaves_no_garbage(env):
    """A client that sends the same commit twice at once (a retry racing the original)
    gets the same answer twice, one object, and no stray partition blobs in the store."""
    c = await env.connect()
    parts = [os.urandom(60 * KiB) for _ in range(4)]
    upload = await open_upload(c, parts)
    await c.send_parts(upload, parts)
    burst(
        c,
        [
            {"t": "commit", "rid": 501, "upload": upload},
            {"t": "commit", "rid": 502, "upload": upload},
        ],
    )
    first = await c.wait_for(lambda f: f.get("rid") == 501)
    second = await c.wait_for(lambda f: f.get("rid") == 502)
    assert first["t"] == second["t"] == "committed", (first, second)
    assert (first["object"], first["rev"], first["seq"]) == (
        second["object"],
        second["rev"],
        second["seq"],
    )
    await assert_object_content(c, env, first["object"], parts)
    await c.close()
    objects = await env.db.fetchval("SELECT count(*) FROM objects WHERE owner_id = $1", env.user)
    assert objects == 2  # the fixture's object and this one
    await assert_unharmed(env)
    # Every partition blob of the user is referenced by a row: the losing commit's
    # copies must be removed by the commit itself, not left for the janitor.
    referenced = {
        r["store_key"]
        for r in await env.db.fetch(
            "SELECT p.store_key FROM partitions p JOIN objects o ON o.id = p.object_id "
            "WHERE o.owner_id = $1",
            env.user,
        )
    }
    store = app_state(env.server).services.store

    async def stored() -> set[str]:
        return {i.key async for i in store.list(f"partitions/{env.user}/")}

    leftovers = env.server.call(stored) - referenced
    assert not leftovers, f"{len(leftovers)} unreferenced partition blobs: {sorted(leftovers)}"


@pytest.mark.parametrize("store", ["local", "s3"])
async def test_retried_commit_racing_the_original_gets_the_same_answer(make_server, store):
    """A client whose commit reply is slow retries it. Whenever the retry arrives
    while the original is still running, it must get the original's answer (the
    upload is committed exactly once); never an error that sends the client back to
    re-upload parts of an upload that no longer accepts them."""
    server = make_server(store, **{**LIMITS, "max_parts": 64})
    tokens = await register_login(server.http, unique("retry"))
    c = await SyncClient.connect(server.ws, tokens["access"], "retrier")

    async def staged(n: int = 32) -> tuple[str, list[bytes]]:
        parts = [os.urandom(2000) for _ in range(n)]
        upload = await open_upload(c, parts)
        await c.send_parts(upload, parts)
        return upload, parts

    # How long one commit takes here, to aim the retries inside it.
    upload, _ = await staged()
    started = time.monotonic()
    await commit(c, upload)
    duration = time.monotonic() - started

    failures = []
    steps = 12
    for step in range(steps):
        upload, parts = await staged()
        first, second = c.rid(), c.rid()
        await c.send({"t": "commit", "rid": first, "upload": upload})
        await asyncio.sleep(duration * step / steps)
        await c.send({"t": "commit", "rid": second, "upload": upload})
        a = await c.wait_for(lambda f, r=first: f.get("rid") == r)
        b = await c.wait_for(lambda f, r=second: f.get("rid") == r)
        assert a["t"] == "committed", a
        if b["t"] != "committed" or b["seq"] != a["seq"] or b["object"] != a["object"]:
            state = await c.request({"t": "resume", "upload": upload})
            failures.append(
                f"retry at {step}/{steps} of {duration:.3f}s: {b} (then resume -> {state['t']} "
                f"{state.get('code', '')})"
            )
    # Whatever the retries were told, each upload was committed once, intact.
    ids = [p["id"] for p in (await rest_object(server, tokens["access"], a["object"]))["parts"]]
    assert [await c.download(pid) for pid in ids] == parts
    await c.close()
    assert not failures, "\n".join(failures)


async def test_dropped_connection_mid_part_then_resume(env):
    c = await env.connect()
    parts = [os.urandom(200 * KiB), os.urandom(180 * KiB), os.urandom(70 * KiB)]
    upload = await open_upload(c, parts)
    await c.send_parts(upload, parts, indexes=[0])
    # Half of part 1, then the socket vanishes without a close handshake.
    for off in range(0, 100 * KiB, 50 * KiB):
        await c.send_chunk(upload, 1, off, parts[1][off : off + 50 * KiB])
    c.ws.transport.abort()
    await assert_unharmed(env)

    c2 = await env.connect()
    ok = await c2.request({"t": "resume", "upload": upload})
    assert ok["t"] == "upload_ok", ok
    assert ok["upload"] == upload
    assert ok["have"] == [0]
    # Part 1 starts again from 0 on the new session; part 0 is not sent again.
    await c2.send_chunk(upload, 1, 100 * KiB, parts[1][100 * KiB : 150 * KiB])
    err = await upload_error(c2, upload, 1)
    assert (err["code"], err["expected"]) == ("bad_offset", 0)
    await c2.send_parts(upload, parts, indexes=[1, 2])
    done = await commit(c2, upload)
    await assert_object_content(c2, env, done["object"], parts)
    await c2.close()
    await assert_unharmed(env)


async def test_dropped_connection_twice_then_resume(env):
    parts = [os.urandom(100 * KiB), os.urandom(100 * KiB)]
    c = await env.connect()
    upload = await open_upload(c, parts)
    await c.send_chunk(upload, 0, 0, parts[0][: 50 * KiB])
    c.ws.transport.abort()
    c = await env.connect()
    ok = await c.request({"t": "resume", "upload": upload})
    assert ok["have"] == []
    await c.send_parts(upload, parts, indexes=[1])
    await c.send_chunk(upload, 0, 0, parts[0][: 50 * KiB])
    c.ws.transport.abort()
    await assert_unharmed(env)
    c = await env.connect()
    ok = await c.request({"t": "resume", "upload": upload})
    assert ok["have"] == [1]
    await c.send_parts(upload, parts, indexes=[0])
    done = await commit(c, upload)
    await assert_object_content(c, env, done["object"], parts)
    await c.close()
    await assert_unharmed(env)


async def test_stale_base_on_upload_conflict(env):
    c = await env.connect()
    v2 = [os.urandom(5000)]
    done = await c.push(v2, obj=env.object, base=env.rev)
    assert done["rev"] == env.rev + 1
    # Another edit of the old revision: conflict with the current rev.
    err = await c.start_upload([os.urandom(10)], obj=env.object, base=env.rev)
    assert err["t"] == "error" and err["code"] == "conflict", err
    assert err["rev"] == env.rev + 1
    await assert_pong(c)
    # Content is v2, untouched by the refused edit.
    await assert_object_content(c, env, env.object, v2)
    body = await rest_object(env.server, env.token, env.object)
    assert body["rev"] == env.rev + 1
    await c.close()


async def test_stale_base_at_commit_conflict(env):
    c = await env.connect()
    first, second = [os.urandom(4000)], [os.urandom(6000)]
    up1 = await open_upload(c, first, obj=env.object, base=env.rev)
    up2 = await open_upload(c, second, obj=env.object, base=env.rev)
    await c.send_parts(up1, first)
    await c.send_parts(up2, second)
    done = await commit(c, up1)
    assert done["rev"] == env.rev + 1
    err = await c.request({"t": "commit", "upload": up2})
    assert err["t"] == "error" and err["code"] == "conflict", err
    assert err["rev"] == env.rev + 1
    await assert_pong(c)
    await assert_object_content(c, env, env.object, first)
    # The losing upload's conflict is stable, and the winner's retry is idempotent.
    err = await c.request({"t": "commit", "upload": up2})
    assert (err["code"], err["rev"]) == ("conflict", env.rev + 1)
    again = await c.request({"t": "commit", "upload": up1})
    assert (again["t"], again["rev"], again["seq"]) == ("committed", done["rev"], done["seq"])
    await c.close()


async def test_upload_for_unknown_object_not_found(env):
    c = await env.connect()
    err = await c.start_upload([b"x"], obj=2**62, base=1)
    assert err["t"] == "error" and err["code"] == "not_found", err
    await assert_pong(c)
    await c.close()
    await assert_unharmed(env)


async def test_delete_with_stale_base_conflict(env):
    c = await env.connect()
    err = await c.request({"t": "delete", "object": env.object, "base": env.rev + 5})
    assert err["t"] == "error" and err["code"] == "conflict", err
    assert err["rev"] == env.rev
    await assert_pong(c)
    await c.close()
    await assert_unharmed(env)
    # A second revision makes base=1 stale; the delete is refused and nothing changes.
    c = await env.connect()
    v2 = [os.urandom(3000)]
    await c.push(v2, obj=env.object, base=env.rev)
    err = await c.request({"t": "delete", "object": env.object, "base": env.rev})
    assert (err["t"], err["code"], err["rev"]) == ("error", "conflict", env.rev + 1)
    await assert_object_content(c, env, env.object, v2)
    # The right base deletes it; then a delete of the tombstone is not_found.
    done = await c.request({"t": "delete", "object": env.object, "base": env.rev + 1})
    assert (done["t"], done["rev"]) == ("committed", env.rev + 2)
    err = await c.request({"t": "delete", "object": env.object, "base": env.rev + 2})
    assert err["code"] == "not_found", err
    await assert_pong(c)
    await c.close()


async def test_sha256_is_over_what_was_sent(env):
    """Control: a part whose declared hash matches the bytes is accepted as is."""
    c = await env.connect()
    data = os.urandom(777)
    done = await c.push([data])
    body = await rest_object(env.server, env.token, done["object"])
    assert base64.b64decode(body["parts"][0]["sha256"]) == hashlib.sha256(data).digest()
    await c.close()
