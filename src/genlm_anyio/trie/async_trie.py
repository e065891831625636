"""Autobatched trie reductions for concurrent tasks."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any

import numpy as np

from ..arrays import float_array
from ..batching import Batcher, BatchStats, ClosedError
from ..checks import positive_int
from ..lifetime import Closeable
from .token_trie import TokenCharacterTrie

_OPS = ("sum", "max")


class _Request:
    """One reduction of one weight vector; hashed by identity, so never shared."""

    __slots__ = ("op", "ws")

    def __init__(self, op: str, ws: np.ndarray):
        self.op, self.ws = op, ws


class AsyncTokenCharacterTrie(Closeable):
    """``await weight_sum(ws)`` / ``await weight_max(ws)`` from many tasks, computed
    as batched reductions of ``trie`` in a worker thread (asyncio or trio).

    A request whose weights the trie refuses (NaN, say) fails only in the task
    that sent it; the others batched with it get their results. The worker starts
    on the first request (or :meth:`start`).

    Its lifetime is the models' (:class:`~genlm_anyio.lifetime.Closeable`):
    ``close()`` / ``await aclose()`` or a ``with`` / ``async with`` block end it.
    """

    def __init__(self, trie: TokenCharacterTrie, max_batch_size: int = 256):
        self.trie = trie
        self._max_batch_size = positive_int("max_batch_size", max_batch_size)
        self._batcher: Batcher[_Request, np.ndarray | Exception] | None = None
        self._stats: BatchStats | None = None
        self._closed = False

    @classmethod
    def from_vocab(cls, vocab: Sequence[Any], backend: str = "parallel", **kwargs: Any) -> AsyncTokenCharacterTrie:
        """Build the trie of ``vocab``. ``backend`` names the engine that computes
        the reductions, as genlm-backend does: ``"parallel"`` (torch, on
        ``device=`` from ``kwargs``; the default) or ``"sequential"`` (the Rust core)."""
        if backend == "sequential":
            return cls(TokenCharacterTrie(vocab, **kwargs))
        if backend == "parallel":
            from .parallel import ParallelTokenCharacterTrie  # imports torch, so only when asked for

            return cls(ParallelTokenCharacterTrie(vocab, **kwargs))
        raise ValueError(f"backend must be 'sequential' or 'parallel', not {backend!r}")

    def start(self) -> None:
        """Start the worker if it is not running (requests start it too)."""
        if self._closed:
            raise ClosedError("this trie is closed")
        if self._batcher is None:
            self._batcher = Batcher(self._compute, max_batch_size=self._max_batch_size, name="genlm-anyio-trie")
            self._stats = self._batcher.stats

    def _compute(self, batch: list[_Request]) -> list[np.ndarray | Exception]:
        """Results in order; a request the trie refuses gets its exception as its result."""
        results: dict[int, np.ndarray | Exception] = {}
        groups: dict[tuple[str, np.dtype, tuple[int, ...]], list[int]] = {}
        for i, req in enumerate(batch):
            # Only weights of one dtype and shape are stacked, so that a request
            # the trie would refuse alone is refused in a batch too.
            groups.setdefault((req.op, req.ws.dtype, req.ws.shape), []).append(i)
        for (op, _, _), members in groups.items():
            batch_op = self.trie.batch_weight_sum if op == "sum" else self.trie.batch_weight_max
            try:
                results.update(zip(members, batch_op(np.stack([batch[i].ws for i in members]))))
            except (ValueError, TypeError):
                # Someone's weights were refused: each request on its own, so that
                # the error (about that request alone) reaches only its sender.
                single = self.trie.weight_sum if op == "sum" else self.trie.weight_max
                for i in members:
                    try:
                        results[i] = single(batch[i].ws)
                    except (ValueError, TypeError) as exc:
                        results[i] = exc
        return [results[i] for i in range(len(batch))]

    async def _queue_request(self, ws: Any, op: str) -> Awaitable[np.ndarray]:
        """Check one request and return an awaitable of its result (the two steps
        genlm-backend's ``_queue_request`` and its future take)."""
        if op not in _OPS:
            raise ValueError(f"op must be one of {_OPS}, not {op!r}")
        arr = float_array(ws)
        self.start()
        assert self._batcher is not None
        return self._result(self._batcher.submit(_Request(op, arr)))

    @staticmethod
    async def _result(pending: Awaitable[np.ndarray | Exception]) -> np.ndarray:
        result = await pending
        if isinstance(result, Exception):
            raise result
        return result

    async def weight_sum(self, ws: Any) -> np.ndarray:
        """:meth:`TokenCharacterTrie.weight_sum`, batched with concurrent calls."""
        return await (await self._queue_request(ws, "sum"))

    async def weight_max(self, ws: Any) -> np.ndarray:
        """:meth:`TokenCharacterTrie.weight_max`, batched with concurrent calls."""
        return await (await self._queue_request(ws, "max"))

    @property
    def batch_stats(self) -> BatchStats | None:
        """The latest worker's batching counters (None before the first request)."""
        return self._stats

    def _stop_worker(self, timeout: float | None) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close(timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the worker for good: pending and later requests raise ClosedError."""
        self._closed = True
        self._stop_worker(timeout)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def __del__(self) -> None:
        batcher = getattr(self, "_batcher", None)
        if batcher is not None:
            batcher.close(timeout=0)
