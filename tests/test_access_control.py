"""Cross-tenant isolation: bob tries every id of alice's, over every WebSocket frame
and every REST route, gets not_found, and changes nothing."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
import websockets

from tests.conftest import unique
from tests.support.client import SyncClient, register_login
from tests.support.server import TEST_JWT_SECRET, RunningServer

KiB = 1024

LIMITS: dict[str, Any] = {
    "max_chunk": 64 * KiB,
    "max_frame": 128 * KiB,
    "window": 256 * KiB,
    "max_partition": 256 * KiB,
}


#: What a WebSocket request about someone else's id may be answered with.
DENIED = ("not_found", "forbidden")


@dataclass
class Scene:
    """Alice's state that bob must not see or change."""

    server: RunningServer
    alice: dict[str, Any]
    bob: dict[str, Any]
    alice_user: int
    object: int
    rev: int
    seq: int
    part_ids: list[int]
    parts: list[bytes]
    committed_upload: str  # the upload id of alice's committed object
    open_upload: str  # an upload with part 0 received, part 1 not
    open_parts: list[bytes]

    def auth(self, who: str) -> dict[str, str]:
        token = self.alice["access"] if who == "alice" else self.bob["access"]
        return {"Authorization": f"Bearer {token}"}


async def account(server: RunningServer, token: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.http) as http:
        r = await http.get("/v1/account", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return r.json()


async def build_scene(server: RunningServer) -> Scene:
    alice = await register_login(server.http, unique("alice"))
    bob = await register_login(server.http, unique("bob"))
    alice_user = (await account(server, alice["access"]))["user"]
    c = await SyncClient.connect(server.ws, alice["access"], "alice-laptop")
    parts = [os.urandom(150 * KiB), os.urandom(40 * KiB)]
    ok = await c.start_upload(parts)
    assert ok["t"] == "upload_ok", ok
    await c.send_parts(ok["upload"], parts)
    done = await c.request({"t": "commit", "upload": ok["upload"]})
    assert done["t"] == "committed", done
    open_parts = [os.urandom(20 * KiB), os.urandom(30 * KiB)]
    pending = await c.start_upload(open_parts)
    assert pending["t"] == "upload_ok", pending
    await c.send_parts(pending["upload"], open_parts, indexes=[0])
    await c.close()
    async with httpx.AsyncClient(base_url=server.http) as http:
        r = await http.get(
            f"/v1/object/{done['object']}", headers={"Authorization": f"Bearer {alice['access']}"}
        )
    assert r.status_code == 200, r.text
    return Scene(
        server=server,
        alice=alice,
        bob=bob,
        alice_user=alice_user,
        object=done["object"],
        rev=done["rev"],
        seq=done["seq"],
        part_ids=[p["id"] for p in r.json()["parts"]],
        parts=parts,
        committed_upload=ok["upload"],
        open_upload=pending["upload"],
        open_parts=open_parts,
    )


def assert_rest_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def assert_alice_intact(scene: Scene) -> None:
    """Alice's object downloads identically, her metadata and feed are unchanged, and
    her open upload resumes with the same ``have`` and commits."""
    server = scene.server
    async with httpx.AsyncClient(base_url=server.http) as http:
        r = await http.get(f"/v1/object/{scene.object}", headers=scene.auth("alice"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["rev"], body["status"], body["seq"]) == (scene.rev, "active", scene.seq)
        assert [p["id"] for p in body["parts"]] == scene.part_ids
        r = await http.get("/v1/changes", headers=scene.auth("alice"))
        assert r.status_code == 200, r.text
        changes = r.json()["changes"]
        assert [(ch["object"], ch["rev"], ch["seq"]) for ch in changes] == [
            (scene.object, scene.rev, scene.seq)
        ]
        assert changes[0]["origin"] == "alice-laptop"
        r = await http.get(f"/v1/upload/{scene.open_upload}", headers=scene.auth("alice"))
        assert r.status_code == 200, r.text
        assert r.json()["have"] == [0]

    c = await SyncClient.connect(server.ws, scene.alice["access"], "alice-phone")
    try:
        for pid, data in zip(scene.part_ids, scene.parts, strict=True):
            assert await c.download(pid) == data
        ok = await c.request({"t": "resume", "upload": scene.open_upload})
        assert ok["t"] == "upload_ok", ok
        assert ok["have"] == [0]
        await c.send_parts(scene.open_upload, scene.open_parts, indexes=[1])
        done = await c.request({"t": "commit", "upload": scene.open_upload})
        assert done["t"] == "committed", done
        assert done["rev"] == 1 and done["object"] != scene.object
        async with httpx.AsyncClient(base_url=server.http) as http:
            r = await http.get(f"/v1/object/{done['object']}", headers=scene.auth("alice"))
        ids = [p["id"] for p in r.json()["parts"]]
        for pid, data in zip(ids, scene.open_parts, strict=True):
            assert await c.download(pid) == data
    finally:
        await c.close()


def mint(user: int, *, exp: float) -> str:
    claims = {"sub": str(user), "aud": "tessera", "typ": "access", "exp": int(exp)}
    return jwt.encode(claims, TEST_JWT_SECRET, algorithm="HS256")


@pytest.fixture
async def scene(make_server) -> Scene:
    return await build_scene(make_server(**LIMITS))


# ---------------------------------------------------------------- WebSocket


async def test_bob_websocket_frames_cannot_reach_alice(scene):
    bob = await SyncClient.connect(scene.server.ws, scene.bob["access"], "bob-dev", synced=False)
    # Bob's own feed is empty: nothing of alice's leaks into the catch-up.
    synced = await bob.next()
    assert synced == {"t": "synced", "cursor": 0}
    assert bob.welcome["head"] == 0

    for upload in (scene.open_upload, scene.committed_upload):
        for t in ("resume", "commit", "abort"):
            err = await bob.request({"t": t, "upload": upload})
            assert err["t"] == "error" and err["code"] in DENIED, (t, err)

    # Chunks for alice's upload: not on this session, so not_found, nothing taken.
    await bob.send_chunk(scene.open_upload, 1, 0, scene.open_parts[1][:1000])
    err = await bob.wait_for(lambda f: f["t"] == "error" and f.get("upload") == scene.open_upload)
    assert (err["code"], err["part"]) == ("not_found", 1)
    await bob.send_chunk(scene.open_upload, 0, 0, os.urandom(1000))
    err = await bob.wait_for(lambda f: f["t"] == "error" and f.get("upload") == scene.open_upload)
    assert (err["code"], err["part"]) == ("not_found", 0)

    for pid in scene.part_ids:
        err = await bob.request({"t": "get", "part": pid})
        assert err["t"] == "error" and err["code"] in DENIED, err
        err = await bob.request({"t": "get", "part": pid, "off": 10})
        assert err["t"] == "error" and err["code"] in DENIED, err
        err = await bob.request({"t": "info", "part": pid})
        assert err["t"] == "error" and err["code"] in DENIED, err

    err = await bob.start_upload([b"mine now"], obj=scene.object, base=scene.rev)
    assert err["t"] == "error" and err["code"] in DENIED, err
    err = await bob.start_upload([b"mine now"], obj=scene.object, base=scene.rev + 1)
    assert err["t"] == "error" and err["code"] in DENIED, err  # no rev oracle either
    assert "rev" not in err
    err = await bob.request({"t": "delete", "object": scene.object, "base": scene.rev})
    assert err["t"] == "error" and err["code"] in DENIED, err
    err = await bob.request({"t": "delete", "object": scene.object, "base": scene.rev + 7})
    assert err["t"] == "error" and err["code"] in DENIED, err
    assert "rev" not in err

    # Bob got no change frames about alice's object at any point.
    leaked = [f for f in bob.buffer if f["t"] == "change"]
    assert leaked == []
    pong = await bob.request({"t": "ping"})
    assert pong["t"] == "pong"
    await bob.close()
    await assert_alice_intact(scene)


async def test_bob_cannot_commit_alices_upload_after_resuming_his_own(scene):
    """Bob owns an upload of the same shape; alice's id still does not open for him."""
    bob = await SyncClient.connect(scene.server.ws, scene.bob["access"], "bob-dev")
    ok = await bob.start_upload(scene.open_parts)
    assert ok["t"] == "upload_ok"
    await bob.send_parts(ok["upload"], scene.open_parts)
    err = await bob.request({"t": "commit", "upload": scene.open_upload})
    assert err["code"] in DENIED, err
    done = await bob.request({"t": "commit", "upload": ok["upload"]})
    assert done["t"] == "committed" and done["rev"] == 1
    # Alice cannot see bob's object either.
    alice = await SyncClient.connect(scene.server.ws, scene.alice["access"], "alice-x")
    async with httpx.AsyncClient(base_url=scene.server.http) as http:
        r = await http.get(f"/v1/object/{done['object']}", headers=scene.auth("bob"))
        bob_parts = [p["id"] for p in r.json()["parts"]]
        r = await http.get(f"/v1/object/{done['object']}", headers=scene.auth("alice"))
        assert_rest_error(r, 404, "not_found")
    for pid in bob_parts:
        err = await alice.request({"t": "get", "part": pid})
        assert err["code"] in DENIED, err
    await alice.close()
    await bob.close()
    await assert_alice_intact(scene)


# --------------------------------------------------------------------- REST


async def test_bob_rest_routes_cannot_reach_alice(scene):
    headers = scene.auth("bob")
    u = scene.open_upload
    async with httpx.AsyncClient(base_url=scene.server.http) as http:
        for method, path, kw in [
            ("GET", f"/v1/object/{scene.object}", {}),
            ("DELETE", f"/v1/object/{scene.object}?base={scene.rev}", {}),
            ("DELETE", f"/v1/object/{scene.object}?base=1", {}),
            ("GET", f"/v1/upload/{u}", {}),
            ("PUT", f"/v1/upload/{u}/part/0", {"content": os.urandom(20 * KiB)}),
            ("PUT", f"/v1/upload/{u}/part/1", {"content": scene.open_parts[1]}),
            ("POST", f"/v1/upload/{u}/commit", {}),
            ("DELETE", f"/v1/upload/{u}", {}),
            ("GET", f"/v1/upload/{scene.committed_upload}", {}),
            ("POST", f"/v1/upload/{scene.committed_upload}/commit", {}),
            ("DELETE", f"/v1/upload/{scene.committed_upload}", {}),
        ]:
            r = await http.request(method, path, headers=headers, **kw)
            assert_rest_error(r, 404, "not_found")
            assert "location" not in r.headers

        for pid in scene.part_ids:
            r = await http.get(f"/v1/partition/{pid}/info", headers=headers)
            assert_rest_error(r, 404, "not_found")
            r = await http.get(f"/v1/partition/{pid}", headers=headers)
            assert_rest_error(r, 404, "not_found")
            r = await http.get(f"/v1/partition/{pid}", headers={**headers, "Range": "bytes=0-9"})
            assert_rest_error(r, 404, "not_found")

        # A new revision of alice's object through the REST upload path.
        spec = {
            "size": 3,
            "sha256": base64.b64encode(hashlib.sha256(b"abc").digest()).decode(),
            "key": base64.b64encode(b"k").decode(),
            "salt": base64.b64encode(b"s").decode(),
        }
        declaration = {
            "kind": "file",
            "object": scene.object,
            "base": scene.rev,
            "meta": {k: base64.b64encode(b"x").decode() for k in ("name", "mtime", "key", "salt")},
            "parts": [spec],
        }
        r = await http.post("/v1/upload", headers=headers, json=declaration)
        assert_rest_error(r, 404, "not_found")

        # Bob's own views hold nothing of alice's.
        r = await http.get("/v1/object", headers=headers)
        assert r.status_code == 200, r.text
        assert scene.object not in [o["object"] for o in r.json()["objects"]]
        assert r.json()["objects"] == []
        r = await http.get("/v1/changes", headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["changes"] == []
        assert r.json()["cursor"] == 0
        r = await http.get("/v1/changes?since=0&limit=1000", headers=headers)
        assert all(ch["object"] != scene.object for ch in r.json()["changes"])
        r = await http.get("/v1/account", headers=headers)
        assert (r.json()["used"], r.json()["head"]) == (0, 0)
    await assert_alice_intact(scene)


async def test_alice_rest_control(scene):
    """Control for the REST isolation test: the same calls succeed for alice."""
    headers = scene.auth("alice")
    async with httpx.AsyncClient(base_url=scene.server.http) as http:
        r = await http.get("/v1/object", headers=headers)
        assert scene.object in [o["object"] for o in r.json()["objects"]]
        for pid, data in zip(scene.part_ids, scene.parts, strict=True):
            r = await http.get(f"/v1/partition/{pid}/info", headers=headers)
            assert r.status_code == 200, r.text
            assert (r.json()["object"], r.json()["size"]) == (scene.object, len(data))
            r = await http.get(f"/v1/partition/{pid}", headers=headers)
            assert r.status_code == 200 and r.content == data
        r = await http.get(f"/v1/upload/{scene.open_upload}", headers=headers)
        assert r.status_code == 200 and r.json()["have"] == [0]


@pytest.mark.parametrize("store", ["local", "s3"])
async def test_partition_download_isolation_per_store(make_server, store):
    scene = await build_scene(make_server(store, **LIMITS))
    async with httpx.AsyncClient(base_url=scene.server.http) as http:
        for pid, data in zip(scene.part_ids, scene.parts, strict=True):
            r = await http.get(f"/v1/partition/{pid}", headers=scene.auth("alice"))
            if store == "s3":
                assert r.status_code == 307, r.text
                location = r.headers["location"]
                assert str(pid) in location
                fetched = await http.get(location)
                assert fetched.status_code == 200
                assert fetched.content == data
            else:
                assert r.status_code == 200, r.text
                assert r.content == data
            r = await http.get(f"/v1/partition/{pid}", headers=scene.auth("bob"))
            assert_rest_error(r, 404, "not_found")
            assert "location" not in r.headers
            r = await http.get(f"/v1/partition/{pid}/info", headers=scene.auth("bob"))
            assert_rest_error(r, 404, "not_found")
    bob = await SyncClient.connect(scene.server.ws, scene.bob["access"], "bob-dev")
    for pid in scene.part_ids:
        err = await bob.request({"t": "get", "part": pid})
        assert err["t"] == "error" and err["code"] in DENIED, err
        assert not [f for f in bob.buffer if f["t"] == "data"]
    await bob.close()
    await assert_alice_intact(scene)


# ------------------------------------------------------------ authentication

#: Every authenticated route of the contract (PROTOCOL.md section 6) that the
#: server routes today; the account/device management routes are checked apart.
AUTH_ROUTES: list[tuple[str, str]] = [
    ("GET", "/v1/account"),
    ("GET", "/v1/object"),
    ("GET", "/v1/object/{object}"),
    ("DELETE", "/v1/object/{object}?base=1"),
    ("GET", "/v1/changes"),
    ("GET", "/v1/changes?since=0&limit=10"),
    ("GET", "/v1/partition/{part}/info"),
    ("GET", "/v1/partition/{part}"),
    ("POST", "/v1/upload"),
    ("GET", "/v1/upload/{upload}"),
    ("PUT", "/v1/upload/{upload}/part/1"),
    ("POST", "/v1/upload/{upload}/commit"),
    ("DELETE", "/v1/upload/{upload}"),
]


def bad_credentials(scene: Scene) -> dict[str, dict[str, str]]:
    return {
        "none": {},
        "expired": {"Authorization": f"Bearer {mint(scene.alice_user, exp=time.time() - 60)}"},
        "garbage": {"Authorization": "Bearer not.a.token"},
        "wrong-scheme": {"Authorization": f"Basic {scene.alice['access']}"},
        "empty": {"Authorization": "Bearer"},
    }


async def unauthorized_failures(
    scene: Scene, routes: list[tuple[str, str]], headers: dict[str, str]
) -> list[str]:
    failures = []
    async with httpx.AsyncClient(base_url=scene.server.http) as http:
        for method, template in routes:
            path = template.format(
                object=scene.object, part=scene.part_ids[0], upload=scene.open_upload
            )
            kw: dict[str, Any] = {}
            if method in ("POST", "PUT", "PATCH"):
                kw["content"] = b"{}"
            r = await http.request(method, path, headers=headers, **kw)
            try:
                assert_rest_error(r, 401, "unauthorized")
            except (AssertionError, ValueError):
                failures.append(f"{method} {path}: {r.status_code} {r.text[:100]}")
    return failures


@pytest.mark.parametrize("credential", ["none", "expired", "garbage", "wrong-scheme", "empty"])
async def test_rest_routes_require_a_valid_token(scene, credential):
    headers = bad_credentials(scene)[credential]
    failures = await unauthorized_failures(scene, AUTH_ROUTES, headers)
    assert not failures, "\n".join(failures)
    await assert_alice_intact(scene)


async def test_account_and_device_routes_require_a_valid_token(scene):
    """PROTOCOL.md section 6 also lists PATCH /v1/account, GET /v1/devices,
    DELETE and PATCH /v1/devices/{id}; without a valid token each must be a 401."""
    routes = [
        ("PATCH", "/v1/account"),
        ("GET", "/v1/devices"),
        ("DELETE", "/v1/devices/some-device"),
        ("PATCH", "/v1/devices/some-device"),
    ]
    failures = []
    for credential, headers in bad_credentials(scene).items():
        failures += [
            f"[{credential}] {f}" for f in await unauthorized_failures(scene, routes, headers)
        ]
    assert not failures, "\n".join(failures)


async def test_minted_token_control(scene):
    """Control for the expired case: the same minting with a future exp is accepted."""
    token = mint(scene.alice_user, exp=time.time() + 600)
    body = await account(scene.server, token)
    assert body["user"] == scene.alice_user


async def test_token_for_unknown_user_sees_nothing(scene):
    """A well-signed token whose subject does not exist gets nothing of anyone's."""
    headers = {"Authorization": f"Bearer {mint(2**62, exp=time.time() + 600)}"}
    async with httpx.AsyncClient(base_url=scene.server.http) as http:
        r = await http.get(f"/v1/object/{scene.object}", headers=headers)
        assert r.status_code in (401, 404), r.text
        r = await http.get(f"/v1/partition/{scene.part_ids[0]}", headers=headers)
        assert r.status_code in (401, 404), r.text
        assert "location" not in r.headers
    ws = await websockets.connect(scene.server.ws, max_size=None, compression=None)
    client = SyncClient(ws)
    await client.send(
        {"t": "hello", "v": 1, "token": headers["Authorization"][7:], "device": "d", "cursor": 0}
    )
    code, _ = await client.closed()
    assert code == 4401
