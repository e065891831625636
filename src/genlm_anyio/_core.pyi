"""Type stubs of the Rust extension ``genlm_anyio._core`` (rust/src/py).

Private: ``genlm_anyio.vocab`` and ``genlm_anyio.trie`` wrap it. Every entry
point reports failures through one conversion (rust/src/py/errors.rs): bad input
is a ValueError or TypeError naming the argument, a file that cannot be read an
OSError (``FileNotFoundError``, ``PermissionError``... with its ``filename``),
and a Rust panic a ValueError naming the entry point. Arrays are objects
exporting a buffer (numpy arrays, ``memoryview``, ``array.array``...), which the
core checks (element type, C-contiguity, shape; outputs also writable and apart
from the inputs) and holds for the call. While a call holds an array, another
call (from another thread) that would write memory the first reads or writes,
or read memory it writes, is refused with a ValueError naming the argument.
"""

from collections.abc import Callable, Iterable, Sequence
from os import PathLike
from typing import Any, Literal, TypeAlias, TypeVar, final, overload

import numpy as np

# An object exporting a buffer (numpy array, memoryview, array.array...). Any,
# because numpy declares ``__buffer__`` (PEP 688) only from Python 3.12 on.
_Buffer: TypeAlias = Any
_Out = TypeVar("_Out")
_Reduction: TypeAlias = Literal["sum", "max", "logsumexp"]
# What ``reduce`` makes when given no ``out``: one value per node, per row if ``batch``.
_PerNode: TypeAlias = np.ndarray[tuple[int], np.dtype[np.float64]]
_PerNodeRows: TypeAlias = np.ndarray[tuple[int, int], np.dtype[np.float64]]

__all__ = ["TrieCore", "copy_into", "vocab_from_gguf", "vocab_from_pieces", "vocab_from_tokenizer_json"]

def copy_into(src: _Buffer, out: _Buffer) -> None:
    """Copy the float64 array ``src`` into ``out``: float64, writable, C-contiguous,
    of ``src``'s shape and apart from it."""

def vocab_from_tokenizer_json(text: str, fallback: str) -> tuple[list[bytes], list[str]]:
    """Bytes and string form of every token id of a `tokenizers` JSON; ``fallback``
    is ``"tokenizer"``, ``"latin1"`` or ``"replace"``."""

def vocab_from_pieces(
    pieces: Sequence[str | None], verbatim: Sequence[bool], decoder: str, fallback: str
) -> tuple[list[bytes], list[str]]:
    """Bytes and string form of pieces listed by id (``None`` for an unused id),
    decoded by ``decoder`` (`tokenizers` decoder JSON) unless flagged ``verbatim``."""

def vocab_from_gguf(path: str | PathLike[str], fallback: str) -> tuple[list[bytes], list[str]]:
    """Bytes and string form of every token id of a GGUF file's vocabulary; OSError
    if the file cannot be read, ValueError if it is not a well-formed GGUF tokenizer."""

@final
class TrieCore:
    """The flat trie over a vocabulary's byte strings (immutable)."""

    def __new__(cls, items: Iterable[Any], encode: Callable[[int, Any], Sequence[int]]) -> TrieCore:
        """``items``' ``bytes`` entries are their bytes; any other entry ``x`` is
        ``encode(i, x)``, its symbol ids (256 and up for non-byte symbols)."""

    @property
    def num_nodes(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def root(self) -> int: ...
    @property
    def duplicate(self) -> tuple[int, int] | None:
        """The first duplicate pair of entries ``(earlier, later)``, if any."""

    @property
    def first_plain(self) -> int | None:
        """The index of the first plain ``bytes`` entry (not a token), if any."""

    def children(self, node: int) -> list[tuple[int, int]]:
        """``(label, child)`` pairs; the label is a symbol, or ``-1 - i`` for entry ``i``'s leaf."""

    def node_of(self, prefix: bytes) -> int | None: ...
    def prefix(self, node: int) -> list[int]: ...
    def parent(self, node: int) -> int | None: ...
    def tokens_under_range(self, node: int) -> tuple[int, int]: ...
    def sorted_tokens(self, out: _Buffer) -> None:
        """Fill the int64 array ``out`` ``(vocab_size,)``."""

    def token_leaves(self, out: _Buffer) -> None:
        """Fill the int64 array ``out`` ``(vocab_size,)``."""

    def node_tokens(self, out: _Buffer) -> None:
        """Fill the int64 array ``out`` ``(num_nodes,)``."""

    def node_parents(self, out: _Buffer) -> None:
        """Fill the int64 array ``out`` ``(num_nodes,)``."""

    @overload
    def reduce(self, kind: _Reduction, ws: _Buffer, batch: Literal[False], out: None) -> _PerNode: ...
    @overload
    def reduce(self, kind: _Reduction, ws: _Buffer, batch: Literal[True], out: None) -> _PerNodeRows: ...
    @overload
    def reduce(self, kind: _Reduction, ws: _Buffer, batch: bool, out: _Out) -> _Out:
        """Per-node ``"sum"``, ``"max"`` or ``"logsumexp"`` of the float32 or float64
        weights ``ws`` ``(V,)`` (``(B, V)`` if ``batch``) into the float64 array
        ``out`` ``(num_nodes,)`` (``(B, num_nodes)``), a new numpy array if None;
        returns ``out``."""

    def mask_startswith(self, prefix: bytes, out: _Buffer) -> None: ...
    def mask_prefix_of(self, data: bytes, out: _Buffer) -> None: ...
    def dfa_mask(self, transitions: _Buffer, state: int, live: _Buffer, out: _Buffer) -> None:
        """``transitions``: int32 or int64 ``(S, 256)``; ``live``: bool ``(S,)``; ``out``: bool ``(V,)``."""
