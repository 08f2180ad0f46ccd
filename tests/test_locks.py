"""KeyedLocks: one holder per key, in order, and no entry left behind by
cancellations, whether of a holder, a waiter, or a waiter just woken."""

from __future__ import annotations

import asyncio

from server.locks import KeyedLocks


async def test_holders_of_one_key_run_one_at_a_time_in_order_other_keys_do_not_wait() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    release = asyncio.Event()

    async def hold(key: str, name: str, wait: bool = False) -> None:
        async with locks.hold(key):
            order.append(f"{name} in")
            if wait:
                await release.wait()
            order.append(f"{name} out")

    first = asyncio.create_task(hold("k", "a", wait=True))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(hold("k", name)) for name in ("b", "c")]
    await asyncio.wait_for(hold("other", "x"), 1)  # not held up by "k"
    assert sorted(locks.held()) == ["k"]
    release.set()
    await asyncio.gather(first, *queued)
    assert order == ["a in", "x in", "x out", "a out", "b in", "b out", "c in", "c out"]
    assert locks.held() == []


class Scene:
    """Key "k" held by a holder until ``release``; everyone records when it got in."""

    def __init__(self) -> None:
        self.locks = KeyedLocks()
        self.order: list[str] = []
        self.release = asyncio.Event()

    async def holder(self) -> None:
        async with self.locks.hold("k"):
            self.order.append("holder")
            await self.release.wait()

    async def waiter(self, name: str) -> None:
        async with self.locks.hold("k"):
            self.order.append(name)

    async def start(self, *waiters: str) -> tuple[asyncio.Task[None], list[asyncio.Task[None]]]:
        """The holder in, then the waiters queued behind it, in this order."""
        held = asyncio.create_task(self.holder())
        await asyncio.sleep(0)
        queued = [asyncio.create_task(self.waiter(name)) for name in waiters]
        await asyncio.sleep(0)
        return held, queued


async def test_cancelled_holder_and_waiter_leave_no_entry() -> None:
    scene = Scene()
    held, (cancelled, last) = await scene.start("cancelled", "last")
    cancelled.cancel()  # while queued
    await asyncio.sleep(0)
    assert scene.locks.held() == ["k"]
    held.cancel()  # while holding
    await asyncio.gather(held, cancelled, return_exceptions=True)
    await asyncio.wait_for(last, 1)
    assert scene.order == ["holder", "last"]
    assert scene.locks.held() == []


async def test_waiter_cancelled_as_it_is_woken_passes_the_lock_on() -> None:
    scene = Scene()
    held, (woken, next_one) = await scene.start("woken", "next")
    scene.release.set()
    await asyncio.sleep(0)  # the holder leaves and wakes the first waiter
    woken.cancel()  # before it runs
    await asyncio.gather(held, woken, return_exceptions=True)
    await asyncio.wait_for(next_one, 1)
    assert scene.order == ["holder", "next"]
    assert scene.locks.held() == []
