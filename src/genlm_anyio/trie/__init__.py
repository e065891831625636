"""Byte tries over a vocabulary: per-prefix mass propagation and token masks.

:class:`TokenCharacterTrie` runs on the Rust core; :class:`ParallelTokenCharacterTrie`
does its sums and maxima in torch (on a GPU where there is one);
:class:`AsyncTokenCharacterTrie` batches reductions from concurrent tasks.

The last two load on first use, so ``import genlm_anyio.trie`` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .token_trie import TokenCharacterTrie

if TYPE_CHECKING:
    from .async_trie import AsyncTokenCharacterTrie as AsyncTokenCharacterTrie
    from .parallel import ParallelTokenCharacterTrie as ParallelTokenCharacterTrie

# Public name -> the submodule that defines it, for the names loaded on first use.
_LAZY = {"AsyncTokenCharacterTrie": ".async_trie", "ParallelTokenCharacterTrie": ".parallel"}

__all__ = ["AsyncTokenCharacterTrie", "ParallelTokenCharacterTrie", "TokenCharacterTrie"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
