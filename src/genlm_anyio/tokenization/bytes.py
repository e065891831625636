"""genlm-backend's ``tokenization.bytes`` module: byte vocabularies and byte decoders.

``get_byte_vocab`` is :func:`genlm_anyio.vocab.get_byte_vocab` (the Rust core
reads the tokenizer's own serialized form). ``check_byte_decoder`` checks a
character-to-byte table, as used by byte-level BPE tokenizers, against a
tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..vocab import ByteVocabError, get_byte_vocab

__all__ = [
    "ByteDecoderError",
    "ByteVocabError",
    "check_byte_decoder",
    "get_byte_tokens_from_byte_decoder",
    "get_byte_tokens_from_sp",
    "get_byte_vocab",
]

_SP_SPACE = "\u2581"
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# Characters from several scripts and planes, some of which byte-level BPE
# vocabularies split across tokens.
_ROUND_TRIP_TEXT = "naïve café — 東京 Ωμέγα ∮ 🙂 ﬁ \u00a0 ε\u0301"


class ByteDecoderError(ValueError):
    """A character-to-byte table does not decode a tokenizer's pieces."""


def check_byte_decoder(tokenizer: Any, byte_decoder: Mapping[str, int]) -> None:
    """Check that ``byte_decoder`` (piece character -> byte value) decodes ``tokenizer``.

    Every character of every regular (not added) vocabulary piece must map to a
    byte in ``[0, 256)``, and the pieces of an encoded multilingual text must
    decode back to that text's UTF-8 bytes.

    Raises:
        ByteDecoderError: naming the first missing character, bad value or
            mismatch.
    """
    added = set(tokenizer.get_added_vocab())
    for piece in tokenizer.get_vocab():
        if piece in added:
            continue
        for char in piece:
            value = byte_decoder.get(char)
            if value is None:
                raise ByteDecoderError(f"the byte decoder has no byte for {char!r} (in the piece {piece!r})")
            if not isinstance(value, int) or not 0 <= value < 256:
                raise ByteDecoderError(f"the byte decoder maps {char!r} to {value!r}, not a byte in [0, 256)")
    ids = tokenizer.encode(_ROUND_TRIP_TEXT, add_special_tokens=False)
    try:
        decoded = bytes(byte_decoder[c] for piece in tokenizer.convert_ids_to_tokens(ids) for c in piece)
    except (KeyError, ValueError) as exc:
        raise ByteDecoderError(f"the byte decoder cannot decode the pieces of {_ROUND_TRIP_TEXT!r}: {exc!r}") from exc
    if decoded != _ROUND_TRIP_TEXT.encode():
        raise ByteDecoderError(
            f"the byte decoder turns the pieces of {_ROUND_TRIP_TEXT!r} into {decoded!r}, not its UTF-8 bytes"
        )


def _added_ids(tokenizer: Any) -> dict[int, str]:
    return {token_id: text for text, token_id in tokenizer.get_added_vocab().items()}


def get_byte_tokens_from_byte_decoder(tokenizer: Any, byte_decoder: Mapping[str, int]) -> list[bytes]:
    """The bytes of every token id, reading each piece through ``byte_decoder``
    (piece character -> byte); added tokens are their text in UTF-8.

    :func:`get_byte_vocab` needs no table; this is for a table of one's own.
    """
    added = _added_ids(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [
        added[i].encode() if i in added else bytes(byte_decoder[c] for c in piece) for i, piece in enumerate(pieces)
    ]


def _sp_piece_bytes(piece: str) -> bytes:
    # split() with one group alternates text and the hex digits of <0xXX> escapes.
    out = bytearray()
    for k, part in enumerate(_SP_BYTE.split(piece)):
        if k % 2:
            out.append(int(part, 16))
        else:
            out += part.replace(_SP_SPACE, " ").encode()
    return bytes(out)


def get_byte_tokens_from_sp(tokenizer: Any) -> list[bytes]:
    """The bytes of every token id of a SentencePiece vocabulary read piece by piece:
    ``<0xXX>`` is that byte, ``\u2581`` a space; added tokens are their text in UTF-8."""
    added = _added_ids(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [added[i].encode() if i in added else _sp_piece_bytes(piece) for i, piece in enumerate(pieces)]
