"""Account routes: devices and revocation, password change, the key bundle."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
import websockets

from tests.conftest import unique
from tests.support.client import SyncClient, register_login


def bearer(tokens: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access']}"}


async def login(http: str, username: str, password: str, device: str) -> dict:
    async with httpx.AsyncClient(base_url=http) as client:
        r = await client.post(
            "/v1/auth/login", json={"username": username, "password": password, "device": device}
        )
        assert r.status_code == 200, r.text
        return r.json()


async def test_devices_are_listed_and_revoking_closes_their_sessions_at_once(server):
    name = unique("dev")
    laptop = await register_login(server.http, name, device="laptop")
    phone = await login(server.http, name, "correct horse battery", "phone")
    on_laptop = await SyncClient.connect(server.ws, laptop["access"], device="laptop")
    on_phone = await SyncClient.connect(server.ws, phone["access"], device="phone")
    async with httpx.AsyncClient(base_url=server.http, headers=bearer(laptop)) as http:
        r = await http.get("/v1/devices")
        assert r.status_code == 200
        devices = {d["id"]: d for d in r.json()["devices"]}
        assert set(devices) == {"laptop", "phone"}
        assert devices["laptop"]["current"] and not devices["phone"]["current"]
        assert not devices["phone"]["revoked"]

        r = await http.delete("/v1/devices/phone")
        assert r.status_code == 204
        code, reason = await on_phone.closed(timeout=5)
        assert code == 4403, (code, reason)
        assert (await on_laptop.request({"t": "ping"}))["t"] == "pong"  # others unaffected

        r = await http.get("/v1/devices")
        assert {d["id"]: d["revoked"] for d in r.json()["devices"]} == {
            "laptop": False,
            "phone": True,
        }
        assert (await http.delete("/v1/devices/nope")).status_code == 404
        r = await http.post("/v1/auth/refresh", json={"refresh": phone["refresh"]})
        assert r.status_code == 401  # the phone's refresh token died with it
    with pytest.raises(websockets.ConnectionClosed) as refused:
        await SyncClient.connect(server.ws, phone["access"], device="phone", synced=False)
    assert refused.value.rcvd is not None and refused.value.rcvd.code == 4403
    await on_laptop.close()


async def test_another_users_device_cannot_be_revoked(server, alice, bob):
    await SyncClient.connect(server.ws, alice["access"], device="alices-laptop")
    async with httpx.AsyncClient(base_url=server.http, headers=bearer(bob)) as http:
        assert (await http.delete("/v1/devices/alices-laptop")).status_code == 404
    async with httpx.AsyncClient(base_url=server.http, headers=bearer(alice)) as http:
        listed = (await http.get("/v1/devices")).json()["devices"]
        assert [d["revoked"] for d in listed if d["id"] == "alices-laptop"] == [False]


async def test_devices_carry_the_names_their_users_give_them(server, bob):
    """A device list of ids alone ("laptop-3fa2") is hard to revoke from: a login may
    name its device, and a device may be renamed; names of others' devices are out
    of reach."""
    name = unique("named")
    await register_login(server.http, name, device="laptop-3fa2")
    async with httpx.AsyncClient(base_url=server.http) as client:

        async def log_in(**extra: object) -> httpx.Response:
            body = {"username": name, "password": "correct horse battery", **extra}
            return await client.post("/v1/auth/login", json=body)

        phone = await log_in(device="phone-77c1", device_name="Ana's phone")
        assert phone.status_code == 200, phone.text
        assert (await log_in(device="phone-77c1")).status_code == 200  # keeps the name
        for bad in ["x" * 101, "tab\there", 7]:
            r = await log_in(device="tablet", device_name=bad)
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_frame", bad
        assert (await log_in(device_name="no device")).status_code == 400
        tokens = phone.json()

    async with httpx.AsyncClient(base_url=server.http, headers=bearer(tokens)) as http:
        names = {d["id"]: d["name"] for d in (await http.get("/v1/devices")).json()["devices"]}
        assert names == {"laptop-3fa2": "", "phone-77c1": "Ana's phone"}

        r = await http.patch("/v1/devices/laptop-3fa2", json={"device_name": "  Work laptop "})
        assert r.status_code == 200, r.text
        assert r.json()["name"] == "Work laptop" and not r.json()["current"]
        r = await http.patch("/v1/devices/phone-77c1", json={"device_name": "Phone"})
        assert r.json()["current"] and r.json()["name"] == "Phone"
        assert (await http.patch("/v1/devices/nope", json={"device_name": "x"})).status_code == 404
        assert (await http.patch("/v1/devices/phone-77c1", json={})).status_code == 400
        names = {d["id"]: d["name"] for d in (await http.get("/v1/devices")).json()["devices"]}
        assert names == {"laptop-3fa2": "Work laptop", "phone-77c1": "Phone"}

    async with httpx.AsyncClient(base_url=server.http, headers=bearer(bob)) as http:
        r = await http.patch("/v1/devices/phone-77c1", json={"device_name": "mine now"})
        assert r.status_code == 404
    async with httpx.AsyncClient(base_url=server.http, headers=bearer(tokens)) as http:
        names = {d["id"]: d["name"] for d in (await http.get("/v1/devices")).json()["devices"]}
        assert names["phone-77c1"] == "Phone"


async def test_password_change_signs_out_every_other_device(server):
    name = unique("pw")
    laptop = await register_login(server.http, name, device="laptop")
    phone = await login(server.http, name, "correct horse battery", "phone")
    on_laptop = await SyncClient.connect(server.ws, laptop["access"], device="laptop")
    on_phone = await SyncClient.connect(server.ws, phone["access"], device="phone")
    new_bundle = base64.b64encode(b"rewrapped master key").decode()
    async with httpx.AsyncClient(base_url=server.http, headers=bearer(laptop)) as http:
        r = await http.patch(
            "/v1/account",
            json={"password": {"current": "wrong password", "new": "new password 1"}},
        )
        assert r.status_code == 403
        r = await http.patch(
            "/v1/account",
            json={
                "password": {"current": "correct horse battery", "new": "new password 1"},
                "key_bundle": new_bundle,
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["username"] == name
        code, _ = await on_phone.closed(timeout=5)
        assert code == 4401
        assert (await on_laptop.request({"t": "ping"}))["t"] == "pong"
        assert (
            await http.post("/v1/auth/refresh", json={"refresh": phone["refresh"]})
        ).status_code == 401
        assert (
            await http.post("/v1/auth/refresh", json={"refresh": laptop["refresh"]})
        ).status_code == 200
        assert (await http.get("/v1/account/keys")).json()["key_bundle"] == new_bundle
        r = await http.patch("/v1/account", json={"username": "renamed"})
        assert r.status_code == 400
    await login(server.http, name, "new password 1", "phone")
    async with httpx.AsyncClient(base_url=server.http) as http:
        r = await http.post(
            "/v1/auth/login", json={"username": name, "password": "correct horse battery"}
        )
        assert r.status_code == 401
    await on_laptop.close()


async def test_key_bundle_round_trip_and_no_clobbering(server, alice, bob):
    bundle = base64.b64encode(b"\x00opaque\xff" * 10).decode()
    async with httpx.AsyncClient(base_url=server.http, headers=bearer(alice)) as http:
        assert (await http.get("/v1/account/keys")).json() == {"key_bundle": None}
        r = await http.put("/v1/account/keys", json={"key_bundle": bundle, "replace": False})
        assert r.status_code == 204
        r = await http.put("/v1/account/keys", json={"key_bundle": "QUFB", "replace": False})
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        assert (await http.get("/v1/account/keys")).json()["key_bundle"] == bundle
        r = await http.put("/v1/account/keys", json={"key_bundle": "not base64!"})
        assert r.status_code == 400
        big = base64.b64encode(b"x" * (64 * 1024 + 1)).decode()
        assert (await http.put("/v1/account/keys", json={"key_bundle": big})).status_code == 413
    async with httpx.AsyncClient(base_url=server.http, headers=bearer(bob)) as http:
        assert (await http.get("/v1/account/keys")).json() == {"key_bundle": None}


async def test_old_access_tokens_stop_working_after_revocation_and_password_change(server):
    name = unique("stale")
    laptop = await register_login(server.http, name, device="laptop")
    phone = await login(server.http, name, "correct horse battery", "phone")
    tablet = await login(server.http, name, "correct horse battery", "tablet")
    await asyncio.sleep(1.1)  # tokens from an earlier second than the changes below
    async with httpx.AsyncClient(base_url=server.http) as http:
        assert (await http.get("/v1/account", headers=bearer(phone))).status_code == 200
        r = await http.delete("/v1/devices/phone", headers=bearer(laptop))
        assert r.status_code == 204
        r = await http.get("/v1/account", headers=bearer(phone))
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
        r = await http.patch(
            "/v1/account",
            headers=bearer(laptop),
            json={"password": {"current": "correct horse battery", "new": "new password 2"}},
        )
        assert r.status_code == 200
        r = await http.get("/v1/object", headers=bearer(tablet))  # signed out
        assert r.status_code == 401 and "signed out" in r.json()["error"]["message"]
        assert (await http.get("/v1/object", headers=bearer(laptop))).status_code == 200
    with pytest.raises(websockets.ConnectionClosed) as refused:
        await SyncClient.connect(server.ws, tablet["access"], device="tablet")
    assert refused.value.rcvd is not None and refused.value.rcvd.code == 4401
    fresh = await login(server.http, name, "new password 2", "tablet")
    async with httpx.AsyncClient(base_url=server.http) as http:
        assert (await http.get("/v1/object", headers=bearer(fresh))).status_code == 200
