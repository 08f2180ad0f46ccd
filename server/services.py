"""What a request handler can reach: built once by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import asyncpg
from prometheus_client.registry import CollectorRegistry

from server.auth import Auth
from server.changes import FeedReader
from server.hub import Hub
from server.metrics import Counters
from server.objects import Objects
from server.settings import Settings
from server.stores import BlobStore
from server.uploads import Uploads


@dataclass(slots=True)
class Services:
    settings: Settings
    pool: asyncpg.Pool
    store: BlobStore
    auth: Auth
    uploads: Uploads
    objects: Objects
    hub: Hub
    feed: FeedReader
    spool_dir: Path
    counters: Counters
    metrics: CollectorRegistry
