"""Threads that write and hash the chunks of spooled parts.

Every chunk of a large part used to cross to the default executor and back
(``asyncio.to_thread``): a future, a context copy, a wake-up of a worker and
one of the event loop per chunk, and a worker idle while the loop hopped.
In a profile of a 1 GiB upload that was 12 % of the event loop's time. Here
each part is pinned to one of a few long-lived threads that drain their queue
back to back; the loop only puts a job on a queue (no wake-up when the thread
is busy), and a job reports back with one ``call_soon_threadsafe``.

A part's jobs run on one thread in the order they were submitted, so its
writes are in order and its discard comes after its last write (never at the
same time, which could write into a closed, reused file descriptor).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class IngestThreads:
    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("at least one ingest thread")
        self._queues: list[queue.SimpleQueue[Callable[[], None] | None]] = [
            queue.SimpleQueue() for _ in range(count)
        ]
        self._threads = [
            threading.Thread(target=self._work, args=(q,), name=f"ingest-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        self._next = itertools.count()
        self._started = False
        self._closed = False
        self._lock = threading.Lock()

    def lane(self) -> int:
        """A thread for a new part: round robin, so parts in flight hash in parallel."""
        return next(self._next) % len(self._queues)

    def submit(self, lane: int, job: Callable[[], None]) -> None:
        """Run ``job`` on thread ``lane`` after the jobs submitted there before it.
        A job reports its own outcome; an exception escaping it is logged. Once
        closed, a job runs at once on the caller's thread: a session still
        shutting down then still gets its discards run and its credit back."""
        with self._lock:  # against a close() on another thread in between
            if not self._closed:
                if not self._started:
                    for thread in self._threads:
                        thread.start()
                    self._started = True
                self._queues[lane].put(job)
                return
        self._run(job)

    def close(self, timeout: float = 5.0) -> None:
        """Let queued jobs finish, then stop the threads."""
        with self._lock:
            self._closed = True
            if not self._started:
                return
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            thread.join(timeout)

    @classmethod
    def _work(cls, jobs: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        while (job := jobs.get()) is not None:
            cls._run(job)

    @staticmethod
    def _run(job: Callable[[], None]) -> None:
        try:
            job()
        except Exception:
            log.exception("ingest job failed")
