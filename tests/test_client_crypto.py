"""The client's key hierarchy and AEADs, without I/O."""

from __future__ import annotations

import hashlib
import os

import pytest

from client import crypto
from client.crypto import FileMeta, IntegrityError, KdfParams, WrongPassword

FAST = {"iterations": 1, "lanes": 1, "memory_kib": 8 * 1024}


def test_bundle_round_trip_and_wrong_password():
    master = crypto.random_key()
    bundle = crypto.make_bundle(
        "alice", "secret pw", master, KdfParams(salt=os.urandom(16), **FAST)
    )
    assert master not in bundle and b"secret pw" not in bundle
    assert crypto.open_bundle("alice", "secret pw", bundle) == master
    with pytest.raises(WrongPassword):
        crypto.open_bundle("alice", "wrong pw", bundle)
    with pytest.raises(WrongPassword):  # bound to the username
        crypto.open_bundle("mallory", "secret pw", bundle)
    with pytest.raises(IntegrityError):
        crypto.open_bundle("alice", "secret pw", b"garbage")


def test_rewrap_keeps_the_master_key():
    master = crypto.random_key()
    params = KdfParams(salt=os.urandom(16), **FAST)
    bundle = crypto.make_bundle("bob", "old password", master, params)
    new = crypto.rewrap_bundle("bob", "old password", "new password", bundle)
    assert crypto.open_bundle("bob", "new password", new) == master
    with pytest.raises(WrongPassword):
        crypto.open_bundle("bob", "old password", new)


def sealed_file(plain_parts: list[bytes], path: str = "docs/ünïcode.txt"):
    master, object_key = crypto.random_key(), crypto.random_key()
    revision = os.urandom(16)
    parts = [
        crypto.seal_part(object_key, revision, i, len(plain_parts), p)
        for i, p in enumerate(plain_parts)
    ]
    meta = FileMeta(
        path,
        "file",
        1_700_000_000_123_456_789,
        sum(map(len, plain_parts)),
        crypto.content_hash(p.plain_sha256 for p in parts),
        len(parts),
    )
    return (
        master,
        object_key,
        revision,
        meta,
        crypto.seal_meta(master, object_key, meta, revision),
        parts,
    )


def test_meta_and_parts_round_trip_and_hide_plaintext():
    plain = [b"first part " * 100, b"second"]
    master, object_key, revision, meta, sealed, parts = sealed_file(plain)
    assert b"docs" not in sealed.name and "ü".encode() not in sealed.name
    key, opened = crypto.open_meta(master, sealed.as_map())
    assert key == object_key and opened == meta
    out = [crypto.open_part(key, revision, i, 2, p.spec(), p.data) for i, p in enumerate(parts)]
    assert out == plain
    assert crypto.content_hash(hashlib.sha256(x).digest() for x in out) == (meta.content_hash)
    assert all(b"first part" not in p.data for p in parts)


def test_tampering_and_swapping_fail_loudly():
    master, object_key, revision, _, sealed, parts = sealed_file([b"a" * 50, b"b" * 50])
    flipped = bytearray(parts[0].data)
    flipped[3] ^= 1
    spec = parts[0].spec() | {"sha256": hashlib.sha256(flipped).digest()}
    with pytest.raises(IntegrityError, match="authentication failed"):
        crypto.open_part(object_key, revision, 0, 2, spec, bytes(flipped))
    with pytest.raises(IntegrityError, match="sha256"):
        crypto.open_part(object_key, revision, 0, 2, parts[0].spec(), bytes(flipped))
    # Reordered parts: part 1 presented as part 0.
    with pytest.raises(IntegrityError):
        crypto.open_part(object_key, revision, 0, 2, parts[1].spec(), parts[1].data)
    # Truncation: the count is bound too.
    with pytest.raises(IntegrityError):
        crypto.open_part(object_key, revision, 0, 1, parts[0].spec(), parts[0].data)
    # Another revision's salt.
    with pytest.raises(IntegrityError):
        crypto.open_part(object_key, os.urandom(16), 0, 2, parts[0].spec(), parts[0].data)
    # Metadata from another object, or a wrong master key.
    with pytest.raises(IntegrityError):
        crypto.open_meta(crypto.random_key(), sealed.as_map())
    _, _, _, _, other, _ = sealed_file([b"x"])
    with pytest.raises(IntegrityError):
        crypto.open_meta(master, sealed.as_map() | {"name": other.name})


def test_every_encryption_uses_a_fresh_nonce():
    object_key, revision = crypto.random_key(), os.urandom(16)
    a = crypto.seal_part(object_key, revision, 0, 1, b"same")
    b = crypto.seal_part(object_key, revision, 0, 1, b"same")
    assert a.data != b.data and a.salt != b.salt and a.key != b.key


def test_login_secret_is_not_the_password_and_cannot_open_the_bundle(monkeypatch):
    monkeypatch.setattr(crypto, "KDF_MEMORY_KIB", 8 * 1024)
    monkeypatch.setattr(crypto, "KDF_ITERATIONS", 1)
    monkeypatch.setattr(crypto, "KDF_LANES", 1)
    monkeypatch.setattr(crypto, "LOGIN_KDF_MEMORY_KIB", 8 * 1024)
    monkeypatch.setattr(crypto, "LOGIN_KDF_ITERATIONS", 1)
    monkeypatch.setattr(crypto, "LOGIN_KDF_LANES", 1)
    secret = crypto.login_secret("Alice", "secret pw")
    assert secret == crypto.login_secret("alice", "secret pw")  # usernames are case-blind
    assert secret != crypto.login_secret("bob", "secret pw")
    assert "secret pw" not in secret and len(bytes.fromhex(secret)) == 32
    master = crypto.random_key()
    bundle = crypto.make_bundle("alice", "secret pw", master, KdfParams.fresh())
    with pytest.raises(WrongPassword):  # what the server sees does not open the keys
        crypto.open_bundle("alice", secret, bundle)
