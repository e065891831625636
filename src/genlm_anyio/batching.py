"""The batching engine: requests from any number of tasks, one batch at a time.

Each model owns one :class:`Batcher` and one worker thread that runs its batches,
so event loops stay responsive while a batch computes. Requests come from
coroutines under asyncio or trio (through AnyIO) or from plain threads; nothing
about an event loop outlives the request that captured it, so one model serves
successive ``asyncio.run``/``trio.run`` calls and loops in several threads.

When the model is idle, the first request of a round leads it: it yields to its
event loop until no more requests arrive (every task that was ready to ask has
asked), then releases the batch. There is no timer. Requests that arrive while
a batch computes go into the next batch as soon as the model is free.

Identical pending or running requests share one computation. A cancelled
caller only stops waiting: a request nobody waits for any more is dropped if it
has not started, and its batch is unaffected if it has. An exception raised
while computing a batch reaches every caller of that batch, each as an exception
of its own chained to the original.

What may run is derived from what is pending, never kept in a flag: every
pending request carries a sequence number, and the pending requests numbered up
to a release mark may go. Every pending request is always covered by one of
three things: the mark, a leader gathering its round (which moves the mark when
it ends, cancelled or not), or a running batch (the worker moves the mark when
it ends). So no interleaving of callers can leave a request waiting with the
worker asleep.
"""

from __future__ import annotations

import atexit
import copy
import inspect
import threading
import time
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar, cast

import anyio
import anyio.lowlevel
import sniffio

from .checks import positive_int

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")

# A leader yields at most this many times while the queue keeps growing.
_MAX_GATHER_ROUNDS = 64
# At interpreter exit, running batches may finish for this many seconds in all.
_EXIT_WAIT = 10.0


class ClosedError(RuntimeError):
    """The model was closed; it computes nothing more."""


@dataclass
class BatchStats:
    """Counters of a :class:`Batcher`."""

    requests: int = 0
    """Requests submitted."""
    shared: int = 0
    """Requests answered by an identical pending or running request."""
    batches: int = 0
    """Batches computed."""
    batched_requests: int = 0
    """Distinct requests computed, over all batches."""
    largest_batch: int = 0


class _Request(Generic[K, R]):
    __slots__ = ("done", "error", "key", "result", "seq", "waiters", "wakers")

    def __init__(self, key: K, seq: int):
        self.key = key
        self.seq = seq
        self.result: R | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.waiters = 0
        self.wakers: list[Callable[[], None]] = []


def _callers_error(error: BaseException) -> BaseException:
    """A fresh exception for one caller of a failed batch, chained to ``error``.

    Raising one object in many callers would grow its traceback by each caller's
    frames; and a BaseException that is not an Exception (a CancelledError, a
    KeyboardInterrupt) raised in the worker must not pose as the caller's own
    cancellation or interrupt, so it becomes a RuntimeError.
    """
    if not isinstance(error, Exception):
        fresh: BaseException = RuntimeError(
            f"the batch's computation was cancelled or interrupted ({type(error).__name__})"
        )
    else:
        try:
            fresh = copy.copy(error)
        except Exception:  # an exception class whose args do not rebuild it
            fresh = error
        if fresh is error or type(fresh) is not type(error):
            fresh = RuntimeError(f"the batch's computation failed: {type(error).__name__}: {error}")
    fresh.__cause__ = error
    return fresh


def _wake_all(wakers: list[Callable[[], None]]) -> None:
    for wake in wakers:
        try:
            wake()
        except RuntimeError:  # that caller's event loop has ended
            pass


def _loop_waker(callback: Callable[[], None]) -> Callable[[], None]:
    """A thread-safe, non-blocking way to run ``callback`` in the current event loop."""
    library = sniffio.current_async_library()
    if library == "asyncio":
        import asyncio

        loop = asyncio.get_running_loop()

        def wake_asyncio() -> None:
            loop.call_soon_threadsafe(callback)

        return wake_asyncio
    if library == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()

        def wake_trio() -> None:
            token.run_sync_soon(callback)

        return wake_trio
    raise RuntimeError(f"unsupported async library {library!r}")


_live: weakref.WeakSet[Batcher] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Stop every worker before the interpreter finalizes: a daemon thread still
    inside torch while the process destroys torch's static objects aborts it
    (``terminate called without an active exception``, e.g. after Ctrl-C)."""
    batchers = list(_live)
    for batcher in batchers:
        batcher.close(timeout=0)  # nothing new starts anywhere
    deadline = time.monotonic() + _EXIT_WAIT
    for batcher in batchers:
        batcher.close(timeout=max(0.0, deadline - time.monotonic()))


class Batcher(Generic[K, R]):
    """Gathers requests into batches for ``compute``, run in a worker thread.

    Args:
        compute: maps a list of distinct keys to their results, in order. A bound
            method is held weakly: the worker does not keep its object alive, and
            the batcher closes when that object is collected. So is ``size``.
        max_batch_size: at most this many requests per batch.
        max_batch_tokens: at most this much ``size(key)`` per batch (one request
            larger than that still runs, alone).
        size: the size of a request, for ``max_batch_tokens``; it is measured
            when a batch is taken (in the worker, with the batcher's lock held),
            so it may depend on what earlier batches computed.
        name: the worker thread's name.
    """

    def __init__(
        self,
        compute: Callable[[list[K]], Sequence[R]],
        *,
        max_batch_size: int = 128,
        max_batch_tokens: int | None = None,
        size: Callable[[K], int] = lambda key: 1,
        name: str = "genlm-anyio-batcher",
    ):
        if max_batch_tokens is not None:
            positive_int("max_batch_tokens", max_batch_tokens)
        if inspect.ismethod(compute):
            self._compute: Callable[[], Callable[[list[K]], Sequence[R]] | None] = weakref.WeakMethod(compute)
            # Non-blocking: a finalizer may run in any thread, even one holding the lock.
            weakref.finalize(compute.__self__, self._stop).atexit = False
        else:
            self._compute = lambda: compute
        self.max_batch_size = max_batch_size
        self._max_batch_tokens = max_batch_tokens
        # Held weakly as compute is (a bound method of the same owner, typically).
        self._size: Callable[[], Callable[[K], int] | None] = (
            weakref.WeakMethod(size) if inspect.ismethod(size) else lambda: size
        )
        self._name = name
        self._cond = threading.Condition()
        self._pending: dict[K, _Request[K, R]] = {}
        self._running: dict[K, _Request[K, R]] = {}
        self._seq = 0  # numbers the pending requests, in order
        self._released = 0  # pending requests numbered up to this may go
        self._leading = False  # a coroutine is gathering a round
        self._busy = False  # the worker is computing or handing out results
        self._closed = False
        self._thread: threading.Thread | None = None
        self.stats = BatchStats()
        _live.add(self)

    @property
    def max_batch_size(self) -> int:
        """The most requests one batch takes (settable; the next batch uses the new value)."""
        return self._max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self._max_batch_size = positive_int("max_batch_size", value)

    # -- submitting -----------------------------------------------------------------
    def _enqueue(self, key: K) -> _Request[K, R]:
        """Register interest in ``key`` (the condition's lock is held)."""
        if self._closed:
            raise ClosedError("this model is closed")
        self.stats.requests += 1
        req = self._pending.get(key) or self._running.get(key)
        if req is None:
            self._seq += 1
            req = _Request(key, self._seq)
            self._pending[key] = req
        else:
            self.stats.shared += 1
        req.waiters += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        return req

    def _release_all(self) -> None:
        """Let every request pending now go (the condition's lock is held)."""
        self._released = self._seq
        self._cond.notify()

    def _ready(self) -> bool:
        """Whether a released request is pending (the condition's lock is held).

        The pending dict is in sequence order, so the oldest one tells."""
        oldest = next(iter(self._pending.values()), None)
        return oldest is not None and oldest.seq <= self._released

    async def _lead(self) -> None:
        """Yield until the round stops growing (or a batch took it), then release it."""
        try:
            seen = -1
            for _ in range(_MAX_GATHER_ROUNDS):
                with self._cond:
                    if self._busy or len(self._pending) == seen:
                        break
                    seen = len(self._pending)
                await anyio.lowlevel.cancel_shielded_checkpoint()
        finally:
            with self._cond:
                self._leading = False
                self._release_all()

    async def submit(self, key: K) -> R:
        """The result for ``key``, computed in a batch with the other pending requests."""
        with self._cond:
            req = self._enqueue(key)
            # Idle and nobody gathering: this request gathers a round. Otherwise the
            # running batch or the gathering leader releases it when it ends.
            lead = not (self._busy or self._leading)
            if lead:
                self._leading = True
        if lead:
            await self._lead()
        return await self._wait(req)

    async def submit_many(self, keys: Sequence[K]) -> list[R]:
        """Results for all ``keys``, submitted together and released at once."""
        with self._cond:
            reqs = [self._enqueue(key) for key in keys]
            self._release_all()
        results: list[R] = []
        waiting = list(reqs)
        try:
            for req in reqs:
                results.append(await self._wait(req, abandon=False))
                waiting.remove(req)
        finally:
            for req in waiting:
                self._abandon(req)
        return results

    def submit_sync(self, keys: Sequence[K]) -> list[R]:
        """Results for ``keys``, from a plain thread (blocks it)."""
        with self._cond:
            reqs = [self._enqueue(key) for key in keys]
            self._release_all()
        try:
            for req in reqs:
                req.done.wait()
        finally:
            for req in reqs:
                self._abandon(req)
        return [self._outcome(req) for req in reqs]

    @staticmethod
    def _outcome(req: _Request[K, R]) -> R:
        if req.error is not None:
            raise _callers_error(req.error)
        # Without an error the batch stored this request's result (R may itself admit None).
        return cast(R, req.result)

    async def _wait(self, req: _Request[K, R], abandon: bool = True) -> R:
        try:
            if not req.done.is_set():
                event = anyio.Event()
                waker = _loop_waker(event.set)
                with self._cond:
                    ready = req.done.is_set()
                    if not ready:
                        req.wakers.append(waker)
                if not ready:
                    await event.wait()
            else:
                await anyio.lowlevel.checkpoint()
        finally:
            if abandon:
                self._abandon(req)
        return self._outcome(req)

    def _abandon(self, req: _Request[K, R]) -> None:
        """One waiter fewer; an unstarted request with none left is dropped."""
        with self._cond:
            req.waiters -= 1
            if req.waiters == 0 and self._pending.get(req.key) is req:
                del self._pending[req.key]

    # -- the worker -----------------------------------------------------------------
    def _take(self) -> list[_Request[K, R]]:
        batch: list[_Request[K, R]] = []
        tokens, limit = 0, self._max_batch_tokens
        measure = self._size() if limit is not None else None
        for req in self._pending.values():
            if len(batch) == self._max_batch_size:
                break
            if limit is not None and measure is not None:
                size = measure(req.key)
                if batch and tokens + size > limit:
                    break
                tokens += size
            batch.append(req)
        for req in batch:
            del self._pending[req.key]
            self._running[req.key] = req
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._ready():
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._take()
                self._busy = True
            results, error = self._run(batch)
            with self._cond:
                self.stats.batches += 1
                self.stats.batched_requests += len(batch)
                self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
                wakers = []
                for req, result in zip(batch, results):
                    del self._running[req.key]
                    if req.done.is_set():  # failed already by a close that gave up waiting
                        continue
                    req.result, req.error = result, error
                    req.done.set()
                    wakers.extend(req.wakers)
                # Callers resume only after every result is out, and the next
                # round's leader waits for that before it measures the queue.
                _wake_all(wakers)
                self._busy = False
                # What arrived meanwhile goes next, with no new round to gather.
                self._release_all()

    def _run(self, batch: list[_Request[K, R]]) -> tuple[Sequence[R | None], BaseException | None]:
        """``compute`` of the batch's keys: (results, None) or (placeholders, the error)."""
        try:
            compute = self._compute()
            if compute is None:
                raise ClosedError("the model was garbage collected")
            results = compute([req.key for req in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"compute returned {len(results)} results for {len(batch)} requests")
            return results, None
        except BaseException as exc:  # delivered to every caller of the batch
            return [None] * len(batch), exc

    def _stop(self) -> None:
        """Close without waiting: the owner of ``compute`` was collected."""
        self.close(timeout=0)

    def close(self, timeout: float | None = None) -> bool:
        """Stop the worker; pending requests fail with :class:`ClosedError`.

        Waits for a running batch to finish, at most ``timeout`` seconds (``None``:
        as long as it takes). If it is still running then, its callers fail with
        :class:`ClosedError` and the worker stops once it ends.

        Returns:
            Whether the worker has stopped (always, when ``timeout`` is ``None``).
        """
        with self._cond:
            stranded = list(self._pending.values())
            self._pending.clear()
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        self._fail(stranded, "the model was closed before this request ran")
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if not thread.is_alive():
            return True
        with self._cond:
            hung = list(self._running.values())
        self._fail(hung, f"the model was closed while this request's batch was still computing (after {timeout} s)")
        return False

    def _fail(self, reqs: list[_Request[K, R]], message: str) -> None:
        with self._cond:
            wakers = []
            for req in reqs:
                if not req.done.is_set():
                    req.error = ClosedError(message)
                    req.done.set()
                    wakers.extend(req.wakers)
            _wake_all(wakers)

    @property
    def closed(self) -> bool:
        return self._closed
