"""End-to-end encryption: the key hierarchy and every AEAD the client performs.

Keys, from the top:

* **KEK** — derived from the password with Argon2id; never stored.
* **Master key** — 32 random bytes per user, stored on the server only wrapped
  by the KEK (the *key bundle*), so a new device can log in and unwrap it.
* **Object key** — 32 random bytes per object, wrapped by the master key
  (``meta.key``). It encrypts the object's name, times and part keys.
* **Part key** — 32 random bytes per partition, wrapped by the object key
  (``part.key``); ``part.salt`` is the nonce of the partition's data.

Every encryption is AES-256-GCM with a fresh 96-bit nonce, and every
ciphertext carries associated data saying what it is. A partition's
associated data binds it to its revision (``meta.salt``, random per upload),
its index and the number of parts, so the server cannot reorder, swap or
truncate parts without decryption failing. The plaintext metadata carries the
file's content hash — SHA-256 over the SHA-256 of each plaintext part, as
Dropbox's content hash — checked after a download.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

KEY_LEN = 32
NONCE_LEN = 12
REVISION_SALT_LEN = 16
BUNDLE_VERSION = 1

# Argon2id defaults (RFC 9106's second recommended option, 64 MiB) for new bundles;
# a bundle records its own parameters, so these may change between versions.
KDF_ITERATIONS = 3
KDF_LANES = 4
KDF_MEMORY_KIB = 64 * 1024
# The login secret's parameters are part of the protocol (a client must derive the
# same secret as the one that registered): changing them would lock accounts out.
LOGIN_KDF_ITERATIONS = 3
LOGIN_KDF_LANES = 4
LOGIN_KDF_MEMORY_KIB = 64 * 1024


class IntegrityError(Exception):
    """Data or metadata failed authentication: tampered, truncated or wrongly keyed."""


class WrongPassword(IntegrityError):
    """The key bundle does not open with this password."""


def random_key() -> bytes:
    return os.urandom(KEY_LEN)


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_LEN)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, sealed: bytes, aad: bytes, what: str) -> bytes:
    if len(sealed) < NONCE_LEN + 16:
        raise IntegrityError(f"{what}: ciphertext too short")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_LEN], sealed[NONCE_LEN:], aad)
    except InvalidTag:
        raise IntegrityError(f"{what}: authentication failed (tampered or wrong key)") from None


# ---------------------------------------------------------------- the bundle


@dataclass(frozen=True, slots=True)
class KdfParams:
    salt: bytes
    iterations: int
    lanes: int
    memory_kib: int

    @classmethod
    def fresh(cls, salt: bytes | None = None) -> KdfParams:
        """The current module parameters (read at call time, so tests can lower them)."""
        return cls(
            salt=os.urandom(16) if salt is None else salt,
            iterations=KDF_ITERATIONS,
            lanes=KDF_LANES,
            memory_kib=KDF_MEMORY_KIB,
        )

    def derive(self, password: str) -> bytes:
        kdf = Argon2id(
            salt=self.salt,
            length=KEY_LEN,
            iterations=self.iterations,
            lanes=self.lanes,
            memory_cost=self.memory_kib,
        )
        return kdf.derive(password.encode())


def login_secret(username: str, password: str) -> str:
    """What the client sends to the server instead of the password.

    Argon2id of the password with a salt derived from the username: the server
    can check it (it stores only an Argon2id hash of it) but learns nothing that
    opens the key bundle, whose KEK uses the same password with a different,
    random salt. The password itself never leaves the device.
    """
    salt = hashlib.sha256(b"tessera/login/v1\x00" + username.lower().encode()).digest()[:16]
    params = KdfParams(salt, LOGIN_KDF_ITERATIONS, LOGIN_KDF_LANES, LOGIN_KDF_MEMORY_KIB)
    return params.derive(password).hex()


def _bundle_aad(username: str) -> bytes:
    return b"tessera/master-key/v1\x00" + username.encode()


def make_bundle(username: str, password: str, master: bytes, params: KdfParams) -> bytes:
    """The opaque key bundle the server stores: the master key wrapped by the KEK."""
    wrapped = _seal(params.derive(password), master, _bundle_aad(username))
    return msgpack.packb(
        {
            "v": BUNDLE_VERSION,
            "kdf": {
                "alg": "argon2id",
                "salt": params.salt,
                "t": params.iterations,
                "p": params.lanes,
                "m": params.memory_kib,
            },
            "master": wrapped,
        },
        use_bin_type=True,
    )


def open_bundle(username: str, password: str, bundle: bytes) -> bytes:
    """The master key, or WrongPassword."""
    try:
        data = msgpack.unpackb(bundle, raw=False)
        kdf = data["kdf"]
        if data["v"] != BUNDLE_VERSION or kdf["alg"] != "argon2id":
            raise IntegrityError("unsupported key bundle")
        params = KdfParams(
            salt=kdf["salt"], iterations=kdf["t"], lanes=kdf["p"], memory_kib=kdf["m"]
        )
        sealed = data["master"]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"malformed key bundle: {exc}") from None
    try:
        return _open(params.derive(password), sealed, _bundle_aad(username), "key bundle")
    except IntegrityError:
        raise WrongPassword("wrong password (the key bundle does not open)") from None


def rewrap_bundle(username: str, old: str, new: str, bundle: bytes) -> bytes:
    """The same master key under a new password (password change)."""
    return make_bundle(username, new, open_bundle(username, old, bundle), KdfParams.fresh())


# ------------------------------------------------------------------ objects


@dataclass(frozen=True, slots=True)
class FileMeta:
    """What the server must never see: the path, times, size and content hash."""

    path: str
    kind: str  # "file" or "dir"
    mtime_ns: int
    size: int
    content_hash: bytes  # content_hash() of the plaintext parts; b"" for dirs
    parts: int

    def pack(self) -> bytes:
        return msgpack.packb(
            {
                "path": self.path,
                "kind": self.kind,
                "size": self.size,
                "hash": self.content_hash,
                "parts": self.parts,
            },
            use_bin_type=True,
        )

    @classmethod
    def unpack(cls, name: bytes, mtime: bytes) -> FileMeta:
        try:
            d: dict[str, Any] = msgpack.unpackb(name, raw=False)
            (mtime_ns,) = struct.unpack(">q", mtime)
            return cls(d["path"], d["kind"], mtime_ns, d["size"], d["hash"], d["parts"])
        except (ValueError, KeyError, TypeError, struct.error, msgpack.UnpackException):
            raise IntegrityError("metadata has an unexpected shape") from None


@dataclass(frozen=True, slots=True)
class SealedMeta:
    """The four opaque fields of a frame's ``meta``."""

    name: bytes
    mtime: bytes
    key: bytes
    salt: bytes

    def as_map(self) -> dict[str, bytes]:
        return {"name": self.name, "mtime": self.mtime, "key": self.key, "salt": self.salt}


def _aad(label: bytes, revision: bytes, *ints: int) -> bytes:
    return (
        b"tessera/" + label + b"/v1\x00" + revision + b"".join(struct.pack(">Q", i) for i in ints)
    )


def seal_meta(master: bytes, object_key: bytes, meta: FileMeta, revision: bytes) -> SealedMeta:
    if len(revision) != REVISION_SALT_LEN:
        raise ValueError("revision salt must be 16 bytes")
    return SealedMeta(
        name=_seal(object_key, meta.pack(), _aad(b"name", revision)),
        mtime=_seal(object_key, struct.pack(">q", meta.mtime_ns), _aad(b"mtime", revision)),
        key=_seal(master, object_key, b"tessera/object-key/v1"),
        salt=revision,
    )


def open_object_key(master: bytes, sealed_key: bytes) -> bytes:
    return _open(master, sealed_key, b"tessera/object-key/v1", "object key")


def open_meta(master: bytes, meta: dict[str, bytes]) -> tuple[bytes, FileMeta]:
    """(object key, plaintext metadata) of a change's or object's ``meta`` map."""
    object_key = open_object_key(master, meta["key"])
    revision = meta["salt"]
    name = _open(object_key, meta["name"], _aad(b"name", revision), "name")
    mtime = _open(object_key, meta["mtime"], _aad(b"mtime", revision), "mtime")
    return object_key, FileMeta.unpack(name, mtime)


# ---------------------------------------------------------------- partitions


@dataclass(frozen=True, slots=True)
class SealedPart:
    data: bytes  # ciphertext: what the server stores
    sha256: bytes  # of the ciphertext: the server verifies it
    key: bytes  # part key wrapped by the object key
    salt: bytes  # the data's nonce
    plain_sha256: bytes  # of the plaintext: feeds the content hash (never sent)

    def spec(self) -> dict[str, Any]:
        return {"size": len(self.data), "sha256": self.sha256, "key": self.key, "salt": self.salt}


def seal_part(
    object_key: bytes, revision: bytes, index: int, count: int, plaintext: bytes
) -> SealedPart:
    part_key = random_key()
    nonce = os.urandom(NONCE_LEN)
    data = encrypt_part(part_key, nonce, revision, index, count, plaintext)
    return SealedPart(
        data=data,
        sha256=hashlib.sha256(data).digest(),
        key=_seal(object_key, part_key, _aad(b"part-key", revision, index, count)),
        salt=nonce,
        plain_sha256=hashlib.sha256(plaintext).digest(),
    )


def encrypt_part(
    part_key: bytes, nonce: bytes, revision: bytes, index: int, count: int, plaintext: bytes
) -> bytes:
    """The partition's ciphertext. Deterministic for a given key and nonce, which a
    resumed upload relies on to re-create exactly what it declared."""
    return AESGCM(part_key).encrypt(nonce, plaintext, _aad(b"part", revision, index, count))


def open_part_key(
    object_key: bytes, revision: bytes, index: int, count: int, sealed_key: bytes
) -> bytes:
    return _open(
        object_key, sealed_key, _aad(b"part-key", revision, index, count), f"part {index} key"
    )


def open_part(
    object_key: bytes,
    revision: bytes,
    index: int,
    count: int,
    part: dict[str, Any],
    data: bytes,
) -> bytes:
    """Verify and decrypt one partition; IntegrityError on any mismatch."""
    if hashlib.sha256(data).digest() != part["sha256"]:
        raise IntegrityError(f"part {index}: sha256 of the ciphertext does not match")
    part_key = _open(
        object_key, part["key"], _aad(b"part-key", revision, index, count), f"part {index} key"
    )
    try:
        return AESGCM(part_key).decrypt(part["salt"], data, _aad(b"part", revision, index, count))
    except (InvalidTag, ValueError):
        raise IntegrityError(
            f"part {index}: authentication failed (tampered, reordered or truncated)"
        ) from None


def content_hash(part_hashes: Iterable[bytes]) -> bytes:
    """SHA-256 over the concatenated SHA-256 of each plaintext part."""
    h = hashlib.sha256()
    for digest in part_hashes:
        h.update(digest)
    return h.digest()
