"""A fault-injecting TCP proxy for tests (the way asyncpg tests its own driver).

It listens on 127.0.0.1:<free port> and forwards every connection to an upstream
that is a TCP address or a Unix socket path. The proxy runs its own event loop in
a thread of its own, so synchronous test code, the test's loop and a server thread
can all drive it. Faults:

* ``stall()`` / ``resume()``: stop forwarding in both directions, sockets stay open;
* ``cut()``: close every current connection abruptly (new ones are still accepted);
* ``refuse()`` / ``allow()``: close new connections as soon as they are accepted;
* ``watch(pattern, then=...)``: fire when ``pattern`` passes client -> upstream,
  and optionally stall or cut at exactly that moment (before or after the bytes
  that matched are forwarded).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Upstream = tuple[str, int] | str  # (host, port) or a Unix socket path
Then = Literal["stall", "cut", "cut_after"] | Callable[[], None] | None


@dataclass(eq=False)
class Trigger:
    """A watch on the client -> upstream traffic.

    ``after``: only on a connection that has already sent that pattern (e.g. the
    COMMIT of the connection that inserted the object row).
    """

    pattern: bytes
    then: Then = None
    after: bytes | None = None
    once: bool = True
    fired: threading.Event = field(default_factory=threading.Event)
    count: int = 0


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    seen: set[bytes] = field(default_factory=set)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None and sock.family == socket.AF_INET:
                with contextlib.suppress(OSError):  # RST, not FIN: an abrupt cut
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    def __init__(self, upstream: Upstream, name: str = "proxy") -> None:
        self.upstream = upstream
        self.name = name
        self.port = 0
        self.accepted = 0
        self._refusing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._flowing = asyncio.Event()
        self._conns: set[_Conn] = set()
        self._triggers: list[Trigger] = []
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ----------------------------------------------------------- lifecycle

    def start(self) -> FaultProxy:
        self._thread.start()
        self._run(self._listen)
        return self

    async def _listen(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        self._cut()

    def _run(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` (plain or async) on the proxy's loop and wait for it."""
        if threading.current_thread() is self._thread:  # from a trigger's callback
            result = fn()
            if asyncio.iscoroutine(result):
                self._loop.create_task(result)
            return

        async def call() -> None:
            result = fn()
            if asyncio.iscoroutine(result):
                await result

        future: concurrent.futures.Future[None] = asyncio.run_coroutine_threadsafe(
            call(), self._loop
        )
        future.result(10)

    # -------------------------------------------------------------- faults

    def stall(self) -> None:
        self._run(self._flowing.clear)

    def resume(self) -> None:
        self._run(self._flowing.set)

    def cut(self) -> None:
        self._run(self._cut)

    def _cut(self) -> None:
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()

    def refuse(self) -> None:
        self._refusing = True

    def allow(self) -> None:
        self._refusing = False

    def heal(self) -> None:
        """Undo every fault and drop every watch."""
        self.allow()
        self._run(self._triggers.clear)
        self.resume()

    def watch(
        self, pattern: bytes, then: Then = None, *, after: bytes | None = None, once: bool = True
    ) -> Trigger:
        trigger = Trigger(pattern, then, after, once)
        self._run(lambda: self._triggers.append(trigger))
        return trigger

    # ----------------------------------------------------------- forwarding

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Conn(writer)
        if self._refusing:
            conn.abort()
            return
        try:
            if isinstance(self.upstream, str):
                up_reader, up_writer = await asyncio.open_unix_connection(self.upstream)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            conn.abort()
            return
        conn.upstream = up_writer
        self._conns.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pump(conn, reader, up_writer, outbound=True)),
            asyncio.create_task(self._pump(conn, up_reader, writer, outbound=False)),
        ]

    async def _pump(
        self, conn: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter, outbound: bool
    ) -> None:
        tail = b""
        try:
            while data := await src.read(65536):
                cut_after = False
                if outbound:
                    window, start = tail + data, len(tail)
                    tail = window[-256:]
                    for trigger in self._matches(conn, window, start):
                        if trigger.then == "cut":
                            self._cut()
                            return
                        if trigger.then == "cut_after":
                            cut_after = True
                        elif trigger.then == "stall":
                            self._flowing.clear()
                        elif trigger.then is not None:
                            trigger.then()
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
                if cut_after:
                    self._cut()
                    return
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if conn in self._conns:  # one side ended: end the other one too
                self._conns.discard(conn)
                conn.abort()

    def _matches(self, conn: _Conn, window: bytes, start: int) -> list[Trigger]:
        """Triggers whose pattern ends in the new bytes (``window[start:]``)."""

        def found(pattern: bytes) -> bool:
            return window.find(pattern, max(0, start - len(pattern) + 1)) >= 0

        for trigger in self._triggers:  # remember what this connection sent, for `after`
            if trigger.after is not None and found(trigger.after):
                conn.seen.add(trigger.after)
        fired = []
        for trigger in list(self._triggers):
            if not found(trigger.pattern) or trigger.after not in (None, *conn.seen):
                continue
            trigger.count += 1
            trigger.fired.set()
            if trigger.once:
                self._triggers.remove(trigger)
            fired.append(trigger)
        return fired
