"""The REST side of the SDK: accounts, tokens, listings, and the fallback download."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx

from client.state import State


class ApiError(Exception):
    """The server refused a request; ``code`` is the protocol's error code."""

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any]) -> None:
        super().__init__(f"{message} ({code})")
        self.status = status
        self.code = code
        self.message = message
        self.body = body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _raise_for(r: httpx.Response) -> None:
    if r.is_success or r.is_redirect:
        return
    try:
        body = r.json().get("error", {})
    except ValueError:
        body = {}
    raise ApiError(
        r.status_code,
        body.get("code", "internal"),
        body.get("message", r.reason_phrase or f"HTTP {r.status_code}"),
        body,
    )


class RestApi:
    """Bearer-authenticated calls that refresh the access token once on a 401."""

    def __init__(self, server: str, state: State | None = None, timeout: float = 60) -> None:
        self.server = server.rstrip("/")
        self.state = state
        self._http = httpx.AsyncClient(base_url=self.server, timeout=timeout)
        self._refresh_lock = asyncio.Lock()

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> RestApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------- unauthenticated

    async def register(self, username: str, password: str) -> int:
        """``password`` is what the server checks: the SDK passes a login secret."""
        r = await self._http.post(
            "/v1/auth/register", json={"username": username, "password": password}
        )
        _raise_for(r)
        return int(r.json()["user"])

    async def login(
        self, username: str, password: str, device: str, device_name: str | None = None
    ) -> dict[str, Any]:
        body = {"username": username, "password": password, "device": device}
        if device_name is not None:
            body["device_name"] = device_name
        r = await self._http.post("/v1/auth/login", json=body)
        _raise_for(r)
        return dict(r.json())

    # ------------------------------------------------------------- tokens

    @property
    def access(self) -> str:
        assert self.state is not None
        return str(self.state.tokens()["access"])

    async def refresh(self, stale: str | None = None) -> str:
        """Trade the refresh token for a new pair (once, however many callers ask)."""
        assert self.state is not None
        async with self._refresh_lock:
            tokens = self.state.tokens()
            if stale is not None and tokens["access"] != stale:
                return str(tokens["access"])  # someone else refreshed meanwhile
            r = await self._http.post("/v1/auth/refresh", json={"refresh": tokens["refresh"]})
            _raise_for(r)
            self.state.save_tokens(r.json())
            return str(r.json()["access"])

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        token = self.access
        for attempt in (1, 2):
            headers = {**kw.pop("headers", {}), "Authorization": f"Bearer {token}"}
            r = await self._http.request(method, path, headers=headers, **kw)
            if r.status_code == 401 and attempt == 1:
                token = await self.refresh(token)
                continue
            _raise_for(r)
            return r
        raise AssertionError("unreachable")

    # --------------------------------------------------------------- calls

    async def account(self) -> dict[str, Any]:
        return dict((await self.request("GET", "/v1/account")).json())

    async def key_bundle(self) -> bytes | None:
        value = (await self.request("GET", "/v1/account/keys")).json()["key_bundle"]
        return unb64(value) if value else None

    async def put_key_bundle(self, bundle: bytes, *, replace: bool) -> None:
        await self.request(
            "PUT", "/v1/account/keys", json={"key_bundle": b64(bundle), "replace": replace}
        )

    async def change_password(self, current: str, new: str, bundle: bytes) -> None:
        await self.request(
            "PATCH",
            "/v1/account",
            json={"password": {"current": current, "new": new}, "key_bundle": b64(bundle)},
        )

    async def devices(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "/v1/devices")).json()["devices"])

    async def revoke_device(self, device: str) -> None:
        await self.request("DELETE", f"/v1/devices/{device}")

    async def objects(self) -> AsyncIterator[dict[str, Any]]:
        """Every live object (paged), with byte fields decoded."""
        after = 0
        while True:
            page = (
                await self.request("GET", "/v1/object", params={"after": after, "limit": 500})
            ).json()
            for obj in page["objects"]:
                yield decode_object(obj)
            if page["next"] is None:
                return
            after = page["next"]

    async def object(self, object_id: int) -> dict[str, Any]:
        return decode_object((await self.request("GET", f"/v1/object/{object_id}")).json())

    async def download_partition(self, part: int) -> bytes:
        """The ciphertext of one partition, following a presigned redirect if given."""
        r = await self.request("GET", f"/v1/partition/{part}")
        if r.status_code in (301, 302, 303, 307, 308):
            async with httpx.AsyncClient(timeout=self._http.timeout) as bare:
                fetched = await bare.get(r.headers["location"])  # the URL is the credential
                _raise_for(fetched)
                return fetched.content
        return r.content


def decode_object(obj: dict[str, Any]) -> dict[str, Any]:
    """JSON (base64) object map -> the same shape as a WebSocket ``change``."""
    out = dict(obj)
    out["meta"] = {k: unb64(v) for k, v in obj["meta"].items()}
    if "parts" in obj:
        out["parts"] = [
            {**p, **{k: unb64(p[k]) for k in ("sha256", "key", "salt")}} for p in obj["parts"]
        ]
    return out
