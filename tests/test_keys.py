"""Store keys: built from server-side ids, parsed back by the janitor."""

from __future__ import annotations

import secrets

import pytest

from server import keys


def test_staging_keys_round_trip_and_sit_under_their_prefix() -> None:
    upload = secrets.token_urlsafe(16)
    key = keys.staging_key(42, upload, 7)
    assert key == f"staging/42/{upload}.7"
    assert key.startswith(keys.staging_prefix(42, upload))
    assert keys.parse_staging_key(key) == (42, upload, 7)


def test_an_upload_prefix_never_matches_another_uploads_parts() -> None:
    """Ids are [A-Za-z0-9_-]: the dot ends one, so ``ab`` does not list ``abc``'s parts."""
    assert not keys.staging_key(1, "abc", 0).startswith(keys.staging_prefix(1, "ab"))
    assert not keys.staging_key(1, "ab", 0).startswith(keys.staging_prefix(11, "ab"))


@pytest.mark.parametrize(
    "key",
    [
        "staging/1/up/0",  # the folder-per-upload layout of earlier versions
        "staging/1/up",
        "staging/1/up.",
        "staging/1/.0",
        "staging/x/up.0",
        "staging/1/up.x",
        "partitions/1/up.0",
        "staging/1/up.0/extra",
    ],
)
def test_anything_else_is_not_a_staging_key(key: str) -> None:
    assert keys.parse_staging_key(key) is None


def test_partition_keys_round_trip() -> None:
    assert keys.partition_key(3, 99) == "partitions/3/99"
    assert keys.parse_partition_key("partitions/3/99") == (3, 99)
    assert keys.parse_partition_key("partitions/3/99/x") is None
    assert keys.parse_partition_key("staging/3/99") is None
