"""Blob stores: S3/MinIO when an endpoint is configured, else a local directory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.stores.base import BlobInfo, BlobNotFound, BlobStore, StoreError
from server.stores.local import LocalStore
from server.stores.s3 import S3Store

if TYPE_CHECKING:
    from server.settings import Settings

__all__ = [
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "LocalStore",
    "S3Store",
    "StoreError",
    "make_store",
]


def make_store(settings: Settings) -> BlobStore:
    """The store the settings ask for; not started yet."""
    if settings.s3_endpoint:
        return S3Store(
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
            staging_bucket=settings.s3_staging_bucket,
            partitions_bucket=settings.s3_partitions_bucket,
            create_buckets=settings.s3_create_buckets,
        )
    return LocalStore(settings.data_dir / "blobs", group_sync=settings.local_group_sync)
