"""Accounts and tokens over the real REST API and WebSocket: register, login,
access tokens, refresh-token rotation with reuse detection, devices, expiry."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from datetime import datetime
from typing import Any

import httpx
import jwt
import pytest
import websockets
from argon2 import PasswordHasher

from tests.conftest import unique
from tests.support.client import SyncClient
from tests.support.server import TEST_JWT_SECRET

PASSWORD = "correct horse battery"


# ----------------------------------------------------------------- helpers


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post(http: str, path: str, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=http) as client:
        return await client.post(path, **kw)


async def get_account(http: str, token: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=http) as client:
        return await client.get("/v1/account", headers=bearer(token))


async def login(http: str, username: str, password: str = PASSWORD) -> dict[str, Any]:
    r = await post(http, "/v1/auth/login", json={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return r.json()


async def new_user(http: str, prefix: str = "user") -> dict[str, Any]:
    """Register and log in; the login answer plus username, password and user id."""
    username = unique(prefix)
    r = await post(http, "/v1/auth/register", json={"username": username, "password": PASSWORD})
    assert r.status_code == 201, r.text
    return {"username": username, "password": PASSWORD, "id": r.json()["user"]} | await login(
        http, username
    )


async def refresh(http: str, token: str) -> httpx.Response:
    return await post(http, "/v1/auth/refresh", json={"refresh": token})


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def mint(secret: str = TEST_JWT_SECRET, **claims: Any) -> str:
    now = int(time.time())
    base: dict[str, Any] = {"aud": "tessera", "iat": now, "exp": now + 300, "typ": "access"}
    return jwt.encode(base | claims, secret, algorithm="HS256")


def tamper_signature(token: str) -> str:
    head, payload, sig = token.split(".")
    i = len(sig) // 2  # a middle character: all six of its bits are signature bits
    flipped = "A" if sig[i] != "A" else "B"
    return f"{head}.{payload}.{sig[:i]}{flipped}{sig[i + 1 :]}"


async def hello_close(ws_url: str, token: str, device: str = "device-a") -> tuple[int | None, str]:
    """Send hello and return the close (code, reason); fails if a welcome arrives."""
    client = SyncClient(await websockets.connect(ws_url, max_size=None, compression=None))
    try:
        await client.send({"t": "hello", "v": 1, "token": token, "device": device, "cursor": 0})
        try:
            frame = await client.next(timeout=10)
        except websockets.ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd else None), (exc.rcvd.reason if exc.rcvd else "")
        assert frame["t"] != "welcome", f"session opened with a bad token: {frame}"
        return await client.closed()
    finally:
        await client.close()


# ---------------------------------------------------------------- register


async def test_register_returns_user_id_and_rejects_duplicates(server):
    username = unique("reg")
    r = await post(
        server.http, "/v1/auth/register", json={"username": username, "password": PASSWORD}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert isinstance(body["user"], int) and body["user"] > 0
    assert body["username"] == username

    again = await post(
        server.http, "/v1/auth/register", json={"username": username, "password": "other-pass-1"}
    )
    assert_error(again, 409, "conflict")
    # The first registration's password still works; the second did not overwrite it.
    assert (await login(server.http, username))["access"]


@pytest.mark.parametrize(
    "username",
    [
        "a",  # too short
        "",  # empty
        "has space",
        "x" * 65,
        "-leading-dash",
        "semi;colon",
        "ünïcode",
    ],
)
async def test_register_rejects_invalid_usernames(server, db, username):
    r = await post(
        server.http, "/v1/auth/register", json={"username": username, "password": PASSWORD}
    )
    assert_error(r, 400, "bad_frame")
    assert await db.fetchval("SELECT count(*) FROM users WHERE username = $1", username) == 0


async def test_register_rejects_username_with_trailing_newline(server, db):
    # "letters, digits, . _ @ -" only: a trailing newline must not slip through
    # (re's "$" matches before a final "\n"; fullmatch or \Z is needed).
    username = unique("nl") + "\n"
    r = await post(
        server.http, "/v1/auth/register", json={"username": username, "password": PASSWORD}
    )
    assert await db.fetchval("SELECT count(*) FROM users WHERE username = $1", username) == 0
    assert_error(r, 400, "bad_frame")


async def test_register_accepts_boundary_usernames(server):
    longest = unique("z").ljust(64, "z")
    punctuated = unique("a") + "._@-x"
    for username in (longest, punctuated):
        r = await post(
            server.http, "/v1/auth/register", json={"username": username, "password": PASSWORD}
        )
        assert r.status_code == 201, r.text
        assert r.json()["username"] == username
    # Two characters is the shortest name (another test may already own it: 409).
    r = await post(server.http, "/v1/auth/register", json={"username": "q7", "password": PASSWORD})
    assert r.status_code in (201, 409), r.text


@pytest.mark.parametrize("password", ["", "short", "1234567"])
async def test_register_rejects_short_passwords(server, password):
    r = await post(
        server.http, "/v1/auth/register", json={"username": unique("pw"), "password": password}
    )
    assert_error(r, 400, "bad_frame")


async def test_register_accepts_eight_character_password(server):
    username = unique("pw8")
    r = await post(
        server.http, "/v1/auth/register", json={"username": username, "password": "12345678"}
    )
    assert r.status_code == 201, r.text
    assert (await login(server.http, username, "12345678"))["access"]


@pytest.mark.parametrize(
    "kw",
    [
        {"content": b"not json at all", "headers": {"content-type": "application/json"}},
        {"content": b"\xff\xfe\x00garbage"},
        {"json": ["alice-123", "password123"]},
        {"json": "just a string"},
        {"json": {"username": "missing-password"}},
        {"json": {"password": "missing-username"}},
        {"json": {}},
        {"json": {"username": 12345, "password": "password123"}},
        {"json": {"username": "numeric-password", "password": 12345678}},
        {"content": b""},
    ],
    ids=[
        "not-json",
        "binary",
        "array",
        "string",
        "no-password",
        "no-username",
        "empty-object",
        "int-username",
        "int-password",
        "empty-body",
    ],
)
async def test_register_rejects_malformed_bodies(server, kw):
    r = await post(server.http, "/v1/auth/register", **kw)
    assert_error(r, 400, "bad_frame")


async def test_oversize_json_body_is_too_large(make_server):
    # The smallest max_frame that Limits.validate accepts for a 1 KiB chunk.
    server = make_server(max_chunk=1024, max_frame=1024 + 64 * 1024)
    limit = 2 * server.settings.max_frame
    big = {"username": unique("big"), "password": "p" * (limit + 10)}
    r = await post(server.http, "/v1/auth/register", json=big)
    assert_error(r, 413, "too_large")

    # Without a Content-Length (chunked), the limit holds while streaming.
    async def chunks():
        yield b'{"username": "chunked-user", "password": "'
        for _ in range(limit // 4096 + 2):
            yield b"p" * 4096
        yield b'"}'

    r = await post(server.http, "/v1/auth/login", content=chunks())
    assert_error(r, 413, "too_large")

    # Just under the limit is parsed normally (and then judged on its content).
    r = await post(
        server.http,
        "/v1/auth/register",
        json={"username": unique("fits"), "password": "p" * (limit - 200)},
    )
    assert_error(r, 400, "bad_frame")  # a password over 1024 characters, not too_large


async def test_password_is_stored_as_argon2id_hash(server, db):
    user = await new_user(server.http, "hash")
    stored = await db.fetchval("SELECT password_hash FROM users WHERE id = $1", user["id"])
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored
    assert PasswordHasher().verify(stored, PASSWORD)
    # Same password, different user: different salt, different hash.
    other = await new_user(server.http, "hash")
    other_hash = await db.fetchval("SELECT password_hash FROM users WHERE id = $1", other["id"])
    assert other_hash != stored


# ------------------------------------------------------------------- login


async def test_login_returns_token_pair(server):
    user = await new_user(server.http, "login")
    assert set(user) >= {"access", "refresh", "expires_in"}
    assert user["expires_in"] == server.settings.access_ttl
    assert user["access"] != user["refresh"]
    claims = jwt.decode(user["access"], TEST_JWT_SECRET, algorithms=["HS256"], audience="tessera")
    assert claims["sub"] == str(user["id"]) and claims["typ"] == "access"
    assert claims["exp"] - claims["iat"] == server.settings.access_ttl


async def test_wrong_password_and_unknown_user_look_the_same(server):
    user = await new_user(server.http, "login")
    wrong = await post(
        server.http,
        "/v1/auth/login",
        json={"username": user["username"], "password": "not the password"},
    )
    unknown = await post(
        server.http,
        "/v1/auth/login",
        json={"username": unique("nobody"), "password": "not the password"},
    )
    assert_error(wrong, 401, "unauthorized")
    assert_error(unknown, 401, "unauthorized")
    assert wrong.json() == unknown.json()
    assert "access" not in wrong.text and "refresh" not in wrong.json()["error"]


# ----------------------------------------------------------- access tokens


async def test_access_token_reads_account(server):
    user = await new_user(server.http, "acct")
    r = await get_account(server.http, user["access"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["username"] == user["username"]
    assert body["user"] == user["id"]
    assert body["used"] == 0
    assert body["quota"] == server.settings.default_quota
    since = datetime.fromisoformat(body["member_since"])
    assert since.tzinfo is not None
    assert abs(since.timestamp() - time.time()) < 300


async def test_access_token_opens_a_websocket_session(server):
    user = await new_user(server.http, "ws")
    client = await SyncClient.connect(server.ws, user["access"], device="laptop")
    try:
        assert client.welcome["user"] == user["id"]
        assert client.welcome["device"] == "laptop"
        pong = await client.request({"t": "ping"})
        assert pong["t"] == "pong"
    finally:
        await client.close()


async def test_missing_or_malformed_authorization_is_401(server):
    async with httpx.AsyncClient(base_url=server.http) as client:
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic abc"}):
            r = await client.get("/v1/account", headers=headers)
            assert_error(r, 401, "unauthorized")
            assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
        r = await client.get("/v1/account", headers=bearer("not-a-jwt"))
        assert_error(r, 401, "unauthorized")


async def test_tampered_token_is_rejected(server):
    user = await new_user(server.http, "tamper")
    bad = tamper_signature(user["access"])
    assert bad != user["access"]
    assert_error(await get_account(server.http, bad), 401, "unauthorized")
    code, _ = await hello_close(server.ws, bad)
    assert code == 4401

    # A payload edited to another user, keeping the original signature.
    head, _, sig = user["access"].split(".")
    claims = jwt.decode(user["access"], options={"verify_signature": False})
    claims["sub"] = str(user["id"] + 1)
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert_error(await get_account(server.http, f"{head}.{forged}.{sig}"), 401, "unauthorized")


async def test_token_with_another_secret_is_rejected(server):
    user = await new_user(server.http, "secret")
    token = mint("some-other-secret-of-sufficient-length-xyz", sub=str(user["id"]))
    assert_error(await get_account(server.http, token), 401, "unauthorized")
    code, _ = await hello_close(server.ws, token)
    assert code == 4401


async def test_unsigned_token_is_rejected(server):
    user = await new_user(server.http, "none")
    now = int(time.time())
    claims = {"sub": str(user["id"]), "aud": "tessera", "exp": now + 300, "typ": "access"}
    token = jwt.encode(claims, None, algorithm="none")
    assert_error(await get_account(server.http, token), 401, "unauthorized")


async def test_token_of_wrong_type_or_audience_is_rejected(server):
    user = await new_user(server.http, "typ")
    sub = str(user["id"])
    # The control: a minted token with the right claims is accepted.
    assert (await get_account(server.http, mint(sub=sub))).status_code == 200
    for token in (
        mint(sub=sub, typ="refresh"),
        mint(sub=sub, typ=None),
        mint(sub=sub, aud="someone-else"),
        mint(sub="not-a-number"),
    ):
        assert_error(await get_account(server.http, token), 401, "unauthorized")
    code, _ = await hello_close(server.ws, mint(sub=sub, typ="refresh"))
    assert code == 4401


async def test_expired_access_token_is_rejected(server):
    user = await new_user(server.http, "exp")
    now = int(time.time())
    token = mint(sub=str(user["id"]), iat=now - 120, exp=now - 60)
    r = await get_account(server.http, token)
    assert_error(r, 401, "unauthorized")
    assert "expired" in r.json()["error"]["message"]
    code, reason = await hello_close(server.ws, token)
    assert code == 4401
    assert "expired" in reason


async def test_token_of_deleted_user_is_rejected(server, db):
    user = await new_user(server.http, "gone")
    await db.execute("DELETE FROM users WHERE id = $1", user["id"])
    assert_error(await get_account(server.http, user["access"]), 401, "unauthorized")
    code, _ = await hello_close(server.ws, user["access"])
    assert code == 4401
    assert await db.fetchval("SELECT count(*) FROM devices WHERE user_id = $1", user["id"]) == 0


# ------------------------------------------------------------ refresh tokens


async def test_refresh_rotates_and_reuse_revokes_the_family(server, db, caplog):
    caplog.set_level(logging.WARNING, logger="server.auth")
    user = await new_user(server.http, "rot")
    first = user["refresh"]

    r = await refresh(server.http, first)
    assert r.status_code == 200, r.text
    second = r.json()
    assert set(second) == {"access", "refresh", "expires_in"}
    assert second["refresh"] != first
    assert second["expires_in"] == server.settings.access_ttl
    assert (await get_account(server.http, second["access"])).status_code == 200

    # The new refresh token works once more...
    r = await refresh(server.http, second["refresh"])
    assert r.status_code == 200, r.text
    third = r.json()

    # ...and replaying a spent one is theft: 401 and the whole family is revoked.
    caplog.clear()
    assert_error(await refresh(server.http, first), 401, "unauthorized")
    assert_error(await refresh(server.http, third["refresh"]), 401, "unauthorized")

    rows = await db.fetch(
        "SELECT family, revoked_at FROM refresh_tokens WHERE user_id = $1", user["id"]
    )
    assert len(rows) == 3
    assert len({row["family"] for row in rows}) == 1
    assert all(row["revoked_at"] is not None for row in rows)

    reuse_logs = [
        rec
        for rec in caplog.records
        if rec.name == "server.auth" and rec.levelno >= logging.WARNING
    ]
    assert reuse_logs, "reuse of a refresh token was not logged"
    assert any("reuse" in rec.getMessage() for rec in reuse_logs)
    assert str(rows[0]["family"]) in reuse_logs[0].getMessage()


async def test_reuse_revokes_only_that_family(server):
    user = await new_user(server.http, "fam")
    other_session = await login(server.http, user["username"])  # a second login: new family
    r = await refresh(server.http, user["refresh"])
    assert r.status_code == 200
    assert_error(await refresh(server.http, user["refresh"]), 401, "unauthorized")  # reuse
    r = await refresh(server.http, other_session["refresh"])
    assert r.status_code == 200, r.text


async def test_concurrent_refresh_with_one_token_succeeds_once(server):
    user = await new_user(server.http, "race")
    results = await asyncio.gather(*(refresh(server.http, user["refresh"]) for _ in range(2)))
    assert sorted(r.status_code for r in results) == [200, 401]
    winner = next(r for r in results if r.status_code == 200).json()
    # The loser replayed a spent token, so the winner's family is revoked too.
    assert_error(await refresh(server.http, winner["refresh"]), 401, "unauthorized")


async def test_refresh_tokens_are_stored_only_as_sha256(server, db):
    user = await new_user(server.http, "hashrt")
    r = await refresh(server.http, user["refresh"])
    assert r.status_code == 200
    tokens = [user["refresh"], r.json()["refresh"]]
    rows = await db.fetch(
        "SELECT hash, row_to_json(t)::text AS dump FROM refresh_tokens t WHERE user_id = $1",
        user["id"],
    )
    assert {bytes(row["hash"]) for row in rows} == {
        hashlib.sha256(t.encode()).digest() for t in tokens
    }
    for row in rows:
        for token in tokens:
            assert token not in row["dump"]


async def test_expired_refresh_token_is_rejected(server, db):
    user = await new_user(server.http, "rtexp")
    await db.execute(
        "UPDATE refresh_tokens SET expires_at = now() - interval '1 second' WHERE hash = $1",
        hashlib.sha256(user["refresh"].encode()).digest(),
    )
    assert_error(await refresh(server.http, user["refresh"]), 401, "unauthorized")


async def test_unknown_or_malformed_refresh_is_rejected(server):
    assert_error(await refresh(server.http, "never-issued-token"), 401, "unauthorized")
    user = await new_user(server.http, "rtbad")
    # An access token is not a refresh token.
    assert_error(await refresh(server.http, user["access"][:256]), 401, "unauthorized")
    r = await post(server.http, "/v1/auth/refresh", json={"token": user["refresh"]})
    assert_error(r, 400, "bad_frame")


async def test_logout_revokes_the_refresh_token(server, db):
    user = await new_user(server.http, "logout")
    r = await post(server.http, "/v1/auth/logout", json={"refresh": user["refresh"]})
    assert r.status_code == 204, r.text
    assert_error(await refresh(server.http, user["refresh"]), 401, "unauthorized")
    revoked = await db.fetchval(
        "SELECT revoked_at FROM refresh_tokens WHERE hash = $1",
        hashlib.sha256(user["refresh"].encode()).digest(),
    )
    assert revoked is not None
    # Logging out after a rotation revokes the current token of the family too.
    fresh = await login(server.http, user["username"])
    rotated = (await refresh(server.http, fresh["refresh"])).json()
    r = await post(server.http, "/v1/auth/logout", json={"refresh": rotated["refresh"]})
    assert r.status_code == 204
    assert_error(await refresh(server.http, rotated["refresh"]), 401, "unauthorized")


# ------------------------------------------------------------------ devices


async def test_hello_registers_device_and_revoked_device_is_refused(server, db):
    user = await new_user(server.http, "dev")
    client = await SyncClient.connect(server.ws, user["access"], device="phone-1")
    await client.close()
    rows = await db.fetch("SELECT id, revoked_at FROM devices WHERE user_id = $1", user["id"])
    assert [(r["id"], r["revoked_at"]) for r in rows] == [("phone-1", None)]

    await db.execute(
        "UPDATE devices SET revoked_at = now() WHERE user_id = $1 AND id = $2",
        user["id"],
        "phone-1",
    )
    code, _ = await hello_close(server.ws, user["access"], device="phone-1")
    assert code == 4403

    # Revocation is per device: another device of the same user still connects.
    other = await SyncClient.connect(server.ws, user["access"], device="phone-2")
    await other.close()
    ids = await db.fetch("SELECT id FROM devices WHERE user_id = $1 ORDER BY id", user["id"])
    assert [r["id"] for r in ids] == ["phone-1", "phone-2"]


# ------------------------------------------------------------ expiry, reauth


async def test_expiring_then_reauth_keeps_the_session(make_server):
    server = make_server(access_ttl=2)
    peer = make_server()  # same database and JWT secret, default access_ttl
    user = await new_user(server.http, "reauth")
    fresh = await login(peer.http, user["username"])
    short = await login(server.http, user["username"])
    assert short["expires_in"] == 2

    client = await SyncClient.connect(server.ws, short["access"])
    try:
        warning = await client.wait_for(lambda f: f["t"] == "expiring", timeout=5)
        assert 0 <= warning["in"] <= 2
        ok = await client.request({"t": "reauth", "token": fresh["access"]})
        assert ok["t"] == "ok", ok
        await asyncio.sleep(3)  # past the first token's expiry
        pong = await client.request({"t": "ping"})
        assert pong["t"] == "pong"
        assert [f for f in client.buffer if f["t"] == "error"] == []
    finally:
        await client.close()


async def test_session_closes_when_token_expires_without_reauth(make_server):
    server = make_server(access_ttl=2)
    user = await new_user(server.http, "lapse")
    started = time.monotonic()
    client = await SyncClient.connect(server.ws, user["access"])
    warning = await client.wait_for(lambda f: f["t"] == "expiring", timeout=5)
    assert 0 <= warning["in"] <= 2
    error = await client.wait_for(lambda f: f["t"] == "error", timeout=5)
    assert error["code"] == "unauthorized"
    code, _ = await client.closed(timeout=5)
    assert code == 4401
    assert time.monotonic() - started < 5


async def test_reauth_with_bad_tokens_is_refused(server):
    alice = await new_user(server.http, "alice")
    bob = await new_user(server.http, "bob")
    client = await SyncClient.connect(server.ws, alice["access"])
    try:
        r = await client.request({"t": "reauth", "token": bob["access"]})
        assert r["t"] == "error" and r["code"] == "forbidden", r
        r = await client.request({"t": "reauth", "token": "garbage"})
        assert r["t"] == "error" and r["code"] == "unauthorized", r
        now = int(time.time())
        expired = mint(sub=str(alice["id"]), iat=now - 120, exp=now - 60)
        r = await client.request({"t": "reauth", "token": expired})
        assert r["t"] == "error" and r["code"] == "unauthorized", r
        # The session survives refused reauths.
        assert (await client.request({"t": "ping"}))["t"] == "pong"
    finally:
        await client.close()


async def test_a_device_token_opens_and_renews_only_that_devices_sessions(server):
    """A token bound to one device cannot open a session as another device, nor renew
    one: else a revoked device could live on under another device's name."""
    from tests.support.client import register_login

    name = unique("bound")
    laptop = await register_login(server.http, name, device="laptop")
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await SyncClient.connect(server.ws, laptop["access"], device="phone")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    async with httpx.AsyncClient(base_url=server.http) as http:
        r = await http.post(
            "/v1/auth/login",
            json={"username": name, "password": "correct horse battery", "device": "phone"},
        )
        phone = r.json()
    on_phone = await SyncClient.connect(server.ws, phone["access"], device="phone")
    try:
        r = await on_phone.request({"t": "reauth", "token": laptop["access"]})
        assert r["t"] == "error" and r["code"] == "forbidden", r
        r = await on_phone.request({"t": "reauth", "token": phone["access"]})
        assert r["t"] == "ok", r
    finally:
        await on_phone.close()
