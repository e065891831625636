"""genlm-backend's ``tokenization.bytes`` module: byte vocabularies and byte decoders.

``get_byte_vocab`` is :func:`genlm_anyio.vocab.get_byte_vocab` (the Rust core
reads the tokenizer's own serialized form). ``check_byte_decoder`` checks a
character-to-byte table, as used by byte-level BPE tokenizers, against a
tokenizer.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..vocab import ByteVocabError, get_byte_vocab

__all__ = ["ByteDecoderError", "ByteVocabError", "check_byte_decoder", "get_byte_vocab"]

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
