"""Every abuse limit, crossed: the contract's answer, and nothing harmed."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from urllib.parse import SplitResult, parse_qsl, quote, urlsplit

import httpx
import pytest
import websockets
from miniopy_async.credentials import Credentials
from miniopy_async.signer import presign_v4

from tests.conftest import unique
from tests.support.client import SyncClient, register_login
from tests.support.db import share

PASSWORD = "correct horse battery"


async def attempt(http: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await http.post("/v1/auth/login", json={"username": username, "password": password})


async def test_login_throttled_per_account_with_retry_after(make_server, db):
    await db.execute("DELETE FROM auth_failures")
    server = make_server(login_max_failures=3, login_window=2)
    name = unique("victim")
    await register_login(server.http, name)
    async with httpx.AsyncClient(base_url=server.http) as http:
        for _ in range(3):
            assert (await attempt(http, name, "wrong password")).status_code == 401
        r = await attempt(http, name, PASSWORD)  # even the right password waits now
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 2
        await asyncio.sleep(2.1)  # the window passes
        assert (await attempt(http, name, PASSWORD)).status_code == 200


async def test_password_change_is_throttled_on_the_login_counters(make_server, db):
    """Guessing the current password through PATCH /v1/account (with a stolen access
    token) is throttled like logins, on the same per-account counter."""
    await db.execute("DELETE FROM auth_failures")
    server = make_server(login_max_failures=3, login_window=2)
    name = unique("guessed")
    tokens = await register_login(server.http, name)
    auth = {"Authorization": f"Bearer {tokens['access']}"}

    def change(current: str) -> dict[str, object]:
        return {"password": {"current": current, "new": "a new password"}}

    async with httpx.AsyncClient(base_url=server.http, headers=auth) as http:
        for _ in range(3):
            r = await http.patch("/v1/account", json=change("wrong password"))
            assert r.status_code == 403, r.text
        r = await http.patch("/v1/account", json=change(PASSWORD))  # right, but must wait
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 2
        assert (await attempt(http, name, PASSWORD)).status_code == 429  # one counter
        await asyncio.sleep(2.1)
        r = await http.patch("/v1/account", json=change(PASSWORD))
        assert r.status_code == 200, r.text


async def test_login_throttled_per_address_across_accounts(make_server, db):
    await db.execute("DELETE FROM auth_failures")
    server = make_server(login_max_failures=4, login_window=30)
    names = [unique("acct") for _ in range(3)]
    for name in names:
        await register_login(server.http, name)
    async with httpx.AsyncClient(base_url=server.http) as http:
        for i in range(4):  # spread over accounts: no account reaches its own limit
            assert (await attempt(http, names[i % 2], "wrong password")).status_code == 401
        r = await attempt(http, names[2], PASSWORD)
        assert r.status_code == 429 and "retry-after" in r.headers


@pytest.mark.parametrize("trusted", [True, False], ids=["proxy-trusted", "peer-untrusted"])
async def test_login_throttle_believes_forwarded_for_only_from_trusted_proxies(
    make_server, db, trusted
):
    """Behind a reverse proxy every client has the proxy's address. With the proxy
    trusted, each client is throttled on its own X-Forwarded-For address; from any
    other peer the header is ignored, or a guesser could name a fresh address for
    every guess."""
    await db.execute("DELETE FROM auth_failures")
    server = make_server(
        login_max_failures=3, login_window=30, trusted_proxies="127.0.0.1" if trusted else ""
    )
    names = [unique("proxied") for _ in range(3)]
    for name in names:
        await register_login(server.http, name)
    guesser = {"X-Forwarded-For": "203.0.113.7"}
    other = {"X-Forwarded-For": "198.51.100.20, 203.0.113.8"}  # client, then a proxy

    async def login(name: str, password: str, headers: dict[str, str]) -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.http, headers=headers) as http:
            return await attempt(http, name, password)

    try:
        for i in range(3):  # spread over accounts: no account reaches its own limit
            assert (await login(names[i % 2], "wrong password", guesser)).status_code == 401
        assert (await login(names[2], PASSWORD, guesser)).status_code == 429
        r = await login(names[2], PASSWORD, other)
        if trusted:  # the proxy appended the peer it saw: that is the client
            assert r.status_code == 200, r.text
            counted = {k for (k,) in await db.fetch("SELECT key FROM auth_failures")}
            assert "addr:203.0.113.7" in counted and "addr:127.0.0.1" not in counted
        else:
            assert r.status_code == 429  # one peer, whatever it claims
    finally:
        await db.execute("DELETE FROM auth_failures")


async def test_frame_rate_refuses_excess_requests_and_the_session_survives(make_server):
    server = make_server(frame_rate=20)
    tokens = await register_login(server.http, unique("flood"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    rids = [client.rid() for _ in range(150)]
    for rid in rids:
        await client.send({"t": "ping", "rid": rid})
    replies = [await client.wait_for(lambda f, r=rid: f.get("rid") == r) for rid in rids]
    kinds = [r["t"] for r in replies]
    assert kinds.count("pong") >= 20  # the burst
    limited = [r for r in replies if r["t"] == "error"]
    assert limited and all(r["code"] == "rate_limited" and r["retry"] for r in limited)
    await asyncio.sleep(1.0)
    assert (await client.request({"t": "ping"}))["t"] == "pong"
    await client.close()


async def test_byte_rate_delays_chunks_but_loses_nothing(make_server):
    rate = 256 * 1024
    server = make_server(
        byte_rate=rate, window=256 * 1024, max_chunk=64 * 1024, max_frame=128 * 1024
    )
    tokens = await register_login(server.http, unique("slow"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    data = os.urandom(3 * rate)
    started = time.monotonic()
    done = await client.push([data[: len(data) // 2], data[len(data) // 2 :]])
    elapsed = time.monotonic() - started
    # The first window's worth is the burst; the remaining 2 x rate take >= 2 s.
    assert elapsed >= 1.8, f"{len(data)} bytes in {elapsed:.2f}s at {rate} B/s"
    change = await client.wait_for(lambda f: f["t"] == "change" and f["seq"] == done["seq"])
    got = b"".join([await client.download(p["id"]) for p in change["parts"]])
    assert got == data
    await client.close()


async def test_open_upload_cap(make_server):
    server = make_server(max_open_uploads=2)
    tokens = await register_login(server.http, unique("many"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    first = await client.start_upload([b"a"])
    await client.start_upload([b"b"])
    third = await client.start_upload([b"c"])
    assert third["t"] == "error" and third["code"] == "rate_limited" and third["retry"]
    await client.request({"t": "abort", "upload": first["upload"]})
    assert (await client.start_upload([b"c"]))["t"] == "upload_ok"
    await client.close()


async def test_staged_bytes_cap(make_server):
    server = make_server(max_staged_bytes=1000)
    tokens = await register_login(server.http, unique("staged"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    ok = await client.start_upload([os.urandom(600)])
    assert ok["t"] == "upload_ok"
    over = await client.start_upload([os.urandom(600)])
    assert over["t"] == "error" and over["code"] == "quota_exceeded"
    await client.close()


async def test_quota_reserves_unfinished_uploads_and_is_rechecked_at_commit(make_server, db):
    server = make_server(default_quota=1000)
    tokens = await register_login(server.http, unique("quota"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    user = client.welcome["user"]
    part = os.urandom(600)
    ok = await client.start_upload([part])
    reserved = await client.start_upload([os.urandom(600)])  # 600 already reserved
    assert reserved["t"] == "error" and reserved["code"] == "quota_exceeded"
    await client.send_parts(ok["upload"], [part])
    await db.execute("UPDATE users SET quota = 500 WHERE id = $1", user)  # shrinks meanwhile
    refused = await client.request({"t": "commit", "upload": ok["upload"]})
    assert refused["t"] == "error" and refused["code"] == "quota_exceeded"
    assert await db.fetchval("SELECT used FROM users WHERE id = $1", user) == 0
    await db.execute("UPDATE users SET quota = 1000 WHERE id = $1", user)
    done = await client.request({"t": "commit", "upload": ok["upload"]})  # the data was kept
    assert done["t"] == "committed"
    assert await db.fetchval("SELECT used FROM users WHERE id = $1", user) == 600
    await client.close()


async def test_an_editors_unfinished_upload_reserves_the_owners_quota(make_server, db):
    """The owner pays for a shared object, so an editor's upload to it holds the
    owner's free space, not the editor's, until it is committed or aborted."""
    server = make_server(default_quota=1000)
    owner = await SyncClient.connect(
        server.ws, (await register_login(server.http, unique("own")))["access"]
    )
    editor = await SyncClient.connect(
        server.ws, (await register_login(server.http, unique("ed")))["access"]
    )
    obj = (await owner.push([os.urandom(100)]))["object"]
    await share(db, obj, editor.welcome["user"])
    revision = await editor.start_upload([os.urandom(600)], obj=obj, base=1)
    assert revision["t"] == "upload_ok", revision
    # 100 used + 600 reserved (the revision replaces the 100 once committed).
    squeezed = await owner.start_upload([os.urandom(500)])
    assert squeezed["t"] == "error" and squeezed["code"] == "quota_exceeded", squeezed
    own = await editor.start_upload([os.urandom(900)])  # the editor's quota is untouched
    assert own["t"] == "upload_ok", own
    aborted = await editor.request({"t": "abort", "upload": revision["upload"]})
    assert aborted["t"] == "ok", aborted
    fits = await owner.start_upload([os.urandom(500)])
    assert fits["t"] == "upload_ok", fits
    await owner.close()
    await editor.close()


async def test_concurrent_uploads_cannot_share_the_same_free_space(make_server):
    server = make_server(default_quota=1000)
    tokens = await register_login(server.http, unique("race"))
    clients = [
        await SyncClient.connect(server.ws, tokens["access"], device=f"d{i}") for i in range(4)
    ]
    replies = await asyncio.gather(*(c.start_upload([os.urandom(600)]) for c in clients))
    assert sorted(r["t"] for r in replies) == ["error", "error", "error", "upload_ok"]
    for c in clients:
        await c.close()


async def test_idle_sessions_are_closed_and_active_ones_kept(make_server):
    server = make_server(idle_timeout=0.6)
    tokens = await register_login(server.http, unique("idle"))
    idle = await SyncClient.connect(server.ws, tokens["access"], device="idle")
    busy = await SyncClient.connect(server.ws, tokens["access"], device="busy")
    assert idle.welcome["idle_timeout"] == 0.6
    for _ in range(6):
        await asyncio.sleep(0.2)
        assert (await busy.request({"t": "ping"}))["t"] == "pong"
    code, reason = await idle.closed(timeout=5)
    assert code == 4408 and "idle" in reason
    await busy.close()


def resign(url: str, path: str, s3_config) -> str:
    """The signature SigV4 gives ``url``'s parameters with ``path`` as the object."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "X-Amz-Signature"]
    params = dict(query)
    date = dt.datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    unsigned = SplitResult(
        parts.scheme,
        parts.netloc,
        path,
        "&".join(f"{k}={quote(v, safe='')}" for k, v in query if not k.startswith("X-Amz-")),
        "",
    )
    signed = presign_v4(
        "GET",
        unsigned,
        s3_config.region,
        Credentials(s3_config.access_key, s3_config.secret_key),
        date,
        int(params["X-Amz-Expires"]),
    )
    return dict(parse_qsl(signed.query))["X-Amz-Signature"]


async def test_presigned_urls_expire_and_are_bound_to_one_object(make_server, s3_config):
    server = make_server("s3", presign_ttl=2)
    tokens = await register_login(server.http, unique("presign"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    auth = {"Authorization": f"Bearer {tokens['access']}"}
    urls = []
    async with httpx.AsyncClient(base_url=server.http, headers=auth) as http:
        for data in (b"first object", b"second object"):
            done = await client.push([data])
            obj = (await http.get(f"/v1/object/{done['object']}")).json()
            r = await http.get(f"/v1/partition/{obj['parts'][0]['id']}")
            assert r.status_code == 307
            urls.append(r.headers["location"])
    first, second = (urlsplit(u) for u in urls)
    params = dict(parse_qsl(first.query))
    assert params["X-Amz-Expires"] == "2"
    # The signature covers the object's path: recomputed, it matches for the URL's
    # own object and differs for any other, so S3 refuses it there.
    assert resign(urls[0], first.path, s3_config) == params["X-Amz-Signature"]
    assert resign(urls[0], second.path, s3_config) != params["X-Amz-Signature"]
    async with httpx.AsyncClient() as bare:
        assert (await bare.get(urls[0])).content == b"first object"
        tampered = urls[0].replace(params["X-Amz-Signature"], "0" * 64)
        if (await bare.get(tampered)).status_code == 403:  # an endpoint that checks (MinIO, S3)
            forged = urls[0].replace(first.path, second.path)
            assert (await bare.get(forged)).status_code == 403
            await asyncio.sleep(3)
            assert (await bare.get(urls[0])).status_code == 403
    await client.close()


@pytest.mark.parametrize("size", [0, 1])
async def test_rest_bodies_beyond_the_limit_are_refused(make_server, size):
    server = make_server(max_frame=128 * 1024, max_chunk=64 * 1024)
    tokens = await register_login(server.http, unique("body"))
    body = b"x" * (2 * 128 * 1024 + 1 + size)
    async with httpx.AsyncClient(base_url=server.http) as http:
        r = await http.post(
            "/v1/upload",
            content=body,
            headers={
                "Authorization": f"Bearer {tokens['access']}",
                "Content-Type": "application/json",
            },
        )
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


async def test_a_session_beyond_the_per_user_cap_is_refused(make_server):
    server = make_server(max_sessions_per_user=1)
    tokens = await register_login(server.http, unique("cap"))
    first = await SyncClient.connect(server.ws, tokens["access"])
    with pytest.raises(websockets.ConnectionClosed) as refused:
        await SyncClient.connect(server.ws, tokens["access"], device="second")
    assert refused.value.rcvd is not None and refused.value.rcvd.code == 4429
    assert (await first.request({"t": "ping"}))["t"] == "pong"
    await first.close()


async def test_long_polls_per_user_are_capped(make_server):
    """Parked GET /v1/changes requests are bounded per user: one more gets 429, a
    poll without wait= is never refused, and a freed slot can be used again."""
    server = make_server(max_long_polls=2)
    tokens = await register_login(server.http, unique("poller"))
    auth = {"Authorization": f"Bearer {tokens['access']}"}
    async with httpx.AsyncClient(base_url=server.http, headers=auth, timeout=30) as http:
        parked = [
            asyncio.create_task(http.get("/v1/changes", params={"since": 0, "wait": 2}))
            for _ in range(2)
        ]
        await asyncio.sleep(0.5)
        r = await http.get("/v1/changes", params={"since": 0, "wait": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert "retry-after" in r.headers
        assert (await http.get("/v1/changes", params={"since": 0})).status_code == 200
        for task in parked:
            assert (await task).status_code == 200
        r = await http.get("/v1/changes", params={"since": 0, "wait": 0.2})
        assert r.status_code == 200
