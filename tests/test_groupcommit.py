"""``GroupCommit``: batching, key exclusion and failure splitting, without a database
(the database side is in ``test_e2e_put.py``)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any

import pytest

from server.groupcommit import GroupCommit


async def _turns(n: int = 3) -> None:
    """Let the loop go round: a submit, its kick (the next turn), its batch's task."""
    for _ in range(n):
        await asyncio.sleep(0)


class Rejected(Exception):
    """Stands for an error the database answered with (nothing committed)."""


class Recorder:
    """A fake statement runner: records each batch, waits on a gate, answers x * 10."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.ones: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()
        #: Batches (not writes alone) also wait for this one.
        self.batch_gate = asyncio.Event()
        self.batch_gate.set()
        self.running = 0
        self.most_running = 0
        self.tasks: set[asyncio.Task[None]] = set()
        #: Batches containing this value fail with ``batch_error``.
        self.poison: int | None = None
        self.batch_error: BaseException = Rejected()
        #: run_one fails for this value.
        self.bad_one: int | None = None

    async def batch(self, args: list[int]) -> list[int]:
        self.batches.append(list(args))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.gate.wait()
            await self.batch_gate.wait()
        finally:
            self.running -= 1
        if self.poison in args:
            raise self.batch_error
        return [a * 10 for a in args]

    async def one(self, arg: int) -> int:
        self.ones.append(arg)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        if arg == self.bad_one:
            raise Rejected(f"one {arg}")
        return arg * 10

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def group(self, concurrency: int = 1, max_batch: int = 64) -> GroupCommit[int, int]:
        return GroupCommit(
            self.batch,
            self.one,
            self.spawn,
            split_on=Rejected,
            max_batch=max_batch,
            concurrency=concurrency,
        )


async def test_writes_arriving_during_a_batch_form_the_next_one() -> None:
    rec = Recorder()
    group = rec.group()
    rec.gate.clear()
    first = asyncio.create_task(group.submit(1, frozenset({"a"})))
    await _turns()
    rest = [asyncio.create_task(group.submit(i, frozenset({i}))) for i in range(2, 7)]
    await _turns()
    assert rec.ones == [1] and rec.batches == []  # alone, at once: no waiting to fill
    rec.gate.set()
    assert await first == 10
    assert await asyncio.gather(*rest) == [20, 30, 40, 50, 60]
    assert rec.batches == [[2, 3, 4, 5, 6]]
    assert (group.stats.writes, group.stats.batches, group.stats.largest) == (6, 2, 5)


async def test_writes_submitted_together_share_a_batch_though_a_slot_is_free() -> None:
    """Nothing waits for a batch to fill, but writes submitted in one turn of the
    loop (replies that arrived together, say) go in one batch: not the first alone
    in one slot, the second alone in the other and the rest after them."""
    rec = Recorder()
    group = rec.group(concurrency=2)
    results = await asyncio.gather(*(group.submit(i, frozenset({i})) for i in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert rec.batches == [[0, 1, 2, 3, 4]] and rec.ones == []


async def test_writes_sharing_a_key_never_run_together() -> None:
    """Many writes over few keys, at random moments: no batch holds a key twice,
    and no two batches running at once share one."""
    rng = random.Random(7)
    keys = {i: frozenset({f"u{rng.randrange(6)}", f"id{rng.randrange(20)}"}) for i in range(120)}
    rec = Recorder()
    live: list[int] = []  # the writes of the batches running now
    clashes: list[list[int]] = []
    at_once = [0, 0]  # batches running now, most ever
    plain_batch = rec.batch

    async def checked(args: list[int]) -> list[int]:
        mine = [k for a in args for k in keys[a]]
        running = {k for a in live for k in keys[a]}
        if len(set(mine)) != len(mine) or set(mine) & running:
            clashes.append(list(args))
        live.extend(args)
        at_once[0] += 1
        at_once[1] = max(at_once)
        try:
            await asyncio.sleep(rng.random() * 0.003)
            return await plain_batch(args)
        finally:
            at_once[0] -= 1
            for a in args:
                live.remove(a)

    async def checked_one(arg: int) -> int:
        return (await checked([arg]))[0]

    rec.batch, rec.one = checked, checked_one  # type: ignore[method-assign]
    group = rec.group(concurrency=3, max_batch=4)

    async def submit(i: int) -> int:
        await asyncio.sleep(rng.random() * 0.05)
        return await group.submit(i, keys[i])

    assert await asyncio.gather(*(submit(i) for i in keys)) == [i * 10 for i in keys]
    assert clashes == []
    assert group.stats.largest > 1 and at_once[1] >= 2, "nothing ran together"
    assert at_once[1] <= 3 and group.stats.writes == len(keys)


async def test_a_key_in_a_running_batch_waits_for_it() -> None:
    rec = Recorder()
    group = rec.group(concurrency=2)
    rec.gate.clear()
    first = asyncio.create_task(group.submit(1, frozenset({"u"})))
    await _turns()
    second = asyncio.create_task(group.submit(2, frozenset({"u"})))
    await asyncio.sleep(0.01)
    assert rec.ones == [1], "a free slot, but the key is busy"
    rec.gate.set()
    assert (await first, await second) == (10, 20)
    assert rec.ones == [1, 2]


async def test_a_rejected_batch_runs_each_write_alone() -> None:
    rec = Recorder()
    group = rec.group()
    rec.gate.clear()
    blocker = asyncio.create_task(group.submit(0, frozenset({0})))
    await _turns()
    rec.poison, rec.bad_one = 3, 3
    tasks = [asyncio.create_task(group.submit(i, frozenset({i}))) for i in (1, 2, 3, 4)]
    await _turns()
    rec.gate.set()
    await blocker
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[:2] == [10, 20] and results[3] == 40
    assert isinstance(results[2], Rejected) and str(results[2]) == "one 3"
    assert rec.batches == [[1, 2, 3, 4]]
    assert rec.ones == [0, 1, 2, 3, 4]
    assert group.stats.split == 1


async def test_each_write_of_a_split_batch_is_answered_when_it_is_done() -> None:
    """Not when the slowest write of the batch is: a put waiting for its data
    must not hold back the answers of the others."""
    rec = Recorder()
    slow = asyncio.Event()
    plain_one = rec.one

    async def one(arg: int) -> int:
        if arg == 2:
            await slow.wait()
        return await plain_one(arg)

    rec.one = one  # type: ignore[method-assign]
    rec.poison = 1
    group = rec.group()
    tasks = [asyncio.create_task(group.submit(i, frozenset({i}))) for i in (1, 2, 3)]
    await asyncio.wait([tasks[0], tasks[2]], timeout=5)
    assert [t.done() for t in tasks] == [True, False, True]
    assert (tasks[0].result(), tasks[2].result()) == (10, 30)
    slow.set()
    assert await tasks[1] == 20
    assert rec.batches == [[1, 2, 3]] and group.stats.split == 1


async def test_an_unknown_outcome_goes_to_every_write_of_the_batch() -> None:
    """A lost connection may have committed: running the writes again could do them
    twice, so each gets the error, as a write alone would."""
    rec = Recorder()
    group = rec.group()
    rec.gate.clear()
    blocker = asyncio.create_task(group.submit(0, frozenset({0})))
    await _turns()
    rec.poison, rec.batch_error = 1, ConnectionResetError("lost")
    tasks = [asyncio.create_task(group.submit(i, frozenset({i}))) for i in (1, 2)]
    await _turns()
    rec.gate.set()
    await blocker
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ConnectionResetError) for r in results), results
    assert rec.ones == [0]  # nothing ran a second time
    assert await group.submit(5, frozenset({5})) == 50  # and the group carries on


async def test_a_write_cancelled_before_its_batch_is_dropped() -> None:
    rec = Recorder()
    group = rec.group()
    rec.gate.clear()
    blocker = asyncio.create_task(group.submit(0, frozenset({0})))
    await _turns()
    gone = asyncio.create_task(group.submit(1, frozenset({1})))
    kept = asyncio.create_task(group.submit(2, frozenset({2})))
    await _turns()
    gone.cancel()
    rec.gate.set()
    assert await blocker == 0 and await kept == 20
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert rec.ones == [0, 2] and rec.batches == []


async def test_a_caller_cancelled_during_its_batch_does_not_stop_the_others() -> None:
    rec = Recorder()
    group = rec.group()
    rec.gate.clear()
    rec.batch_gate.clear()
    blocker = asyncio.create_task(group.submit(0, frozenset({0})))
    await _turns()
    tasks = [asyncio.create_task(group.submit(i, frozenset({i}))) for i in (1, 2, 3)]
    await _turns()
    rec.gate.set()
    await blocker
    await asyncio.sleep(0)  # the batch of 1, 2, 3 is running now
    assert rec.batches == [[1, 2, 3]]
    tasks[0].cancel()
    rec.batch_gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError) and results[1:] == [20, 30]


@pytest.mark.parametrize("started", [False, True])
async def test_a_cancelled_batch_cancels_its_waiters_and_frees_its_keys(started: bool) -> None:
    """The server shutting down cancels the batch's task: before it ran a line (its
    coroutine then never runs) or while its statement runs."""
    rec = Recorder()
    group = rec.group()
    rec.gate.clear()
    waiter = asyncio.create_task(group.submit(1, frozenset({"k"})))
    await _turns(2)  # the batch's task is made, not yet run
    if started:
        await asyncio.sleep(0)
        assert rec.ones == [1]
    else:
        assert rec.ones == [] and rec.tasks
    for task in list(rec.tasks):
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    rec.gate.set()
    assert await group.submit(2, frozenset({"k"})) == 20


async def test_concurrency_zero_holds_writes_until_raised() -> None:
    rec = Recorder()
    group = rec.group(concurrency=0)
    tasks = [asyncio.create_task(group.submit(i, frozenset({i}))) for i in range(4)]
    await asyncio.sleep(0.01)
    assert group.pending == 4 and rec.ones == [] and rec.batches == []
    group.concurrency = 1
    assert await asyncio.gather(*tasks) == [0, 10, 20, 30]
    assert rec.batches == [[0, 1, 2, 3]] and group.pending == 0


async def test_close_cancels_waiting_writes_and_starts_nothing() -> None:
    rec = Recorder()
    group = rec.group()
    rec.gate.clear()
    running = asyncio.create_task(group.submit(1, frozenset({1})))
    await _turns()
    waiting = asyncio.create_task(group.submit(2, frozenset({2})))
    await _turns()
    group.close()
    rec.gate.set()
    assert await running == 10  # a batch already running finishes
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert rec.ones == [1] and rec.batches == []
    with pytest.raises(RuntimeError):
        await group.submit(3, frozenset({3}))
