"""Object-store keys. Always built here from server-side ids, never from client input."""

from __future__ import annotations


def staging_prefix(user: int, upload: str) -> str:
    return f"staging/{user}/{upload}/"


def staging_key(user: int, upload: str, index: int) -> str:
    return f"{staging_prefix(user, upload)}{index}"


def partition_key(user: int, partition: int) -> str:
    return f"partitions/{user}/{partition}"


def parse_staging_key(key: str) -> tuple[int, str, int] | None:
    """(user, upload, index) of a staging key, or None for anything else."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "staging":
        return None
    try:
        return int(parts[1]), parts[2], int(parts[3])
    except ValueError:
        return None


def parse_partition_key(key: str) -> tuple[int, int] | None:
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "partitions":
        return None
    try:
        return int(parts[1]), int(parts[2])
    except ValueError:
        return None
