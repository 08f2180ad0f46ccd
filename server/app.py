"""The Starlette application and its lifespan (database, store, janitor)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from server import gcpolicy, rest
from server.auth import Auth
from server.changes import FeedReader
from server.db import create_pool
from server.embedded import start_embedded_postgres
from server.hub import Hub
from server.janitor import Janitor
from server.metrics import Counters, Live, registry
from server.migrate import migrate
from server.objects import Objects
from server.services import Services
from server.session import Session, sync_endpoint
from server.settings import Settings
from server.stores import make_store
from server.uploads import Uploads, clear_spool

log = logging.getLogger(__name__)


def jwt_secret(settings: Settings) -> str:
    """The configured secret, or one generated once and kept in the data directory."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path = settings.data_dir / "jwt-secret"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def database_url(settings: Settings) -> str:
    return settings.database_url or start_embedded_postgres(settings.data_dir)


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        url = await asyncio.to_thread(database_url, settings)
        pool = await create_pool(url)
        store = make_store(settings)
        janitor_task: asyncio.Task[None] | None = None
        gc_task: asyncio.Task[None] | None = None
        hub = Hub(url)
        services: Services | None = None
        try:
            if settings.migrate:
                async with pool.acquire() as conn:
                    await migrate(conn)
            await store.start()
            spool = Path(settings.data_dir) / "spool"
            await asyncio.to_thread(clear_spool, spool)
            auth = await asyncio.to_thread(Auth, settings, pool, jwt_secret(settings))
            await hub.start()
            counters = Counters()
            feed = FeedReader(pool)
            live = Live(
                sessions=lambda: hub.total(Session),
                feed_queries=lambda: feed.reads,
                listener_connections=lambda: hub.connections,
                listener_up=hub.connected.is_set,
                pool=pool,
            )
            services = app.state.services = Services(
                settings=settings,
                pool=pool,
                store=store,
                auth=auth,
                uploads=Uploads(settings, pool, store, spool),
                objects=Objects(pool, settings.garbage_delay),
                hub=hub,
                feed=feed,
                spool_dir=spool,
                counters=counters,
                metrics=registry(counters, live),
            )
            janitor = Janitor(settings, pool, store)
            app.state.janitor = janitor
            janitor_task = asyncio.create_task(janitor.run_forever(), name="janitor")
            gc_task = asyncio.create_task(
                gcpolicy.run(settings.gc_freeze_interval, settings.gc_full_interval), name="gc"
            )
            yield
        finally:
            for task in (janitor_task, gc_task):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await hub.close()
            if services is not None:
                await services.feed.close()
                await services.uploads.close()
            await store.close()
            await pool.close()

    routes = [*rest.routes(), WebSocketRoute("/v1/sync", sync_endpoint)]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=rest.exception_handlers())
