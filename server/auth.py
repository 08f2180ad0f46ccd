"""Accounts and tokens: Argon2id password hashes, JWT access tokens, opaque refresh tokens.

Access tokens are short-lived JWTs checked without a database round trip.
Refresh tokens are random strings stored only as a SHA-256 hash; each use
spends the token and issues a new one in the same *family*, and presenting a
spent token revokes the whole family (it means the token was stolen).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from protocol.errors import ErrorCode, RequestError
from server.settings import Settings

log = logging.getLogger(__name__)

USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{1,63}$")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
_ALGORITHM = "HS256"
_AUDIENCE = "tessera"


class Throttled(Exception):
    """Too many failed logins; try again in ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed logins; try again in {retry_after:.0f} s")
        self.retry_after = retry_after


class AuthError(Exception):
    """Authentication failed; ``expired`` tells a lapsed token from a bad one."""

    def __init__(self, msg: str, *, expired: bool = False) -> None:
        super().__init__(msg)
        self.expired = expired


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user: int
    device: str | None
    expires: float  # epoch seconds
    issued: float = 0.0  # epoch seconds


@dataclass(frozen=True, slots=True)
class TokenPair:
    access: str
    refresh: str
    expires_in: int

    def as_json(self) -> dict[str, Any]:
        return {"access": self.access, "refresh": self.refresh, "expires_in": self.expires_in}


def _hash_refresh(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Auth:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, secret: str) -> None:
        self.settings = settings
        self.pool = pool
        self._secret = secret
        self._hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_cost
        )
        # A hash to verify against when the user does not exist, so that a
        # login's timing does not tell which usernames are registered.
        self._dummy_hash = self._hasher.hash(secrets.token_hex(16))

    # ----------------------------------------------------------- passwords

    async def register(self, username: str, password: str) -> int:
        if not USERNAME.fullmatch(username):
            raise RequestError(
                ErrorCode.BAD_FRAME,
                "username must be 2-64 characters: letters, digits, . _ @ -",
            )
        if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise RequestError(
                ErrorCode.BAD_FRAME, f"password must be {MIN_PASSWORD}..{MAX_PASSWORD} characters"
            )
        digest = await asyncio.to_thread(self._hasher.hash, password)
        try:
            return await self.pool.fetchval(
                "INSERT INTO users (username, password_hash, quota) VALUES ($1, $2, $3) "
                "RETURNING id",
                username,
                digest,
                self.settings.default_quota,
            )
        except asyncpg.UniqueViolationError:
            raise RequestError(ErrorCode.CONFLICT, "username is taken") from None

    async def check_password(self, username: str, password: str) -> int:
        row = await self.pool.fetchrow(
            "SELECT id, password_hash FROM users WHERE username = $1", username
        )
        stored = row["password_hash"] if row else self._dummy_hash
        try:
            await asyncio.to_thread(self._hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            row = None
        if row is None:
            raise AuthError("wrong username or password")
        return row["id"]

    # ------------------------------------------------------------- tokens

    def issue_access(self, user: int, device: str | None = None) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": str(user),
            "aud": _AUDIENCE,
            "iat": now,
            "exp": now + self.settings.access_ttl,
            "typ": "access",
        }
        if device:
            claims["dev"] = device
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify_access(self, token: str) -> AccessClaims:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=_AUDIENCE,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("access token expired", expired=True) from None
        except jwt.PyJWTError:
            raise AuthError("invalid access token") from None
        if claims.get("typ") != "access":
            raise AuthError("not an access token")
        try:
            user = int(claims["sub"])
        except (TypeError, ValueError):
            raise AuthError("invalid access token") from None
        return AccessClaims(
            user=user,
            device=claims.get("dev"),
            expires=float(claims["exp"]),
            issued=float(claims.get("iat", 0)),
        )

    async def check_live(self, claims: AccessClaims) -> None:
        """Refuse a well-signed token whose device was revoked, or that predates a
        password change made on another device (it was signed out)."""
        row = await self.pool.fetchrow(
            """SELECT extract(epoch FROM u.password_changed_at) AS changed,
                      u.password_changed_by AS changer,
                      d.revoked_at IS NOT NULL AS revoked
               FROM users u LEFT JOIN devices d ON d.user_id = u.id AND d.id = $2
               WHERE u.id = $1""",
            claims.user,
            claims.device,
        )
        if row is None:
            raise AuthError("the account no longer exists")
        if row["revoked"]:
            raise AuthError("this device was revoked")
        changed = row["changed"]
        # iat has whole seconds: a token from the second of the change stays valid.
        stale = changed is not None and claims.issued < math.floor(float(changed))
        if stale and (claims.device is None or claims.device != row["changer"]):
            raise AuthError("signed out: the password was changed on another device")

    async def login(
        self,
        username: str,
        password: str,
        device: str | None,
        address: str = "",
        *,
        device_name: str | None = None,
    ) -> TokenPair:
        """Check the password, throttled per account and per address."""
        keys = await self._throttle(username, address)
        try:
            user = await self.check_password(username, password)
        except AuthError:
            await self._record_failure(keys)
            raise
        await self.pool.execute("DELETE FROM auth_failures WHERE key = $1", keys[0])
        if device:
            # Listed (and revocable) from its login on; logging in with the password
            # again re-authorises a device id that was revoked.
            # A login without a name keeps the name the device has.
            await self.pool.execute(
                "INSERT INTO devices (user_id, id, name) VALUES ($1, $2, coalesce($3, '')) "
                "ON CONFLICT (user_id, id) DO UPDATE SET last_seen = now(), revoked_at = NULL, "
                "name = coalesce($3, devices.name)",
                user,
                device,
                device_name,
            )
        return await self._issue_pair(user, device, family=uuid.uuid4())

    async def _throttle(self, username: str, address: str) -> list[str]:
        """Raise Throttled while the account or the address is locked out of password
        checks; else the throttle keys a failed check is to be recorded on."""
        keys = [f"user:{username.lower()}"] + ([f"addr:{address}"] if address else [])
        wait = await self.pool.fetchval(
            """SELECT max(extract(epoch FROM window_start + make_interval(secs => $2) - now()))
               FROM auth_failures
               WHERE key = ANY($1) AND failures >= $3
                 AND window_start > now() - make_interval(secs => $2)""",
            keys,
            float(self.settings.login_window),
            self.settings.login_max_failures,
        )
        if wait is not None:
            raise Throttled(max(1.0, float(wait)))
        return keys

    async def _record_failure(self, keys: list[str]) -> None:
        await self.pool.execute(
            """INSERT INTO auth_failures (key, window_start, failures)
               SELECT k, now(), 1 FROM unnest($1::text[]) AS k
               ON CONFLICT (key) DO UPDATE SET
                 failures = CASE WHEN auth_failures.window_start
                                      > now() - make_interval(secs => $2)
                                 THEN auth_failures.failures + 1 ELSE 1 END,
                 window_start = CASE WHEN auth_failures.window_start
                                          > now() - make_interval(secs => $2)
                                     THEN auth_failures.window_start ELSE now() END""",
            keys,
            float(self.settings.login_window),
        )
        log.info("failed login for %s", ", ".join(keys))

    async def _issue_pair(
        self,
        user: int,
        device: str | None,
        family: uuid.UUID,
        conn: asyncpg.Connection | None = None,
    ) -> TokenPair:
        refresh = secrets.token_urlsafe(32)
        await (conn or self.pool).execute(
            "INSERT INTO refresh_tokens (hash, user_id, device_id, family, expires_at) "
            "VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
            _hash_refresh(refresh),
            user,
            device,
            family,
            float(self.settings.refresh_ttl),
        )
        return TokenPair(
            access=self.issue_access(user, device),
            refresh=refresh,
            expires_in=self.settings.access_ttl,
        )

    async def refresh(self, token: str) -> TokenPair:
        """Spend ``token`` and issue the next pair of its family."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT user_id, device_id, family, spent_at, revoked_at, "
                "expires_at < now() AS expired FROM refresh_tokens WHERE hash = $1 FOR UPDATE",
                _hash_refresh(token),
            )
            if row is None or row["revoked_at"] is not None or row["expired"]:
                raise AuthError("invalid refresh token")
            if row["spent_at"] is not None:
                await conn.execute(
                    "UPDATE refresh_tokens SET revoked_at = now() "
                    "WHERE family = $1 AND revoked_at IS NULL",
                    row["family"],
                )
                log.warning(
                    "refresh token reused: revoked token family %s of user %s",
                    row["family"],
                    row["user_id"],
                )
                # Commit the revocation even though the request fails.
                return_error = AuthError("refresh token reused; its family has been revoked")
            else:
                await conn.execute(
                    "UPDATE refresh_tokens SET spent_at = now() WHERE hash = $1",
                    _hash_refresh(token),
                )
                return await self._issue_pair(
                    row["user_id"], row["device_id"], row["family"], conn=conn
                )
        raise return_error

    async def logout(self, token: str) -> None:
        await self.pool.execute(
            "UPDATE refresh_tokens SET revoked_at = now() "
            "WHERE family = (SELECT family FROM refresh_tokens WHERE hash = $1) "
            "AND revoked_at IS NULL",
            _hash_refresh(token),
        )

    # ------------------------------------------------------ account changes

    async def change_password(
        self,
        user: int,
        current: str,
        new: str,
        keep_device: str | None,
        bundle: bytes | None,
        address: str = "",
    ) -> None:
        """Verify ``current``, store ``new`` (and the re-wrapped key bundle), and sign out
        every other device: their refresh tokens are revoked and their sessions close.

        Throttled like a login, on the same counters: a stolen access token must not
        become a way to guess the password (which also derives the key)."""
        if not MIN_PASSWORD <= len(new) <= MAX_PASSWORD:
            raise RequestError(
                ErrorCode.BAD_FRAME, f"password must be {MIN_PASSWORD}..{MAX_PASSWORD} characters"
            )
        row = await self.pool.fetchrow(
            "SELECT username, password_hash FROM users WHERE id = $1", user
        )
        if row is None:
            raise AuthError("no such account")
        keys = await self._throttle(row["username"], address)
        try:
            await asyncio.to_thread(self._hasher.verify, row["password_hash"], current)
        except (VerificationError, InvalidHashError):
            await self._record_failure(keys)
            raise AuthError("the current password is wrong") from None
        digest = await asyncio.to_thread(self._hasher.hash, new)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE users SET password_hash = $2, key_bundle = coalesce($3, key_bundle), "
                "password_changed_at = now(), password_changed_by = $4 WHERE id = $1",
                user,
                digest,
                bundle,
                keep_device,
            )
            await conn.execute(
                "UPDATE refresh_tokens SET revoked_at = now() WHERE user_id = $1 "
                "AND revoked_at IS NULL AND device_id IS DISTINCT FROM $2",
                user,
                keep_device,
            )
            await conn.execute(
                "SELECT pg_notify('tessera_control', $1)", f"logout:{user}:{keep_device or ''}"
            )
        log.info("user %s changed the password; other devices signed out", user)

    async def revoke_device(self, user: int, device: str) -> bool:
        """Revoke a device: its refresh tokens die and its sessions close with 4403."""
        async with self.pool.acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                "UPDATE devices SET revoked_at = coalesce(revoked_at, now()) "
                "WHERE user_id = $1 AND id = $2 RETURNING 1",
                user,
                device,
            )
            if not found:
                return False
            await conn.execute(
                "UPDATE refresh_tokens SET revoked_at = now() "
                "WHERE user_id = $1 AND device_id = $2 AND revoked_at IS NULL",
                user,
                device,
            )
            await conn.execute("SELECT pg_notify('tessera_control', $1)", f"revoke:{user}:{device}")
        return True
