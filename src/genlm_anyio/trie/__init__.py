"""Byte tries over a vocabulary: per-prefix mass propagation and token masks.

:class:`TokenCharacterTrie` runs on the Rust core; :class:`ParallelTokenCharacterTrie`
does its sums and maxima in torch (on a GPU where there is one);
:class:`AsyncTokenCharacterTrie` batches reductions from concurrent tasks.

The last two load on first use, so ``import genlm_anyio.trie`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .rust import TokenCharacterTrie

if TYPE_CHECKING:
    from .async_trie import AsyncTokenCharacterTrie as AsyncTokenCharacterTrie
    from .parallel import ParallelTokenCharacterTrie as ParallelTokenCharacterTrie

# Public name -> the submodule that defines it, for the names loaded on first use.
_LAZY = {"AsyncTokenCharacterTrie": ".async_trie", "ParallelTokenCharacterTrie": ".parallel"}

__all__ = ["AsyncTokenCharacterTrie", "ParallelTokenCharacterTrie", "TokenCharacterTrie"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
