"""The outbox's scheduling, without sockets: a recording send in place of the socket."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from server.outbox import Message, Outbox


class Recorder:
    """The outbox's send: records each message and yields, as a socket write may."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self._waits: list[tuple[Callable[[list[Message]], bool], asyncio.Event]] = []

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        for test, event in self._waits:
            if test(self.sent):
                event.set()
        await asyncio.sleep(0)

    async def until(self, test: Callable[[list[Message]], bool]) -> None:
        event = asyncio.Event()
        self._waits.append((test, event))
        if test(self.sent):
            event.set()
        async with asyncio.timeout(10):
            await event.wait()


async def test_streams_with_frames_ready_take_turns() -> None:
    rec = Recorder()
    outbox = Outbox(rec.send, high_water=64)
    streams = {tag: outbox.stream() for tag in (b"a", b"b", b"c")}

    async def produce(tag: bytes) -> None:
        for _ in range(50):
            await streams[tag].put_message(tag)

    producers = [asyncio.create_task(produce(tag)) for tag in streams]
    task = asyncio.create_task(outbox.run())
    await rec.until(lambda sent: len(sent) == 150)
    await asyncio.gather(*producers)
    outbox.close()
    await asyncio.gather(task, return_exceptions=True)
    # Every producer keeps its stream ready, so service is strictly round-robin
    # (with the ready queue served last-in first, runs of one stream appear).
    assert sorted(rec.sent) == sorted([b"a", b"b", b"c"] * 50)
    longest = max(len(list(run)) for _, run in itertools.groupby(rec.sent))
    assert longest == 1, rec.sent


async def test_a_control_frame_waits_for_at_most_one_data_frame() -> None:
    rec = Recorder()
    outbox = Outbox(rec.send, high_water=64)
    stream = outbox.stream()

    async def produce() -> None:
        for _ in range(20):
            await stream.put_message(b"data")

    producer = asyncio.create_task(produce())
    task = asyncio.create_task(outbox.run())
    await rec.until(lambda sent: len(sent) >= 3)
    at = len(rec.sent)
    outbox.send_encoded(b"control")
    await rec.until(lambda sent: b"control" in sent)
    assert rec.sent.index(b"control") <= at + 1, rec.sent
    await producer
    outbox.close()
    await asyncio.gather(task, return_exceptions=True)
