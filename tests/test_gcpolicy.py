"""The GC policy: live objects are frozen out of the collector's sight, and the
periodic full collection still reclaims cyclic garbage that was frozen."""

from __future__ import annotations

import asyncio
import gc
import weakref

from server import gcpolicy


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


async def test_freezes_live_objects_and_reclaims_frozen_cycles_in_full_collections():
    gc.unfreeze()
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle, garbage once the names are gone
    gone = weakref.ref(a)
    task = asyncio.create_task(gcpolicy.run(0.05, 0.5))
    try:
        await asyncio.sleep(0.2)
        assert gc.get_freeze_count() > 0
        del a, b
        gc.collect()  # an ordinary collection skips frozen objects...
        assert gone() is not None
        for _ in range(40):  # ...the policy's full collection does not
            await asyncio.sleep(0.05)
            if gone() is None:
                break
        assert gone() is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert gc.get_freeze_count() == 0  # stopping leaves the collector as it was


async def test_off_when_the_interval_is_zero():
    gc.unfreeze()
    await gcpolicy.run(0, 900)
    assert gc.get_freeze_count() == 0
