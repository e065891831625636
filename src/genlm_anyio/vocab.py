"""The exact bytes of every token of a tokenizer's vocabulary.

The decoding itself is done by the Rust core from the tokenizer's own serialized
form; this module picks the form, and wraps the bytes as :class:`Token`.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Sequence
from itertools import repeat
from typing import Any

from . import _core
from .checks import check_int

__all__ = [
    "ByteVocabError",
    "Token",
    "byte_vocab_from_gguf",
    "byte_vocab_from_tokenizer_json",
    "bytes_to_strs",
    "decode_vocab",
    "get_byte_vocab",
]

FALLBACKS = ("tokenizer", "latin1", "replace")


class ByteVocabError(ValueError):
    """The token bytes of a tokenizer's vocabulary cannot be derived from it."""


class Token(bytes):
    """The bytes of one token, carrying its id.

    A ``bytes`` subclass: it concatenates, slices and compares with plain bytes
    as bytes do. Between Tokens, equality, hashing and ordering go by
    ``token_id``, so two tokens with the same bytes stay distinct.

    Raises TypeError when ``token_id`` is not an integer or ``byte_string`` is
    not bytes-like.
    """

    token_id: int

    def __new__(cls, token_id: int, byte_string: bytes) -> Token:
        token_id = check_int("token_id", token_id)
        if not isinstance(byte_string, (bytes, bytearray, memoryview)):
            raise TypeError(f"byte_string must be bytes, not {type(byte_string).__name__}")
        self = bytes.__new__(cls, byte_string)
        self.token_id = token_id
        return self

    @property
    def byte_string(self) -> bytes:
        """The token's bytes, as plain ``bytes``."""
        return bytes(self)

    @staticmethod
    def as_bytes(x: Any) -> Any:
        """The plain bytes of a Token; anything else is returned as it is."""
        return bytes(x) if isinstance(x, Token) else x

    @staticmethod
    def is_plain_bytes(x: Any) -> bool:
        """Whether ``x`` is ``bytes`` but not a Token."""
        return isinstance(x, bytes) and not isinstance(x, Token)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Token):
            return self.token_id == other.token_id
        return bytes.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self.token_id)

    def __lt__(self, other: object) -> bool:
        if isinstance(other, Token):
            return self.token_id < other.token_id
        if not isinstance(other, bytes):
            return NotImplemented
        return bytes.__lt__(self, other)

    def __le__(self, other: object) -> bool:
        if isinstance(other, Token):
            return self.token_id <= other.token_id
        if not isinstance(other, bytes):
            return NotImplemented
        return bytes.__le__(self, other)

    def __gt__(self, other: object) -> bool:
        if isinstance(other, Token):
            return self.token_id > other.token_id
        if not isinstance(other, bytes):
            return NotImplemented
        return bytes.__gt__(self, other)

    def __ge__(self, other: object) -> bool:
        if isinstance(other, Token):
            return self.token_id >= other.token_id
        if not isinstance(other, bytes):
            return NotImplemented
        return bytes.__ge__(self, other)

    def __reduce__(self) -> tuple[Any, tuple[int, bytes]]:
        return (Token, (self.token_id, bytes(self)))

    def __repr__(self) -> str:
        return f"Token(token_id={self.token_id}, byte_string={bytes.__repr__(self)})"


def tokens_from_bytes(byte_strings: Sequence[bytes]) -> list[Token]:
    """``[Token(i, b) for i, b in enumerate(byte_strings)]``, made fast.

    The collector is paused while the objects are made: each Token owns an
    attribute dict, and the generation-0 collections that 150k new containers
    would trigger cost more than making them.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        tokens = list(map(bytes.__new__, repeat(Token, len(byte_strings)), byte_strings))
        for token_id, token in enumerate(tokens):
            token.token_id = token_id
    finally:
        if was_enabled:
            gc.enable()
    return tokens


def _check_fallback(byte2str_fallback: str) -> None:
    if byte2str_fallback not in FALLBACKS:
        raise ValueError(f"byte2str_fallback must be one of {FALLBACKS}, not {byte2str_fallback!r}")


def _slow_tokenizer_decoder(tokenizer: Any) -> dict[str, Any]:
    """The `tokenizers` decoder equivalent to a slow tokenizer's own decoding."""
    if hasattr(tokenizer, "byte_decoder"):
        return {"type": "ByteLevel"}
    if hasattr(tokenizer, "sp_model"):
        return {
            "type": "Sequence",
            "decoders": [{"type": "Metaspace", "replacement": "\u2581"}, {"type": "ByteFallback"}],
        }
    if hasattr(tokenizer, "wordpiece_tokenizer"):
        return {"type": "WordPiece", "prefix": "##"}
    raise ByteVocabError(
        f"cannot decode the vocabulary of {type(tokenizer).__name__}: it has no fast "
        "(tokenizers) backend, and is not a byte-level BPE, SentencePiece or WordPiece "
        "slow tokenizer"
    )


def _decode(tokenizer: Any, fallback: str) -> tuple[list[bytes], list[str]]:
    """Bytes and strings of every token id; ByteVocabError when the tokenizer's data cannot give them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = backend.to_str()
        if not isinstance(serialized, str):
            raise ByteVocabError(f"the tokenizer's backend serialized to {type(serialized).__name__}, not JSON text")
        try:
            return _core.vocab_from_tokenizer_json(serialized, fallback)
        except ValueError as exc:
            raise ByteVocabError(str(exc)) from exc
    if not hasattr(tokenizer, "get_vocab"):
        raise TypeError(f"tokenizer must be a transformers tokenizer, not {type(tokenizer).__name__}")
    decoder = _slow_tokenizer_decoder(tokenizer)
    size = len(tokenizer)
    pieces: list[str | None] = [None] * size
    for piece, token_id in tokenizer.get_vocab().items():
        if token_id < size:
            pieces[token_id] = piece
    verbatim = [False] * size
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if token_id < size:
            pieces[token_id] = str(added)
            verbatim[token_id] = True
    try:
        return _core.vocab_from_pieces(pieces, verbatim, json.dumps(decoder), fallback)
    except ValueError as exc:
        raise ByteVocabError(str(exc)) from exc


def get_byte_vocab(tokenizer: Any) -> list[bytes]:
    """The bytes of every token id of ``tokenizer`` (see :func:`decode_vocab`), as plain bytes.

    Raises :class:`ByteVocabError` when they cannot be derived.
    """
    return _decode(tokenizer, "tokenizer")[0]


def decode_vocab(tokenizer: Any, byte2str_fallback: str = "tokenizer") -> tuple[list[Token], list[str]]:
    """The bytes and a string form of every token id ``0 .. len(tokenizer) - 1``.

    Computed from the tokenizer object alone (no hub access, no reloading by name):
    from the serialized `tokenizers` model of a fast tokenizer, or the pieces of a
    slow byte-level BPE, SentencePiece or WordPiece tokenizer. Added and special
    tokens are their text in UTF-8. An id with no token has empty bytes.

    ``byte2str_fallback`` picks the string form of a token whose bytes are not
    UTF-8: ``"tokenizer"`` (the piece as the tokenizer stores it), ``"latin1"``
    (one character per byte) or ``"replace"`` (U+FFFD for invalid sequences).

    Raises ValueError (chained to the :class:`ByteVocabError` that says why) when
    the token bytes cannot be derived; never returns a guessed byte string.
    """
    _check_fallback(byte2str_fallback)
    try:
        byte_strings, strings = _decode(tokenizer, byte2str_fallback)
    except ByteVocabError as exc:
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ValueError(f"Could not decode byte representation of the vocabulary of {name!r}: {exc}") from exc
    size = len(tokenizer)
    if len(byte_strings) < size:
        missing = size - len(byte_strings)
        byte_strings.extend([b""] * missing)
        strings.extend([""] * missing)
    return tokens_from_bytes(byte_strings), strings


def bytes_to_strs(tokenizer: Any, byte_vocab: Sequence[bytes], byte2str_fallback: str = "tokenizer") -> list[str]:
    """A string form of each token's bytes: UTF-8 where they decode, else per
    ``byte2str_fallback`` (as in :func:`decode_vocab`, which computes both at once)."""
    _check_fallback(byte2str_fallback)
    out = []
    for token_id, raw in enumerate(byte_vocab):
        try:
            out.append(bytes(raw).decode("utf-8"))
        except UnicodeDecodeError:
            if byte2str_fallback == "latin1":
                out.append(bytes(raw).decode("latin1"))
            elif byte2str_fallback == "replace":
                out.append(bytes(raw).decode("utf-8", errors="replace"))
            else:
                out.append(tokenizer.convert_ids_to_tokens(token_id))
    return out


def byte_vocab_from_tokenizer_json(text: str) -> list[bytes]:
    """The bytes of every token id of a `tokenizers` JSON (a ``tokenizer.json``'s text)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be the JSON as a str, not {type(text).__name__}")
    return _core.vocab_from_tokenizer_json(text, "tokenizer")[0]


def byte_vocab_from_gguf(path: str | os.PathLike[str]) -> list[bytes]:
    """The bytes of every token id of a GGUF file's vocabulary (``tokenizer.ggml.*``)."""
    return _core.vocab_from_gguf(os.fspath(path), "tokenizer")[0]
