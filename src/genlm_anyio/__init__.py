"""genlm-anyio: autobatched, cached language-model backends for probabilistic
programs, under asyncio and trio, with a Rust core for byte-level vocabularies."""
from .trie import TokenCharacterTrie
from .vocab import Token, decode_vocab

__all__ = ["Token", "decode_vocab", "TokenCharacterTrie"]
__version__ = "0.1.0"
