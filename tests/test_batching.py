"""The batching engine on its own: batches, sharing, errors, cancellation, loops."""
from __future__ import annotations

import asyncio
import threading

import anyio
import pytest
import trio

from genlm_anyio.batching import Batcher, ClosedError


class Recorder:
    """A compute function that records its batches; it can be held at a gate."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_on: int | None = None

    def __call__(self, keys: list[int]) -> list[int]:
        self.batches.append(list(keys))
        self.started.set()
        self.gate.wait(10)
        if self.fail_on in keys:
            raise RuntimeError(f"bad key {self.fail_on}")
        return [k * 10 for k in keys]


@pytest.fixture(params=["asyncio", "trio"])
def backend(request):
    return request.param


def run(backend, fn, *args):
    return anyio.run(fn, *args, backend=backend)


def test_concurrent_requests_form_one_batch(backend):
    rec = Recorder()
    batcher = Batcher(rec)
    results = {}

    async def ask(k):
        results[k] = await batcher.submit(k)

    async def main():
        async with anyio.create_task_group() as tg:
            for k in range(20):
                tg.start_soon(ask, k)

    run(backend, main)
    assert results == {k: k * 10 for k in range(20)}
    assert len(rec.batches) == 1 and sorted(rec.batches[0]) == list(range(20))
    assert batcher.stats.batches == 1 and batcher.stats.largest_batch == 20
    batcher.close()


def test_identical_requests_are_computed_once(backend):
    rec = Recorder()
    batcher = Batcher(rec)

    async def main():
        out = []
        async with anyio.create_task_group() as tg:
            for k in [1, 2, 1, 1, 2]:
                tg.start_soon(lambda k=k: _append(out, batcher.submit(k)))
        return sorted(out)

    assert run(backend, main) == [10, 10, 10, 20, 20]
    assert sorted(sum(rec.batches, [])) == [1, 2]
    assert batcher.stats.shared == 3
    batcher.close()


async def _append(out, coro):
    out.append(await coro)


def test_batch_limits_split_batches(backend):
    rec = Recorder()
    batcher = Batcher(rec, max_batch_size=4, max_batch_tokens=7, size=lambda k: k)

    async def main():
        async with anyio.create_task_group() as tg:
            for k in [1, 2, 3, 4, 5, 6, 9]:
                tg.start_soon(batcher.submit, k)

    run(backend, main)
    assert sorted(sum(rec.batches, [])) == [1, 2, 3, 4, 5, 6, 9]
    assert len(rec.batches) > 1
    for batch in rec.batches:
        assert len(batch) <= 4
        assert sum(batch) <= 7 or len(batch) == 1  # one oversized request runs alone
    batcher.close()


def test_an_error_reaches_every_caller_of_its_batch_and_the_engine_recovers(backend):
    rec = Recorder()
    rec.fail_on = 3
    batcher = Batcher(rec)
    errors, values = [], []

    async def ask(k):
        try:
            values.append(await batcher.submit(k))
        except RuntimeError as exc:
            errors.append(str(exc))

    async def main():
        async with anyio.create_task_group() as tg:
            for k in range(5):
                tg.start_soon(ask, k)
        rec.fail_on = None
        return await batcher.submit(3)

    assert run(backend, main) == 30
    assert errors == ["bad key 3"] * 5 and values == []
    batcher.close()


def test_a_cancelled_caller_leaves_the_others_and_the_engine_working(backend):
    rec = Recorder()
    batcher = Batcher(rec)
    got = {}

    async def ask(k):
        got[k] = await batcher.submit(k)

    async def main():
        rec.gate.clear()
        async with anyio.create_task_group() as outer:
            outer.start_soon(ask, 1)
            async with anyio.create_task_group() as doomed:
                doomed.start_soon(ask, 2)
                await anyio.to_thread.run_sync(rec.started.wait)
                # Batch [1, 2] is running; 3 waits for the next one.
                doomed.start_soon(ask, 3)
                await anyio.sleep(0.01)
                doomed.cancel_scope.cancel()
            rec.gate.set()
        return await batcher.submit(4)

    assert run(backend, main) == 40
    assert got == {1: 10}
    assert sorted(rec.batches[0]) == [1, 2]  # trio starts tasks in random order
    assert 3 not in sum(rec.batches, []), "a request nobody waits for must not run"
    batcher.close()


def test_a_released_round_whose_callers_all_left_does_not_stall_the_next(backend):
    rec = Recorder()
    batcher = Batcher(rec)

    async def main():
        rec.gate.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.submit, 1)
            await anyio.to_thread.run_sync(rec.started.wait)
            # While batch [1] runs, 2 is submitted (released at once) and abandoned.
            with anyio.move_on_after(0.01):
                await batcher.submit_many([2])
            rec.gate.set()
        await anyio.sleep(0.05)  # the worker finishes [1] and finds nothing to run
        with anyio.fail_after(5):
            return await batcher.submit(3)

    assert run(backend, main) == 30
    assert rec.batches == [[1], [3]]
    batcher.close()


def test_one_batcher_serves_successive_runs_and_loops_in_threads():
    rec = Recorder()
    batcher = Batcher(rec)
    assert asyncio.run(batcher.submit(1)) == 10
    assert trio.run(batcher.submit, 2) == 20
    assert asyncio.run(batcher.submit(3)) == 30

    results = {}

    def in_thread(lib, k):
        async def many():
            async with anyio.create_task_group() as tg:
                for j in range(5):
                    tg.start_soon(lambda j=j: _store(results, (k, j), batcher.submit(k * 100 + j)))

        anyio.run(many, backend=lib)

    threads = [threading.Thread(target=in_thread, args=(lib, k)) for k, lib in enumerate(["asyncio", "trio", "asyncio"], 1)]
    for t in threads:
        t.start()
    sync_results = batcher.submit_sync([7, 8, 7])
    for t in threads:
        t.join(30)
    assert sync_results == [70, 80, 70]
    assert results == {(k, j): (k * 100 + j) * 10 for k in (1, 2, 3) for j in range(5)}
    batcher.close()


async def _store(results, key, coro):
    results[key] = await coro


def test_close_fails_pending_requests_and_refuses_new_ones(backend):
    rec = Recorder()
    batcher = Batcher(rec)
    outcome = []

    async def main():
        rec.gate.clear()
        async with anyio.create_task_group() as tg:
            async def first():
                outcome.append(await batcher.submit(1))

            async def second():
                try:
                    await batcher.submit(2)
                except ClosedError:
                    outcome.append("closed")

            tg.start_soon(first)
            await anyio.to_thread.run_sync(rec.started.wait)
            tg.start_soon(second)
            await anyio.sleep(0.01)
            threading.Timer(0.05, rec.gate.set).start()
            await anyio.to_thread.run_sync(batcher.close)

    run(backend, main)
    assert sorted(map(str, outcome)) == ["10", "closed"]
    with pytest.raises(ClosedError):
        run(backend, batcher.submit, 5)
    with pytest.raises(ClosedError):
        batcher.submit_sync([5])


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(Recorder(), max_batch_size=0)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Batcher(Recorder(), max_batch_tokens=0)
