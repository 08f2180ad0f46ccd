"""A real Tessera server for tests: uvicorn on a free port, in its own thread and loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from server.cli import uvicorn_config
from server.services import Services
from server.settings import Settings

T = TypeVar("T")

#: Fixed so tests can mint tokens (e.g. expired ones) the server accepts.
TEST_JWT_SECRET = "tessera-test-secret-0123456789abcdef0123456789"


class RunningServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="tessera-test-server", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/sync"

    @property
    def services(self) -> Services:
        assert self._server is not None
        app = self._server.config.loaded_app
        while not hasattr(app, "state"):  # uvicorn may wrap the app in middleware
            app = app.app
        return app.state.services  # type: ignore[no-any-return]

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        config = uvicorn_config(self.settings, port=0, log_level="warning")
        self._server = uvicorn.Server(config)
        serving = asyncio.create_task(self._server.serve())
        while not self._server.started and not serving.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if self._server.started:
            self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self._ready.set()
        await serving

    def start(self) -> RunningServer:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise RuntimeError("test server failed to start") from self._error
        if not self.port:
            raise RuntimeError("test server did not start")
        return self

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
        """Run a coroutine on the server's own loop (its pool and store live there)."""
        assert self._loop is not None
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
            _wrap(fn), self._loop
        )
        return future.result(timeout)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(30)


async def _wrap(fn: Callable[[], Awaitable[Any]]) -> Any:
    return await fn()


def test_settings(data_dir: Path, database_url: str, **overrides: Any) -> Settings:
    base = Settings(
        host="127.0.0.1",
        port=0,
        data_dir=data_dir,
        database_url=database_url,
        jwt_secret=TEST_JWT_SECRET,
        argon2_time_cost=1,
        argon2_memory_cost=1024,
        janitor_interval=3600,
        log_level="warning",
        # Wrong-password tests all come from 127.0.0.1: only the throttling tests
        # (which set their own) should ever be throttled.
        login_max_failures=100_000,
    )
    return base.replace(**overrides)
