"""The padded batch of one forward pass, in numpy, for every in-process engine.

Each row of a pass is a cached past and the new tokens after it. Rows are
right-padded to the longest row: the new tokens into a ``(rows, width)`` grid,
and the pasts, gathered by :meth:`~genlm_anyio.kv_cache.PrefixKVCache.gather`,
to the longest past. The engines turn these arrays into their own tensors
(torch, mlx); what they compute from them is the same: each new token's
position, which past keys each row has, each row's last new token (its logits
are the answer) and which of the ``rows * width`` computed keys and values are
real tokens (the prefix cache keeps those, padding left out).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def present(lengths: Sequence[int] | np.ndarray, width: int) -> np.ndarray:
    """Which of ``width`` right-padded positions each row has: bool ``(rows, width)``,
    row ``b`` its first ``lengths[b]``."""
    return np.arange(width)[None, :] < np.asarray(lengths, dtype=np.int64)[:, None]


@dataclass(frozen=True)
class PaddedBatch:
    """The new tokens of a forward pass's rows, right-padded to ``width``."""

    tokens: np.ndarray
    """int64 ``(rows, width)``: row ``b``'s new tokens, then zeros."""
    positions: np.ndarray
    """int64 ``(rows, width)``: each new token's position in its sequence (after
    its row's past), zero at padding."""
    past_lengths: np.ndarray
    """int64 ``(rows,)``: the cached tokens before each row's new ones."""
    last: np.ndarray
    """int64 ``(rows,)``: the index, in its row, of each row's last new token."""
    kept: np.ndarray
    """int64: the indices, in the ``rows * width`` new positions taken row by row,
    of the real new tokens (padding left out), in order: the rows of the keys and
    values the prefix cache stores."""

    @classmethod
    def of(cls, news: Sequence[Sequence[int]], past_lengths: Sequence[int]) -> PaddedBatch:
        """Row ``b``: the new tokens ``news[b]`` after a past of ``past_lengths[b]`` tokens."""
        lengths = np.array([len(n) for n in news], dtype=np.int64)
        width = int(lengths.max())
        real = present(lengths, width)
        tokens = np.zeros((len(news), width), dtype=np.int64)
        tokens[real] = np.fromiter(itertools.chain.from_iterable(news), dtype=np.int64, count=int(lengths.sum()))
        past = np.asarray(past_lengths, dtype=np.int64)
        positions = np.where(real, past[:, None] + np.arange(width)[None, :], 0)
        return cls(tokens, positions, past, lengths - 1, np.flatnonzero(real))

    @property
    def width(self) -> int:
        """The longest row's new tokens."""
        return int(self.tokens.shape[1])

    @property
    def new_lengths(self) -> np.ndarray:
        """int64 ``(rows,)``: each row's new tokens."""
        return self.last + 1

    @property
    def aligned(self) -> bool:
        """Whether every row has as many new tokens and as long a past as the
        others (a lone request, or particles in step): no padding anywhere."""
        return bool((self.last == self.last[0]).all() and (self.past_lengths == self.past_lengths[0]).all())
