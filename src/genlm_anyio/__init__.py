"""genlm-anyio: autobatched, cached language-model backends for probabilistic
programs, under asyncio and trio, with a Rust core for byte-level vocabularies."""
from .backends import AsyncLM, AsyncTransformer, AsyncVirtualLM, MockAsyncLM
from .batching import ClosedError
from .loading import load_model_by_name
from .trie import TokenCharacterTrie
from .vocab import Token, decode_vocab

__all__ = [
    "AsyncLM",
    "AsyncTransformer",
    "AsyncVirtualLM",
    "ClosedError",
    "MockAsyncLM",
    "Token",
    "TokenCharacterTrie",
    "decode_vocab",
    "load_model_by_name",
]
__version__ = "0.1.0"
