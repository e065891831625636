"""genlm-backend's ``tokenization`` package: the byte vocabulary of a tokenizer.

The implementation is :mod:`genlm_anyio.vocab`; this path exists so that code
written for ``genlm.backend.tokenization`` ports by changing the import.
"""

from ..vocab import Token, decode_vocab

__all__ = ["Token", "decode_vocab"]
