"""The batching engine on its own: batches, sharing, errors, cancellation, loops."""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
import traceback
import weakref

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
    assert sorted(k for batch in rec.batches for k in batch) == [1, 2]
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
    assert sorted(k for batch in rec.batches for k in batch) == [1, 2, 3, 4, 5, 6, 9]
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
    assert all(3 not in batch for batch in rec.batches), "a request nobody waits for must not run"
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

    threads = [
        threading.Thread(target=in_thread, args=(lib, k)) for k, lib in enumerate(["asyncio", "trio", "asyncio"], 1)
    ]
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
    # One rule (genlm_anyio.checks): a wrong type is a TypeError, a wrong value a ValueError.
    with pytest.raises(TypeError, match="max_batch_tokens"):
        Batcher(Recorder(), max_batch_tokens="8")
    with pytest.raises(TypeError, match="max_batch_size"):
        Batcher(Recorder(), max_batch_size=2.0)
    batcher = Batcher(Recorder())
    with pytest.raises(TypeError, match="max_batch_size"):
        batcher.max_batch_size = True
    batcher.close()


def test_a_request_is_sized_when_its_batch_is_taken(backend):
    """The size may depend on what earlier batches computed (an engine sizes a
    request by its uncached tokens): it is read when the batch is taken."""
    rec = Recorder()
    sizes = dict.fromkeys(range(1, 5), 5)
    batcher = Batcher(rec, max_batch_tokens=8, size=lambda k: sizes[k])
    rec.gate.clear()

    async def main():
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.submit, 1)
            await anyio.to_thread.run_sync(rec.started.wait, 10)
            for k in (2, 3, 4):  # queued behind the running batch at size 5 each
                tg.start_soon(batcher.submit, k)
            await anyio.sleep(0.05)
            sizes.update({2: 1, 3: 1, 4: 1})  # what the running batch computes
            rec.gate.set()

    run(backend, main)
    assert [sorted(b) for b in rec.batches] == [[1], [2, 3, 4]]  # sized at 5 each, they would go one by one
    batcher.close()


# -- regressions (issue 8) -----------------------------------------------------------
def test_a_batch_of_only_running_requests_does_not_strand_the_next_request(backend):
    """Defect 0: a batch whose keys all share running requests released nothing; the
    release outlived it and the next lone request was never led."""
    rec = Recorder()
    batcher = Batcher(rec)

    async def main():
        rec.gate.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.submit, 1)
            await anyio.to_thread.run_sync(rec.started.wait)
            tg.start_soon(batcher.submit_many, [1])  # shares the running request
            await anyio.sleep(0.01)
            rec.gate.set()
        with anyio.fail_after(5):
            return await batcher.submit(2)

    assert run(backend, main) == 20
    assert rec.batches == [[1], [2]]
    batcher.close()


def test_a_sync_call_of_only_running_requests_does_not_strand_the_next_request(backend):
    rec = Recorder()
    batcher = Batcher(rec)

    async def main():
        rec.gate.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.submit, 1)
            await anyio.to_thread.run_sync(rec.started.wait)
            sync = threading.Thread(target=batcher.submit_sync, args=([1],))
            sync.start()
            await anyio.sleep(0.01)
            rec.gate.set()
            await anyio.to_thread.run_sync(sync.join)
        with anyio.fail_after(5):
            return await batcher.submit(2)

    assert run(backend, main) == 20
    batcher.close()


@pytest.mark.parametrize("callers, rounds", [(2, 200), (16, 40)])
def test_mixed_calls_over_shared_keys_never_strand_a_request(backend, callers, rounds):
    """Single, batch, sync and cancelled calls over a few shared keys, interleaved at
    random with a compute of random length: every call that was not cancelled gets
    its own keys' results, within a deadline."""
    rng = random.Random(8)
    batcher = Batcher(lambda keys: [time.sleep(rng.random() * 0.002) or k * 10 for k in keys], max_batch_size=3)
    wrong = []
    done = {"calls": 0, "cancelled": 0}

    def check(keys, results):
        if list(results) != [k * 10 for k in keys]:
            wrong.append((keys, results))
        done["calls"] += 1

    async def caller(seed):
        r = random.Random(seed)
        for _ in range(rounds):
            keys = [r.randrange(4) for _ in range(r.randrange(1, 4))]
            kind = r.choice(["single", "batch", "sync", "cancelled"])
            if kind == "single":
                check(keys[:1], [await batcher.submit(keys[0])])
            elif kind == "batch":
                check(keys, await batcher.submit_many(keys))
            elif kind == "sync":
                check(keys, await anyio.to_thread.run_sync(batcher.submit_sync, keys))
            else:
                with anyio.move_on_after(r.random() * 0.003):
                    await (batcher.submit(keys[0]) if r.random() < 0.5 else batcher.submit_many(keys))
                done["cancelled"] += 1
            if r.random() < 0.3:
                await anyio.sleep(r.random() * 0.002)

    async def main():
        # Few callers leave quiet moments, where a stale release would strand one.
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for seed in range(callers):
                    tg.start_soon(caller, seed)

    callers, rounds = 3, 200
    run(backend, main)
    assert wrong == []
    assert done["calls"] + done["cancelled"] == callers * rounds and done["calls"] > callers * rounds // 2
    batcher.close()


@pytest.mark.parametrize("raised", ["asyncio.CancelledError", "KeyboardInterrupt"])
def test_a_base_exception_from_compute_fails_its_callers_as_a_runtime_error(raised):
    """Defect 8: a CancelledError out of compute posed as the caller's own
    cancellation under asyncio, and the caller got neither result nor error."""
    exc_type = asyncio.CancelledError if raised == "asyncio.CancelledError" else KeyboardInterrupt

    def compute(keys):
        raise exc_type()

    batcher = Batcher(compute)

    async def main():
        try:
            await batcher.submit(1)
        except RuntimeError as exc:
            return exc
        return "returned normally"

    for outcome in (asyncio.run(main()), trio.run(main)):
        assert isinstance(outcome, RuntimeError), outcome
        assert "the batch's computation" in str(outcome) and isinstance(outcome.__cause__, exc_type)
    with pytest.raises(RuntimeError) as info:
        batcher.submit_sync([2])
    assert isinstance(info.value.__cause__, exc_type)
    batcher.close()


def test_each_caller_of_a_failed_batch_gets_its_own_short_error(backend):
    """Defect 10: one exception object was raised in all 128 callers; its traceback
    grew by every caller's frames."""
    rec = Recorder()
    rec.fail_on = 0
    batcher = Batcher(rec)
    errors = []

    async def ask(k):
        try:
            await batcher.submit(k % 100)  # 28 callers share a request with another
        except RuntimeError as exc:
            errors.append(exc)

    async def main():
        async with anyio.create_task_group() as tg:
            for k in range(128):
                tg.start_soon(ask, k)

    run(backend, main)
    assert len(rec.batches) == 1 and len(errors) == 128
    assert len({id(e) for e in errors}) == 128
    assert all(type(e) is RuntimeError and str(e) == "bad key 0" for e in errors)
    cause = errors[0].__cause__
    assert isinstance(cause, RuntimeError) and all(e.__cause__ is cause for e in errors)
    assert max(len(traceback.extract_tb(e.__traceback__)) for e in errors) < 10
    assert len(traceback.extract_tb(cause.__traceback__)) < 10
    batcher.close()


def test_an_error_that_cannot_be_copied_still_reaches_each_caller_as_its_own():
    class Picky(Exception):
        def __init__(self, code, *, detail):
            super().__init__(f"{code}: {detail}")

    def compute(keys):
        raise Picky(7, detail="no")

    batcher = Batcher(compute)
    errors = []
    for _ in range(2):
        with pytest.raises(RuntimeError, match="Picky: 7: no") as info:
            batcher.submit_sync([1])
        errors.append(info.value)
    assert errors[0] is not errors[1] and all(isinstance(e.__cause__, Picky) for e in errors)
    batcher.close()


class Owner:
    def __init__(self):
        self.batcher = Batcher(self.compute, name="owned")

    def compute(self, keys):
        return [k + 1 for k in keys]


def test_an_owner_dropped_without_close_is_collected_and_its_worker_ends():
    """Defect 11: the parked worker held the model through its bound compute method."""
    owner = Owner()
    assert owner.batcher.submit_sync([1, 2]) == [2, 3]
    thread = owner.batcher._thread
    ref = weakref.ref(owner)
    del owner
    gc.collect()
    assert ref() is None
    thread.join(5)
    assert not thread.is_alive()


class SizingOwner(Owner):
    def __init__(self):
        self.batcher = Batcher(self.compute, max_batch_tokens=8, size=self.size, name="owned")

    def size(self, key):
        return key


def test_an_owner_whose_method_sizes_requests_is_collected_too():
    owner = SizingOwner()
    assert owner.batcher.submit_sync([1, 2]) == [2, 3]
    thread = owner.batcher._thread
    ref = weakref.ref(owner)
    del owner
    gc.collect()
    assert ref() is None
    thread.join(5)
    assert not thread.is_alive()


def test_close_with_a_timeout_returns_while_a_batch_hangs_and_fails_its_callers(backend):
    rec = Recorder()
    batcher = Batcher(rec)
    outcome = []

    async def ask():
        try:
            outcome.append(await batcher.submit(1))
        except ClosedError as exc:
            outcome.append(exc)

    async def main():
        rec.gate.clear()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            await anyio.to_thread.run_sync(rec.started.wait)
            stopped = await anyio.to_thread.run_sync(batcher.close, 0.1)
        return stopped

    assert run(backend, main) is False
    assert len(outcome) == 1 and isinstance(outcome[0], ClosedError) and "still computing" in str(outcome[0])
    rec.gate.set()  # the hung batch ends later: its result goes nowhere, the worker stops
    batcher._thread.join(5)
    assert not batcher._thread.is_alive()
    assert batcher.close(0.1) is True
