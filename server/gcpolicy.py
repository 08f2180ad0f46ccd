"""Keep Python's cyclic garbage collector off the server's long-lived objects.

Ten thousand idle sessions are over a million tracked objects. CPython's full
collection walks all of them (1.3 s at a time, 25 times in a 2-minute load
benchmark: a fifth of the server's CPU and its worst latency spikes), although
almost all are alive. So every few seconds the objects alive at that moment are
frozen (``gc.freeze``, a list splice): later collections skip them. Objects
freed by reference counting are still freed at once; only *cyclic* garbage among
frozen objects (a closed session's task and its coroutine, say) waits for the
rare full collection that unfreezes everything first, which bounds the memory it
can hold.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger(__name__)


async def run(freeze_interval: float, full_interval: float) -> None:
    if freeze_interval <= 0:
        return
    last_full = time.monotonic()
    gc.freeze()
    try:
        while True:
            await asyncio.sleep(freeze_interval)
            if full_interval > 0 and time.monotonic() - last_full >= full_interval:
                gc.unfreeze()
                started = time.monotonic()
                found = gc.collect()
                last_full = time.monotonic()
                log.info(
                    "full collection: %d unreachable objects in %.2f s",
                    found,
                    last_full - started,
                )
            gc.freeze()
    finally:
        gc.unfreeze()  # leave the collector as found (tests run many apps in one process)
