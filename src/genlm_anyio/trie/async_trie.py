"""Autobatched trie reductions for concurrent tasks."""
from __future__ import annotations

from typing import Any, Sequence

import anyio
import numpy as np

from ..arrays import float_array
from ..batching import Batcher
from .parallel import ParallelTokenCharacterTrie
from .rust import TokenCharacterTrie


class _Request:
    """One reduction of one weight vector; hashed by identity, so never shared."""

    __slots__ = ("op", "ws")

    def __init__(self, op: str, ws: np.ndarray):
        self.op, self.ws = op, ws


class AsyncTokenCharacterTrie:
    """``await weight_sum(ws)`` / ``await weight_max(ws)`` from many tasks, computed
    as batched reductions of ``trie`` in a worker thread (asyncio or trio)."""

    def __init__(self, trie: TokenCharacterTrie, max_batch_size: int = 256):
        self.trie = trie
        self._batcher: Batcher[_Request, np.ndarray] = Batcher(
            self._compute, max_batch_size=max_batch_size, name="genlm-anyio-trie"
        )

    @classmethod
    def from_vocab(cls, vocab: Sequence[bytes], backend: str | None = None, **kwargs: Any) -> "AsyncTokenCharacterTrie":
        """Build the trie of ``vocab``: ``backend`` ``"rust"`` (the default; also
        ``"sequential"``) or ``"parallel"`` (torch, ``device=`` in ``kwargs``)."""
        if backend in (None, "rust", "sequential"):
            return cls(TokenCharacterTrie(vocab, **kwargs))
        if backend == "parallel":
            return cls(ParallelTokenCharacterTrie(vocab, **kwargs))
        raise ValueError(f"backend must be 'rust', 'sequential' or 'parallel', not {backend!r}")

    def _compute(self, batch: list[_Request]) -> list[np.ndarray]:
        results: dict[int, np.ndarray] = {}
        for op, reduce in (("sum", self.trie.batch_weight_sum), ("max", self.trie.batch_weight_max)):
            members = [i for i, req in enumerate(batch) if req.op == op]
            if members:
                rows = reduce(np.stack([batch[i].ws for i in members]))
                results.update(zip(members, rows))
        return [results[i] for i in range(len(batch))]

    async def _submit(self, op: str, ws: Any) -> np.ndarray:
        arr = float_array(ws, "ws", 1, self.trie.vocab_size)
        return await self._batcher.submit(_Request(op, arr))

    async def weight_sum(self, ws: Any) -> np.ndarray:
        """:meth:`TokenCharacterTrie.weight_sum`, batched with concurrent calls."""
        return await self._submit("sum", ws)

    async def weight_max(self, ws: Any) -> np.ndarray:
        """:meth:`TokenCharacterTrie.weight_max`, batched with concurrent calls."""
        return await self._submit("max", ws)

    @property
    def batch_stats(self):
        return self._batcher.stats

    def close(self) -> None:
        """Stop the worker; the object is unusable afterwards."""
        self._batcher.close()

    shutdown = close  # genlm-backend's name

    async def cleanup(self) -> None:
        """:meth:`close`, without blocking the event loop."""
        await anyio.to_thread.run_sync(self.close)

    async def __aenter__(self) -> "AsyncTokenCharacterTrie":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cleanup()
