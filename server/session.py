"""One WebSocket session: a thin loop around :class:`protocol.ServerConnection`.

Three kinds of work run side by side so that none can stall the others:

* the receive loop validates every message and handles chunks and pings inline
  (bookkeeping only, no I/O);
* requests that touch the database or the store run as tasks, so a long commit
  does not hold up chunks of another upload;
* each part's chunks are written to its spool file, in order, on an ingest
  thread (:mod:`server.ingest`), which returns their credit as it goes, so
  server memory per session stays bounded by the credit window.

Everything leaves through the :class:`Outbox`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from protocol import frames
from protocol.codec import data_head, encode
from protocol.connection import ServerConnection
from protocol.errors import CloseCode, ErrorCode, ProtocolViolation, RequestError
from protocol.frames import (
    Abort,
    Ack,
    Chunk,
    Commit,
    Delete,
    Get,
    Hello,
    Info,
    Ping,
    Put,
    Reauth,
    Resume,
    Upload,
)
from protocol.ratelimit import TokenBucket
from server.auth import AuthError
from server.changes import BATCH as FEED_BATCH
from server.db import TRANSIENT_DB_ERRORS
from server.outbox import Message, Outbox, OutboxClosed
from server.services import Services
from server.stores import BlobNotFound, StoreError
from server.uploads import PartWriter, UploadRecord, mark_retrieved

log = logging.getLogger(__name__)

#: Seconds before the access token lapses at which ``expiring`` is sent.
EXPIRY_WARNING = 60.0


@dataclass(slots=True)
class _Write:
    writer: PartWriter
    data: bytes | memoryview


@dataclass(slots=True)
class _Finish:
    record: UploadRecord
    writer: PartWriter


@dataclass(slots=True)
class _Discard:
    writer: PartWriter


_IngestOp = _Write | _Finish | _Discard


class _Closing(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Session:
    def __init__(self, ws: WebSocket, services: Services) -> None:
        self.ws = ws
        self.svc = services
        self.settings = services.settings
        self.conn = ServerConnection(services.settings.limits)
        self.id = secrets.token_urlsafe(12)
        self.user = 0
        self.device = ""
        self.outbox = Outbox(self._send_bytes, high_water=services.settings.outbox_frames)
        self.uploads: dict[str, UploadRecord] = {}
        self.writers: dict[tuple[str, int], PartWriter] = {}
        self._loop = asyncio.get_running_loop()
        #: Jobs of this session's spooled parts not yet reported back by their
        #: ingest thread; ``_ingest_idle`` is set whenever there are none.
        self._ingesting = 0
        self._ingest_idle = asyncio.Event()
        self._ingest_idle.set()
        self._requests: set[asyncio.Task[None]] = set()
        self._finishing: set[asyncio.Task[Any]] = set()
        self._gets: set[asyncio.Task[None]] = set()
        self._settled = asyncio.Event()
        self._storing = asyncio.Semaphore(services.store.parallel_puts)
        self._wanted = asyncio.Event()
        #: Resolved (with an exception) to end the session from outside: revocation.
        self._kill: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acked = 0
        now = asyncio.get_running_loop().time()
        rate = services.settings.frame_rate
        self._frame_budget = TokenBucket(rate, 2 * rate, now)
        byte_rate = services.settings.byte_rate
        self._byte_budget = TokenBucket(byte_rate, max(byte_rate, services.settings.window), now)
        self._ack_task: asyncio.Task[None] | None = None
        #: The highest seq sent to this device on this session.
        self.last_sent = 0
        #: The highest seq the hub announced; ``_stale``: it announced an unknown one.
        self._announced = 0
        self._stale = False
        #: The feed loop is synced and waiting; ``_pushing``: a FeedReader.push for
        #: this session is pending (the loop does not read meanwhile).
        self._idle = False
        self._pushing = False
        self._expires = 0.0
        self._expiry_task: asyncio.Task[None] | None = None

    async def _send_bytes(self, message: Message) -> None:
        # Not send_bytes (typed bytes): a download's data frame is a tuple of
        # pieces, which only our protocol (server/wsprotocol.py) takes as it is.
        await self.ws.send({"type": "websocket.send", "bytes": message})

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        await self.ws.accept()
        background: list[asyncio.Task[Any]] = []
        code, reason = CloseCode.NORMAL, ""
        try:
            try:
                hello = await asyncio.wait_for(self._receive(), self.settings.hello_timeout)
            except TimeoutError:
                raise ProtocolViolation("no hello in time", CloseCode.HELLO_TIMEOUT) from None
            assert isinstance(hello, Hello)
            await self._start(hello)
            background = [
                asyncio.create_task(self.outbox.run(), name=f"outbox-{self.id}"),
                asyncio.create_task(self._feed_loop(hello.cursor), name=f"feed-{self.id}"),
            ]
            receiving = asyncio.create_task(self._receive_loop(), name=f"recv-{self.id}")
            background.append(asyncio.ensure_future(self._kill))
            # In ``background`` too, so shutdown collects its outcome whatever ends first.
            background.append(receiving)
            done, _ = await asyncio.wait(background, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise what ended the session
        except ProtocolViolation as exc:
            code, reason = exc.code, exc.reason
        except _Closing as exc:
            code, reason = exc.code, exc.reason
        except (WebSocketDisconnect, OutboxClosed, ConnectionError):
            code = CloseCode.NORMAL
        except Exception:
            log.exception("session %s failed", self.id)
            code, reason = CloseCode.INTERNAL_ERROR, "internal error"
        finally:
            await self._shutdown(background, code, reason)

    async def _shutdown(self, background: list[asyncio.Task[Any]], code: int, reason: str) -> None:
        self.conn.close()
        if self.user:
            self.svc.hub.unsubscribe(self.user, self)
        if self._expiry_task:
            self._expiry_task.cancel()
        if code != CloseCode.NORMAL:
            await self.outbox.flush(1.0)  # let the last error frame out before the close
        self.outbox.close()
        for task in [*background, *self._requests, *self._gets]:
            task.cancel()
        await asyncio.gather(*background, *self._requests, *self._gets, return_exceptions=True)
        # Parts already complete are finishing their way into staging, and puts
        # are finishing: let them, so a resumed upload does not have to send them
        # again and a put is whole or not at all.
        if self._finishing:
            await asyncio.wait(self._finishing, timeout=30)
        for writer in list(self.writers.values()):
            if not writer.storing:  # incomplete, or complete but never handed on
                self._drop_writer(writer)
        # Each discard runs after its part's queued writes, on their thread.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ingest_idle.wait(), 30)
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code, reason[:120])

    async def _receive(self) -> frames.ClientFrame:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        data = message.get("bytes")
        if data is None:
            data = message.get("text", "")
        return self.conn.receive(data)

    async def _receive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(self.settings.idle_timeout):
                    frame = await self._receive()
            except TimeoutError:
                raise ProtocolViolation("idle for too long", CloseCode.HELLO_TIMEOUT) from None
            except RequestError as exc:  # unknown type, oversize field: answer and go on
                self._send_error(frames.error_from(exc))
                continue
            if not await self._within_rates(frame, loop.time()):
                continue
            self._dispatch(frame)

    async def _within_rates(self, frame: frames.ClientFrame, now: float) -> bool:
        """Per-session frame and byte rates.

        A request over the frame rate is refused (``rate_limited``, retry true);
        anything else over a rate is delayed: the socket is not read meanwhile,
        so the excess waits in the client's TCP buffers, not in server memory.
        """
        if not self._frame_budget.try_take(1, now):
            rid = getattr(frame, "rid", None)
            if rid is not None:
                if isinstance(frame, Put):  # its data was charged to the window
                    self._release(len(frame.data))
                self._send_error(
                    frames.error(ErrorCode.RATE_LIMITED, "too many frames; slow down", rid=rid)
                )
                return False
            await asyncio.sleep(self._frame_budget.take(1, now))
        if isinstance(frame, Chunk | Put):
            delay = self._byte_budget.take(len(frame.data), now)
            if delay > 0:
                await asyncio.sleep(delay)
        return True

    # ------------------------------------------------------- hello, expiry

    async def _start(self, hello: Hello) -> None:
        try:
            claims = self.svc.auth.verify_access(hello.token)
            await self.svc.auth.check_live(claims)
        except AuthError as exc:
            code = CloseCode.DEVICE_REVOKED if "revoked" in str(exc) else CloseCode.UNAUTHORIZED
            raise ProtocolViolation(str(exc), code) from None
        if claims.device is not None and claims.device != hello.device:
            # Else a revoked device could live on under another device's name.
            raise ProtocolViolation("the token is for another device", CloseCode.UNAUTHORIZED)
        cap = self.settings.max_sessions_per_user
        if self.svc.hub.count(claims.user, Session) >= cap:
            raise ProtocolViolation(f"at most {cap} sessions per user", CloseCode.TOO_MANY_SESSIONS)
        row = await self.svc.pool.fetchrow(
            """INSERT INTO devices (user_id, id) SELECT id, $2 FROM users WHERE id = $1
               ON CONFLICT (user_id, id) DO UPDATE SET last_seen = now()
               RETURNING revoked_at, (SELECT change_seq FROM users WHERE id = $1) AS head""",
            claims.user,
            hello.device,
        )
        if row is None:
            raise ProtocolViolation("unknown user", CloseCode.UNAUTHORIZED)
        if row["revoked_at"] is not None:
            raise ProtocolViolation("device revoked", CloseCode.DEVICE_REVOKED)
        self.user, self.device = claims.user, hello.device
        # Subscribe before the first read, so no change can fall between the two.
        self.svc.hub.subscribe(self.user, self)
        self._set_expiry(claims.expires)
        welcome = frames.welcome(self.id, self.user, self.device, row["head"], self.conn.limits)
        welcome["idle_timeout"] = self.settings.idle_timeout
        await self._send_bytes(encode(welcome))
        self.svc.counters.sessions_opened += 1

    def _set_expiry(self, expires: float) -> None:
        self._expires = expires
        if self._expiry_task:
            self._expiry_task.cancel()
        self._expiry_task = asyncio.create_task(self._expiry_watch())

    async def _expiry_watch(self) -> None:
        remaining = self._expires - time.time()
        if remaining > EXPIRY_WARNING:
            await asyncio.sleep(remaining - EXPIRY_WARNING)
        self.outbox.send(frames.expiring(max(0, int(self._expires - time.time()))))
        await asyncio.sleep(max(0.0, self._expires - time.time()))
        self._send_error(frames.error(ErrorCode.UNAUTHORIZED, "access token expired"))
        await self.outbox.flush(1.0)
        with contextlib.suppress(Exception):
            await self.ws.close(CloseCode.UNAUTHORIZED, "access token expired")

    # ---------------------------------------------------------------- feed

    def control(self, action: str, device: str) -> None:
        """From the hub: a device was revoked, or the password changed elsewhere."""
        if self._kill.done():
            return
        if action == "revoke" and device == self.device:
            self._kill.set_exception(_Closing(CloseCode.DEVICE_REVOKED, "device revoked"))
        elif action == "logout" and device != self.device:
            self._kill.set_exception(
                _Closing(CloseCode.UNAUTHORIZED, "signed out: the password was changed")
            )

    def poke(self, seq: int | None) -> None:
        """Called by the hub: changes up to ``seq`` (or unknown) may be waiting.

        A synced, idle session is handed the rows by ``FeedReader.push`` with the
        user's other sessions (no task wakes per session); otherwise its feed loop
        reads them."""
        if seq is None:
            self._stale = True
            self._wanted.set()
        elif seq > self.last_sent:
            self._announced = max(self._announced, seq)
            if self._pushing:
                return  # ``pushed`` looks at ``_announced``
            if self._idle and not self._wanted.is_set() and self.outbox.has_room:
                self._pushing = True
                self.svc.feed.push(self.user, self.last_sent, self)
            else:
                self._wanted.set()

    def pushed(self, after: int, changes: list[tuple[int, bytes]]) -> None:
        """The rows after ``after``, read for a poke. Sent only if the feed loop is
        still idle at that cursor; else the loop reads (nothing goes out twice)."""
        self._pushing = False
        if self.outbox.closed:
            return
        if not self._idle or self._wanted.is_set() or self.last_sent != after:
            self._wanted.set()
            return
        self._send_changes(changes)
        if len(changes) == FEED_BATCH or self.last_sent < self._announced:
            self._wanted.set()  # more, or announced while the rows were read

    def _send_changes(self, changes: list[tuple[int, bytes]]) -> None:
        for seq, message in changes:
            self.outbox.send_encoded(message)
            self.last_sent = seq
        self.svc.counters.changes_sent += len(changes)

    def push_failed(self) -> None:
        self._pushing = False
        self._wanted.set()

    async def _feed_loop(self, cursor: int) -> None:
        """Send every change after ``cursor``, then ``synced``, then each new one.

        One task per session sends the rows (notifications are only hints), so
        seqs go out strictly ascending with no duplicates. The event is cleared
        *before* each read: a poke that lands during the read causes one more.
        Reads are shared by the user's sessions (``FeedReader``); a shared read
        may have begun before the announced change committed, so when it does not
        reach the announced seq, a fresh read follows. The first read is fresh too:
        one begun before this session subscribed may miss a change nobody announces
        to it again.
        """
        self.last_sent = cursor
        synced = False
        backoff = 0.1
        fresh = True
        while True:
            self._wanted.clear()
            if self._stale:
                self._stale, fresh = False, True
            try:
                while True:
                    if not await self.outbox.wait_room(self.settings.slow_consumer_timeout):
                        raise _Closing(
                            CloseCode.POLICY_VIOLATION, "too slow: reconnect to catch up"
                        )
                    was_fresh, fresh = fresh, False
                    changes = await self.svc.feed.read(self.user, self.last_sent, fresh=was_fresh)
                    self._send_changes(changes)
                    if len(changes) == FEED_BATCH:
                        continue
                    # A fresh read saw every announced commit (a row since purged
                    # never shows up; don't wait for it).
                    if was_fresh or self.last_sent >= self._announced:
                        break
                    fresh = True  # the shared read began before the announced commit
            except TRANSIENT_DB_ERRORS as exc:
                # The database is restarting: keep the session, retry from last_sent.
                log.warning("session %s: feed read failed (%s); retrying", self.id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                fresh = True
                self._wanted.set()
                continue
            backoff = 0.1
            if not synced:
                self.outbox.send({"t": "synced", "cursor": self.last_sent})
                synced = True
            self._idle = True
            try:
                await self._wanted.wait()
            finally:
                self._idle = False
            while self._pushing:  # let a pending push land (it only sends if idle)
                self._wanted.clear()
                await self._wanted.wait()

    # ------------------------------------------------------------ dispatch

    def _dispatch(self, frame: frames.ClientFrame) -> None:
        match frame:
            case Chunk():
                self._on_chunk(frame)
            case Ping(rid=rid):
                self.outbox.send(frames.pong(rid))
            case Ack(cursor=cursor):
                self._on_ack(cursor)
            case Upload(rid=rid):
                self._spawn(rid, self._upload(frame))
            case Put(rid=rid):
                if not self._spawn(rid, self._put(frame)):
                    self._release(len(frame.data))  # refused: its data is dropped
            case Resume(rid=rid):
                self._spawn(rid, self._resume(frame))
            case Commit(rid=rid):
                self._spawn(rid, self._commit(frame))
            case Abort(rid=rid):
                self._spawn(rid, self._abort(frame))
            case Delete(rid=rid):
                self._spawn(rid, self._delete(frame))
            case Info(rid=rid):
                self._spawn(rid, self._info(frame))
            case Get(rid=rid):
                self._start_get(frame)
            case Reauth(rid=rid):
                self._spawn(rid, self._reauth(frame))
            case _:  # pragma: no cover - the parser only yields the types above
                raise ProtocolViolation(f"unexpected frame {type(frame).__name__}")

    def _spawn(self, rid: int | None, work: Awaitable[dict[str, Any] | None]) -> bool:
        """Run a request in its own task; False when refused (too many in flight)."""
        if len(self._requests) >= self.settings.max_requests:
            _close_awaitable(work)
            self._send_error(
                frames.error(ErrorCode.RATE_LIMITED, "too many requests in flight", rid=rid)
            )
            return False
        task = asyncio.create_task(self._answer(rid, work))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)
        return True

    async def _answer(self, rid: int | None, work: Awaitable[dict[str, Any] | None]) -> None:
        """Run one request; exactly one terminal reply, whatever happens."""
        try:
            reply = await work
        except RequestError as exc:
            if exc.rid is None:
                exc.rid = rid
            reply = frames.error_from(exc)
        except BlobNotFound as exc:  # a row points at missing data: retrying cannot help
            log.error("session %s: stored data missing: %s", self.id, exc)
            reply = frames.error(ErrorCode.INTERNAL, "stored data is missing", rid=rid)
        except (StoreError, *TRANSIENT_DB_ERRORS) as exc:
            log.warning("session %s: backend unavailable: %r", self.id, exc)
            reply = frames.error(ErrorCode.UNAVAILABLE, "storage temporarily unavailable", rid=rid)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session %s: request failed", self.id)
            reply = frames.error(ErrorCode.INTERNAL, "internal error", rid=rid)
        if reply is not None and reply["t"] == "error":
            self._send_error(reply)
        elif reply is not None:
            self.outbox.send(reply)

    def _send_error(self, frame: dict[str, Any]) -> None:
        """Every error frame of the session goes out here, so /metrics counts each."""
        self.svc.counters.error("ws", str(frame["code"]))
        self.outbox.send(frame)

    # -------------------------------------------------------------- uploads

    async def _upload(self, frame: Upload) -> dict[str, Any]:
        record = await self.svc.uploads.create(self.user, self.device, frame)
        self.uploads[record.id] = record
        return frames.upload_ok(frame.rid, record.id, [])

    async def _put(self, frame: Put) -> dict[str, Any]:
        self.svc.counters.upload_bytes += len(frame.data)
        # Not cut off when the session ends (like parts finishing into staging): a
        # put is whole or not at all, never staged data that no row owns.
        work = asyncio.create_task(self.svc.uploads.put(self.user, self.device, frame))
        self._finishing.add(work)
        work.add_done_callback(self._finishing.discard)
        work.add_done_callback(mark_retrieved)
        try:
            result = await asyncio.shield(work)
        finally:
            self._release(len(frame.data))  # the window bounds put data like chunks
        self.svc.counters.commits += 1
        return frames.committed(frame.rid, result.object, result.rev, result.seq)

    async def _resume(self, frame: Resume) -> dict[str, Any]:
        record = await self.svc.uploads.open(self.user, frame.upload, frame.rid)
        known = self.uploads.get(frame.upload)
        if known is not None:  # keep the parts this session is still receiving
            known.received |= record.received
            record = known
        self.uploads[record.id] = record
        return frames.upload_ok(frame.rid, record.id, record.have)

    async def _abort(self, frame: Abort) -> dict[str, Any]:
        self._drop_upload(frame.upload)
        await self.svc.uploads.abort(self.user, frame.upload, frame.rid)
        return frames.ok(frame.rid)

    async def _commit(self, frame: Commit) -> dict[str, Any]:
        await self._settle(frame.upload)
        try:
            result = await self.svc.uploads.commit(self.user, frame.upload, self.device, frame.rid)
        except RequestError as exc:
            known = self.uploads.get(frame.upload)
            if exc.code == ErrorCode.INCOMPLETE and known is not None:
                # Staged parts the store lost are to be sent again: accept them.
                missing = exc.extra.get("missing")
                known.received -= set(missing) if isinstance(missing, list) else set()
            raise
        self._drop_upload(frame.upload)
        self.svc.counters.commits += 1
        return frames.committed(frame.rid, result.object, result.rev, result.seq)

    async def _delete(self, frame: Delete) -> dict[str, Any]:
        result = await self.svc.objects.delete(
            self.user, frame.object, frame.base, self.device, frame.rid
        )
        self.svc.counters.deletes += 1
        return frames.committed(frame.rid, result.object, result.rev, result.seq)

    def _drop_upload(self, upload: str) -> None:
        self.uploads.pop(upload, None)
        for key in [k for k in self.writers if k[0] == upload]:
            writer = self.writers[key]
            if writer.accepted < writer.size:
                self._drop_writer(writer)

    async def _settle(self, upload: str) -> None:
        """Wait until every part of ``upload`` fully received here is stored (or failed)."""
        while any(k[0] == upload and w.accepted == w.size for k, w in self.writers.items()):
            self._settled.clear()
            await self._settled.wait()

    def _on_chunk(self, chunk: Chunk) -> None:
        size = len(chunk.data)
        record = self.uploads.get(chunk.upload)

        def refuse(code: ErrorCode, msg: str, **extra: Any) -> None:
            self._release(size)
            self._send_error(frames.error(code, msg, upload=chunk.upload, part=chunk.part, **extra))

        if record is None:
            return refuse(ErrorCode.NOT_FOUND, "no such upload on this session (upload or resume)")
        if chunk.part >= len(record.sizes):
            return refuse(ErrorCode.NOT_FOUND, "no such part")
        part_size = record.sizes[chunk.part]
        if chunk.part in record.received:
            return refuse(ErrorCode.BAD_OFFSET, "part is already stored", expected=part_size)
        key = (chunk.upload, chunk.part)
        writer = self.writers.get(key)
        if writer is not None and writer.accepted == part_size:
            return refuse(
                ErrorCode.BAD_OFFSET, "part is complete and being stored", expected=part_size
            )
        expected = writer.accepted if writer else 0
        if chunk.off != expected:
            return refuse(ErrorCode.BAD_OFFSET, f"expected offset {expected}", expected=expected)
        if chunk.off + size > part_size:
            if writer is not None:
                self._drop_writer(writer)
            return refuse(
                ErrorCode.TOO_LARGE,
                f"part {chunk.part} is declared as {part_size} bytes; send it again from 0",
            )
        if writer is None:
            writer = self.svc.uploads.writer(record, chunk.part)
            self.writers[key] = writer
        writer.accepted += size
        self.svc.counters.upload_bytes += size
        self._enqueue(writer, _Write(writer, chunk.data))
        if writer.accepted == part_size:
            self._enqueue(writer, _Finish(record, writer))
        return None

    def _release(self, nbytes: int) -> None:
        grant = self.conn.release(nbytes)
        if grant is not None:
            self.outbox.send(grant)

    def _enqueue(self, writer: PartWriter, op: _IngestOp) -> None:
        """Apply ``op`` to its part: at once for a part held in memory, else on the
        part's ingest thread, after the ops enqueued for it before."""
        if writer.in_memory:
            self._ingested(op, self._apply(op))
            return
        self._ingesting += 1
        self._ingest_idle.clear()
        self.svc.uploads.ingest.submit(writer.lane, functools.partial(self._ingest_job, op))

    @staticmethod
    def _apply(op: _IngestOp) -> Exception | None:
        """Write, discard or (nothing to do) finish; runs on an ingest thread for a
        spooled part, where hashlib and file writes release the GIL."""
        try:
            match op:
                case _Write(writer, data):
                    writer.write_blocking(data)
                case _Discard(writer):
                    writer.discard_blocking()
            return None
        except Exception as exc:
            return exc

    def _ingest_job(self, op: _IngestOp) -> None:
        """On an ingest thread: apply ``op``, then report to the event loop."""
        error = self._apply(op)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self._loop.call_soon_threadsafe(self._ingest_done, op, error)

    def _ingest_done(self, op: _IngestOp, error: Exception | None) -> None:
        self._ingesting -= 1
        if not self._ingesting:
            self._ingest_idle.set()
        self._ingested(op, error)

    def _ingested(self, op: _IngestOp, error: Exception | None) -> None:
        """An op is done: return its credit, report a failed write, start storing a
        complete part."""
        match op:
            case _Write(writer, data):
                if error is not None and not writer.discarded:
                    log.error("session %s: spool write failed: %r", self.id, error)
                    self._fail_part(writer, ErrorCode.UNAVAILABLE, "server disk error")
                self._release(len(data))
            case _Discard(writer):
                if error is not None:
                    log.warning("session %s: spool discard failed: %r", self.id, error)
            case _Finish(record, writer):
                if not writer.discarded:
                    task = asyncio.create_task(self._finish(record, writer))
                    self._finishing.add(task)
                    task.add_done_callback(self._finishing.discard)

    def _drop_writer(self, writer: PartWriter) -> None:
        """Forget a part in progress and delete its spool file (in order with its writes)."""
        writer.discarded = True
        key = (writer.upload, writer.index)
        if self.writers.get(key) is writer:
            del self.writers[key]
        self._enqueue(writer, _Discard(writer))
        self._settled.set()  # a commit waiting for this part must look again

    def _fail_part(self, writer: PartWriter, code: ErrorCode, msg: str) -> None:
        self._drop_writer(writer)
        self._send_error(frames.error(code, msg, upload=writer.upload, part=writer.index))

    async def _finish(self, record: UploadRecord, writer: PartWriter) -> None:
        key = (writer.upload, writer.index)
        writer.storing = True
        try:
            async with self._storing:  # parts this session stores at once
                await self.svc.uploads.store_part(record, writer)
            self.outbox.send(frames.part_ok(writer.upload, writer.index))
        except RequestError as exc:
            self._send_error(frames.error_from(exc))
        except Exception as exc:
            log.warning("session %s: storing part failed: %s", self.id, exc)
            self._send_error(
                frames.error(
                    ErrorCode.UNAVAILABLE,
                    "could not store the part; send it again",
                    upload=writer.upload,
                    part=writer.index,
                )
            )
        finally:
            if self.writers.get(key) is writer:
                del self.writers[key]
            self._settled.set()

    # ------------------------------------------------------------ downloads

    def _start_get(self, frame: Get) -> None:
        if len(self._gets) >= self.settings.max_gets:
            self._send_error(
                frames.error(
                    ErrorCode.RATE_LIMITED,
                    f"at most {self.settings.max_gets} downloads at once",
                    rid=frame.rid,
                )
            )
            return
        task = asyncio.create_task(self._answer(frame.rid, self._get(frame)))
        self._gets.add(task)
        task.add_done_callback(self._gets.discard)

    async def _get(self, frame: Get) -> None:
        part = await self.svc.objects.partition(self.user, frame.part, frame.rid)
        if frame.off > part.size:
            raise RequestError(
                ErrorCode.BAD_OFFSET, "offset beyond the end", rid=frame.rid, expected=part.size
            )
        stream = self.outbox.stream()
        try:
            off = frame.off
            if off == part.size:
                await stream.put(frames.data(frame.rid, off, b"", end=True))
                return
            step = self.conn.limits.max_chunk
            chunks = self.svc.store.read_pieces(part.store_key, off, None, step)
            async for pieces in chunks:
                size = sum(map(len, pieces))
                off += size
                if off > part.size:
                    raise StoreError(f"partition {part.id} is longer than recorded")
                # The frame is its head and the pieces as read: never joined.
                head = data_head(frame.rid, off - size, size, off == part.size)
                await stream.put_message((head, *pieces))
                self.svc.counters.download_bytes += size
            if off != part.size:
                raise StoreError(f"partition {part.id} is shorter than recorded")
        finally:
            self.outbox.release(stream)

    async def _info(self, frame: Info) -> dict[str, Any]:
        part = await self.svc.objects.partition(self.user, frame.part, frame.rid)
        return frames.part_info(frame.rid, **part.info())

    # -------------------------------------------------------- housekeeping

    def _on_ack(self, cursor: int) -> None:
        """Acks have no reply and may come fast: keep the highest, write one at a time."""
        self._acked = max(self._acked, cursor)
        if self._ack_task is None or self._ack_task.done():
            self._ack_task = asyncio.create_task(self._write_acks())

    async def _write_acks(self) -> None:
        written = -1
        while written < self._acked:
            written = self._acked
            try:
                await self.svc.pool.execute(
                    "UPDATE devices SET acked = greatest(acked, $3), last_seen = now() "
                    "WHERE user_id = $1 AND id = $2",
                    self.user,
                    self.device,
                    written,
                )
            except TRANSIENT_DB_ERRORS as exc:  # the next ack carries the cursor again
                log.warning("session %s: could not record ack: %r", self.id, exc)
                return

    async def _reauth(self, frame: Reauth) -> dict[str, Any]:
        try:
            claims = self.svc.auth.verify_access(frame.token)
            await self.svc.auth.check_live(claims)
        except AuthError as exc:
            return frames.error(ErrorCode.UNAUTHORIZED, str(exc), rid=frame.rid)
        if claims.user != self.user:
            return frames.error(ErrorCode.FORBIDDEN, "token is for another user", rid=frame.rid)
        if claims.device is not None and claims.device != self.device:
            return frames.error(ErrorCode.FORBIDDEN, "token is for another device", rid=frame.rid)
        self._set_expiry(claims.expires)
        return frames.ok(frame.rid)


def _close_awaitable(work: Awaitable[Any]) -> None:
    close: Callable[[], None] | None = getattr(work, "close", None)
    if close is not None:
        close()


async def sync_endpoint(ws: WebSocket) -> None:
    services: Services = ws.app.state.services
    await Session(ws, services).run()
