"""NUL (U+0000) in REST input. PostgreSQL's text holds none, so a NUL that reached
a statement would fail it: a 500 for the request, and in a batch of several
requests' writes, theirs too. The WebSocket's frames refuse NUL (close 4400,
tests/test_protocol_frames.py); over REST, a path with one names nothing (404)
and a JSON body with one is malformed (400), before any handler runs."""

from __future__ import annotations

import httpx

from tests.conftest import unique
from tests.support.client import register_login


async def test_ids_with_a_nul_are_not_found_over_rest(make_server, db):
    """REST paths can carry a NUL (%00) the WebSocket's frames refuse."""
    server = make_server()
    name = unique("nulrest")
    tokens = await register_login(server.http, name)
    headers = {"authorization": f"Bearer {tokens['access']}"}
    async with httpx.AsyncClient(base_url=server.http, headers=headers) as http:
        for method, path in [
            ("POST", "/v1/upload/a%00b/commit"),
            ("GET", "/v1/upload/a%00b"),
            ("DELETE", "/v1/upload/a%00b"),
            ("PUT", "/v1/upload/a%00b/part/0"),
        ]:
            r = await http.request(method, path, content=b"x" if method == "PUT" else None)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["code"] == "not_found"


async def test_device_ids_with_a_nul_are_not_found(make_server, db):
    """These reached PostgreSQL before: a 500, and a dropped connection."""
    server = make_server()
    name = unique("nuldev")
    tokens = await register_login(server.http, name, device="laptop")
    headers = {"authorization": f"Bearer {tokens['access']}"}
    async with httpx.AsyncClient(base_url=server.http, headers=headers) as http:
        for method, path, body in [
            ("DELETE", "/v1/devices/lap%00top", None),
            ("PATCH", "/v1/devices/lap%00top", {"name": "work"}),
            ("GET", "/v1/object/1%00", None),
        ]:
            r = await http.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["code"] == "not_found"
        listed = await http.get("/v1/devices")
        assert listed.status_code == 200, listed.text
        devices = listed.json()["devices"]
        assert [(d["id"], d["name"]) for d in devices] == [("laptop", "")]
    uid = await db.fetchval("SELECT id FROM users WHERE username = $1", name)
    assert await db.fetchval(
        "SELECT revoked_at IS NULL FROM devices WHERE user_id = $1 AND id = 'laptop'", uid
    )


async def test_json_strings_with_a_nul_are_bad_frames(make_server, db):
    """Anywhere in the body, an unknown key's value included; nothing is written."""
    server = make_server()
    name = unique("nuljson")
    async with httpx.AsyncClient(base_url=server.http) as http:
        for path, body in [
            ("/v1/auth/register", {"username": name + "\x00", "password": "correct horse"}),
            ("/v1/auth/register", {"username": name, "password": "pw", "x": ["\x00"]}),
        ]:
            r = await http.post(path, json=body)
            assert r.status_code == 400, (path, body, r.text)
            assert r.json()["error"]["code"] == "bad_frame"
            assert "NUL" in r.json()["error"]["message"]
        assert not await db.fetchval(
            "SELECT count(*) FROM users WHERE username LIKE $1", name + "%"
        )
        await register_login(server.http, name)
        r = await http.post(
            "/v1/auth/login",
            json={"username": name, "password": "correct horse battery", "device": "d\x00"},
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "bad_frame"
    uid = await db.fetchval("SELECT id FROM users WHERE username = $1", name)
    assert not await db.fetchval("SELECT count(*) FROM devices WHERE user_id = $1", uid)
