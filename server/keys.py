"""Object-store keys. Always built here from server-side ids, never from client input."""

from __future__ import annotations


def staging_prefix(user: int, upload: str) -> str:
    """The keys of an upload's staged parts: ``staging/<user>/<upload>.<index>``.

    Flat, not a folder per upload (the first layout, ``staging/<user>/<upload>/<index>``):
    on a local store a folder per upload is an inode made and freed per upload,
    and ext4 without a journal skips the inodes freed in the last minute when it
    allocates one, so every file created cost more as commits went faster. Upload
    ids are ``[A-Za-z0-9_-]``, so the dot ends the id and prefixes cannot overlap.
    """
    return f"staging/{user}/{upload}."


def staging_key(user: int, upload: str, index: int) -> str:
    return f"{staging_prefix(user, upload)}{index}"


def staging_keys(user: int, upload: str, parts: int) -> list[str]:
    """The staging keys of every part an upload of ``parts`` parts declared."""
    return [staging_key(user, upload, index) for index in range(parts)]


def partition_key(user: int, partition: int) -> str:
    return f"partitions/{user}/{partition}"


def parse_staging_key(key: str) -> tuple[int, str, int] | None:
    """(user, upload, index) of a staging key, or None for anything else."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "staging":
        return None
    upload, dot, index = parts[2].rpartition(".")
    if not dot or not upload:
        return None
    try:
        return int(parts[1]), upload, int(index)
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
