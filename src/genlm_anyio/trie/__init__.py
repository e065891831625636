"""Byte tries over a vocabulary: per-prefix mass propagation and token masks.

:class:`TokenCharacterTrie` runs on the Rust core; :class:`ParallelTokenCharacterTrie`
does its sums and maxima in torch (on a GPU where there is one);
:class:`AsyncTokenCharacterTrie` batches reductions from concurrent tasks.
"""

from .async_trie import AsyncTokenCharacterTrie
from .parallel import ParallelTokenCharacterTrie
from .rust import TokenCharacterTrie

__all__ = ["AsyncTokenCharacterTrie", "ParallelTokenCharacterTrie", "TokenCharacterTrie"]
