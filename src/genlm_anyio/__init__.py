"""genlm-anyio: autobatched, cached language-model backends for probabilistic
programs, under asyncio and trio, with a Rust core for byte-level vocabularies.

The names below load on first use, so ``import genlm_anyio.vocab`` (or the
compat switch) does not import torch or transformers.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:
    from .backends import AsyncLM as AsyncLM
    from .backends import AsyncMlxLM as AsyncMlxLM
    from .backends import AsyncTransformer as AsyncTransformer
    from .backends import AsyncVirtualLM as AsyncVirtualLM
    from .backends import MockAsyncLM as MockAsyncLM
    from .backends import ReplicatedLM as ReplicatedLM
    from .batching import ClosedError as ClosedError
    from .loading import load_model_by_name as load_model_by_name
    from .trie import AsyncTokenCharacterTrie as AsyncTokenCharacterTrie
    from .trie import ParallelTokenCharacterTrie as ParallelTokenCharacterTrie
    from .trie import TokenCharacterTrie as TokenCharacterTrie
    from .vocab import Token as Token
    from .vocab import decode_vocab as decode_vocab

# Public name -> the module that defines it.
_EXPORTS = {
    "AsyncLM": ".backends",
    "AsyncMlxLM": ".backends",
    "AsyncTransformer": ".backends",
    "AsyncVirtualLM": ".backends",
    "MockAsyncLM": ".backends",
    "ReplicatedLM": ".backends",
    "ClosedError": ".batching",
    "load_model_by_name": ".loading",
    "AsyncTokenCharacterTrie": ".trie",
    "ParallelTokenCharacterTrie": ".trie",
    "TokenCharacterTrie": ".trie",
    "Token": ".vocab",
    "decode_vocab": ".vocab",
}

__all__ = sorted(_EXPORTS)
try:
    __version__: str = importlib.metadata.version("genlm-anyio")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
