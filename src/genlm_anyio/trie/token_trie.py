"""The token-byte trie on the Rust core.

:class:`TokenCharacterTrie` runs on the Rust core (flat arrays, rayon across
batch rows, the GIL released while it computes).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, Literal

import numpy as np

from .. import _core
from ..arrays import float_array
from ..checks import check_int

__all__ = ["TokenCharacterTrie"]

_Reduction = Literal["sum", "max", "logsumexp"]

# Batch outputs this large come from a _ResultBlockPool (a fresh one costs more in
# first-touch page faults than the reduction).
_POOL_MIN_BYTES = 16 << 20


class TokenCharacterTrie:
    """A trie of the entries of a vocabulary, numbered as genlm-backend's.

    ``decode[i]`` is entry ``i``: a :class:`~genlm_anyio.Token` (its bytes, told
    apart from other tokens with the same bytes by ``token_id``), plain ``bytes``
    (deprecated, as in genlm-backend: equal byte strings are then duplicates), or
    any other iterable of hashable symbols (an end-of-sequence object, a ``str``).

    Nodes: one per distinct prefix of an entry (a *prefix node*; ``root`` is the
    empty prefix) plus one *leaf* per entry, a child of the node of its full
    string reached by the edge ``(None, i)``. Children are ordered by the first
    entry under them and nodes are numbered in postorder, exactly as
    genlm-backend 0.3.1 numbers them: children come before their parents and the
    root is the last node. Per node, ``weight_sum(ws)`` is the total weight of the
    entries under it (a leaf: its entry's weight), ``weight_max`` their maximum
    and ``weight_logsumexp`` their log-space sum; all are computed by the Rust
    core, and the Python views of the structure (``children``, ``node2prefix``,
    ``word2leaf``...) are built on first use.

    Raises ValueError for a duplicate entry (two plain byte strings, two tokens
    with the same bytes and id, or two equal other entries), TypeError for an
    entry that is not iterable or a symbol that is not hashable.
    """

    def __init__(self, decode: Sequence[Any]):
        self.decode = decode if isinstance(decode, list) else list(decode)
        symbols: dict[Any, int] = {b: b for b in range(256)}
        others: dict[Any, int] = {}

        def encode(i: int, item: Any) -> list[int]:
            try:
                seen = others.setdefault(item, i)
            except TypeError:
                raise TypeError(
                    f"decode[{i}] must be bytes, a Token or a hashable iterable, not {type(item).__name__}"
                ) from None
            if seen != i:
                raise ValueError(f"Duplicate word in vocabulary: {item!r} (entries {seen} and {i})")
            try:
                letters = iter(item)
            except TypeError:
                raise TypeError(
                    f"decode[{i}] must be bytes, a Token or an iterable of symbols, not {type(item).__name__}"
                ) from None
            out = []
            for letter in letters:
                try:
                    out.append(symbols.setdefault(letter, len(symbols)))
                except TypeError:
                    raise TypeError(f"decode[{i}] holds an unhashable symbol of type {type(letter).__name__}") from None
            return out

        self._core = _core.TrieCore(self.decode, encode)
        # Symbol ids of 256 and up, back to their symbols.
        self._symbols: list[Any] = list(symbols)[256:]
        first_plain, duplicate = self._core.first_plain, self._core.duplicate
        if first_plain is not None and (duplicate is None or first_plain <= duplicate[1]):
            warnings.warn(
                "Passing plain bytes to TokenCharacterTrie is deprecated: pass Tokens "
                "(genlm_anyio.decode_vocab), which stay distinct when their bytes are equal.",
                DeprecationWarning,
                stacklevel=2,
            )
        if duplicate is not None:
            earlier, later = duplicate
            raise ValueError(f"Duplicate word in vocabulary: {self._word_key(later)!r} (entries {earlier} and {later})")
        self.vocab_size: int = self._core.vocab_size
        self.num_nodes: int = self._core.num_nodes
        self.root: int = self._core.root
        self._sorted_tokens = np.empty(self.vocab_size, dtype=np.int64)
        self._core.sorted_tokens(self._sorted_tokens)
        self._token_leaves = np.empty(self.vocab_size, dtype=np.int64)
        self._core.token_leaves(self._token_leaves)
        self._result_pool = _ResultBlockPool()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, num_nodes={self.num_nodes})"

    def __len__(self) -> int:
        return self.num_nodes

    # -- genlm-backend's views --------------------------------------------------------
    def _word_key(self, i: int) -> Any:
        """Entry ``i``'s key in :attr:`word2leaf`: ``(bytes, token_id)`` for a token, else the entry."""
        item = self.decode[i]
        if isinstance(item, bytes) and type(item) is not bytes:
            token_id = getattr(item, "token_id", None)
            if isinstance(token_id, int):
                return (bytes(item), token_id)
        return item

    def _label(self, label: int) -> Any:
        if label < 0:
            return (None, -1 - label)
        return label if label < 256 else self._symbols[label - 256]

    @cached_property
    def children(self) -> Sequence[dict[Any, int]]:
        """Per node, a dict from edge to child, in increasing child order: a symbol
        (an ``int`` for a byte) to a prefix node, ``(None, i)`` to entry ``i``'s leaf.
        A sequence of length ``num_nodes`` whose dicts are made on first access."""
        return _Children(self)

    @cached_property
    def jump(self) -> Sequence[np.ndarray]:
        """Per node, its children's ids as a sorted int32 array."""
        return _Jump(self)

    @cached_property
    def idx_to_leaf(self) -> np.ndarray:
        """int32 ``(V, 2)``: rows ``(i, leaf of entry i)``."""
        return np.stack([np.arange(self.vocab_size), self._token_leaves], axis=1).astype(np.int32)

    @cached_property
    def word2leaf(self) -> dict[Any, int]:
        """Entry key (``(bytes, token_id)`` for a token, else the entry) to its leaf."""
        keys = [self._word_key(i) for i in range(self.vocab_size)]
        return dict(zip(keys, self._token_leaves.tolist()))

    @cached_property
    def leaf2word(self) -> dict[int, Any]:
        """Leaf to its entry's key (the inverse of :attr:`word2leaf`)."""
        return {leaf: key for key, leaf in self.word2leaf.items()}

    @cached_property
    def ordering(self) -> np.ndarray:
        """The prefix nodes in the order in which reductions visit them (children first)."""
        tokens = np.empty(self.num_nodes, dtype=np.int64)
        self._core.node_tokens(tokens)
        return np.flatnonzero(tokens < 0)

    @cached_property
    def node2prefix(self) -> Mapping[int, list[Any]]:
        """Node to the list of symbols on the path to it (a leaf: its entry's),
        made on access."""
        return _Node2Prefix(self)

    def _preprocess_ws(self, ws: Any) -> np.ndarray:
        """``ws`` (numpy, torch on any device, a sequence) as the numpy array the core reads."""
        return float_array(ws)

    def visualize(self, ws: Any = None) -> Any:
        """The trie as a ``graphviz.Digraph`` (needs the ``graphviz`` package):
        each node labelled with its id and prefix, leaves drawn doubled, and, if
        ``ws`` (one value per node) is given, its value, shaded by its size."""
        try:
            import graphviz
        except ImportError:
            raise ImportError("visualize needs graphviz: pip install graphviz") from None
        if ws is not None:
            ws = np.asarray(ws, dtype=np.float64)
            if ws.shape != (self.num_nodes,):
                raise ValueError(f"ws must have one value per node ({self.num_nodes}), not shape {ws.shape}")
        top = float(ws.max()) if ws is not None and len(ws) else 0.0
        dot = graphviz.Digraph(comment="Token character trie")
        dot.attr(rankdir="LR")
        leaves = set(self._token_leaves.tolist())
        for node in range(self.num_nodes):
            label = f"{node}\n'{self.node2prefix[node]}'"
            fill = "#ffffff"
            if ws is not None:
                label += f"\n{ws[node]:.4f}"
                if top > 0:
                    shade = int(255 * (1 - ws[node] / top))
                    fill = f"#{shade:02x}ff{shade:02x}"
            shape = "doublecircle" if node in leaves else "circle"
            dot.node(str(node), label, shape=shape, style="filled", fillcolor=fill)
        for node in range(self.num_nodes):
            for edge, child in self.children[node].items():
                text = f"end of entry {edge[1]}" if isinstance(edge, tuple) and edge[0] is None else str(edge)
                dot.edge(str(node), str(child), label=text)
        return dot

    # -- mass propagation ---------------------------------------------------------
    # ``ws`` may be anything float_array takes; ``out``, if given, must be a
    # writable, C-contiguous float64 array (or other buffer) of the result's shape,
    # sharing no memory with ``ws``. It is filled and returned. By default each
    # call returns a new array that shares memory with no live result (a large
    # batch result may reuse a freed one's, see _ResultBlockPool). The core checks both
    # arguments, naming them.
    def weight_sum(self, ws: Any, *, out: Any = None) -> np.ndarray:
        """Per node, the sum of ``ws`` (shape ``(V,)``) over the tokens under it:
        float64 ``(num_nodes,)``, written to ``out`` if given."""
        return self._core.reduce("sum", float_array(ws), False, out)

    def weight_max(self, ws: Any, *, out: Any = None) -> np.ndarray:
        """Per node, the max of ``ws`` (shape ``(V,)``) over the tokens under it (into ``out`` if given)."""
        return self._core.reduce("max", float_array(ws), False, out)

    def weight_logsumexp(self, logws: Any, *, out: Any = None) -> np.ndarray:
        """Per node, ``log(sum(exp(logws)))`` over the tokens under it, stable; ``-inf``
        where all are ``-inf`` (into ``out`` if given)."""
        return self._core.reduce("logsumexp", float_array(logws), False, out)

    def batch_weight_sum(self, ws: Any, *, out: Any = None) -> np.ndarray:
        """:meth:`weight_sum` of each row of ``ws`` (shape ``(B, V)``): ``(B, num_nodes)``
        (into ``out`` if given)."""
        return self._batch("sum", ws, out)

    def batch_weight_max(self, ws: Any, *, out: Any = None) -> np.ndarray:
        """:meth:`weight_max` of each row of ``ws`` (shape ``(B, V)``) (into ``out`` if given)."""
        return self._batch("max", ws, out)

    def batch_weight_logsumexp(self, logws: Any, *, out: Any = None) -> np.ndarray:
        """:meth:`weight_logsumexp` of each row of ``logws`` (shape ``(B, V)``) (into ``out`` if given)."""
        return self._batch("logsumexp", logws, out)

    def _batch(self, kind: _Reduction, ws: Any, out: Any) -> np.ndarray:
        arr = float_array(ws)
        if out is None and arr.ndim == 2 and arr.shape[1] == self.vocab_size:
            out = self._result_pool.array((arr.shape[0], self.num_nodes))
        return self._core.reduce(kind, arr, True, out)

    # -- navigation ---------------------------------------------------------------
    def _node(self, node: Any) -> int:
        node = check_int("node", node)
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node {node} is not a node of this trie (it has {self.num_nodes} nodes)")
        return node

    def node_of(self, prefix: bytes) -> int | None:
        """The prefix node of the byte string ``prefix``, or None if no entry starts with it."""
        return self._core.node_of(_as_bytes(prefix, "prefix"))

    def prefix(self, node: int) -> bytes:
        """The bytes on the path to ``node`` (a leaf: its entry's bytes).

        ValueError if the path holds a symbol that is not a byte (see :attr:`node2prefix`).
        """
        symbols = self._core.prefix(self._node(node))
        if symbols and max(symbols) > 255:
            raise ValueError(f"node {node}'s prefix holds a non-byte symbol; use node2prefix[{node}]")
        return bytes(symbols)

    def parent(self, node: int) -> int | None:
        """The parent of ``node`` (None for the root)."""
        return self._core.parent(self._node(node))

    def tokens_under(self, node: int) -> np.ndarray:
        """The entries (int64 ids) under ``node``: those starting with a prefix
        node's prefix, or a leaf's own entry."""
        start, stop = self._core.tokens_under_range(self._node(node))
        return self._sorted_tokens[start:stop].copy()

    def token_node(self, token_id: int) -> int:
        """The leaf of entry ``token_id`` (its own node: ``weight_sum(ws)[leaf] == ws[token_id]``).

        Its parent, ``node_of(bytes(decode[token_id]))``, is the prefix node of
        its full bytes, shared with every entry that starts with them.
        """
        token_id = check_int("token_id", token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token_id {token_id} is outside [0, {self.vocab_size})")
        return int(self._token_leaves[token_id])

    # -- masks --------------------------------------------------------------------
    def _mask(self, fill: Any, *args: Any) -> np.ndarray:
        mask = np.empty(self.vocab_size, dtype=np.bool_)
        fill(*args, mask)
        return mask

    def mask_startswith(self, prefix: bytes) -> np.ndarray:
        """Bool mask ``(V,)`` of the tokens whose bytes start with ``prefix``."""
        return self._mask(self._core.mask_startswith, _as_bytes(prefix, "prefix"))

    def mask_prefix_of(self, data: bytes) -> np.ndarray:
        """Bool mask ``(V,)`` of the tokens whose bytes are a prefix of ``data``."""
        return self._mask(self._core.mask_prefix_of, _as_bytes(data, "data"))

    def dfa_mask(self, transitions: Any, state: int, live: Any) -> np.ndarray:
        """Bool mask ``(V,)`` of the tokens whose bytes a byte-level DFA accepts as a path.

        ``transitions`` is an int array ``(S, 256)`` (next state per byte, -1 for
        no edge); a token is allowed if, from ``state``, each of its bytes has an
        edge and every state on the way (``state`` included) is marked in the
        bool array ``live`` ``(S,)``.
        """
        table = np.asarray(transitions)
        if table.dtype.kind in "iu" and table.dtype.itemsize < 8 and table.dtype != np.dtype(np.int32):
            table = table.astype(np.int64)  # lossless; the core reads int32 and int64
        state = check_int("state", state)
        live_arr = np.ascontiguousarray(live)
        return self._mask(self._core.dfa_mask, np.ascontiguousarray(table), state, live_arr)


class _ResultBlockPool:
    """Memory blocks for large batch results, each reused only once no array over it is left.

    An array made by ``np.frombuffer(block)`` reaches ``block`` through a
    memoryview that numpy makes (its ``base``), and so does every view or slice
    of it: numpy keeps the owner of an array's memory alive through ``base``.
    When that memoryview is freed no array over the block remains, and a
    ``weakref.finalize`` puts the block back. Each list operation here is one
    atomic step, so threads (and callbacks run inside them) never share a block.
    """

    _KEEP = 2  # free blocks kept

    def __init__(self) -> None:
        self._free: list[bytearray] = []

    def array(self, shape: tuple[int, int]) -> np.ndarray | None:
        """A float64 array of ``shape`` over a free or new block; None (allocate
        normally) below the pooling size."""
        nbytes = shape[0] * shape[1] * 8
        if nbytes < _POOL_MIN_BYTES:
            return None
        try:
            block = self._free.pop()
        except IndexError:
            block = None
        if block is None or len(block) != nbytes:
            block = bytearray(nbytes)
        arr = np.frombuffer(block, dtype=np.float64)
        owner = arr.base
        if not isinstance(owner, memoryview) or owner.obj is not block:
            return None  # not numpy's usual layout: no reuse
        weakref.finalize(owner, self._give_back, block).atexit = False
        return arr.reshape(shape)

    def _give_back(self, block: bytearray) -> None:
        self._free.append(block)
        del self._free[: -self._KEEP]


def _as_bytes(data: Any, name: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes, not {type(data).__name__}")
    return bytes(data)


class _Children(Sequence):
    """``trie.children``: the per-node dicts, each made once, on first access."""

    def __init__(self, trie: TokenCharacterTrie):
        self._trie = trie
        self._made: list[dict[Any, int] | None] = [None] * trie.num_nodes

    def __len__(self) -> int:
        return len(self._made)

    def __getitem__(self, node: Any) -> Any:
        if isinstance(node, slice):
            return [self[i] for i in range(*node.indices(len(self)))]
        if isinstance(node, bool) or not isinstance(node, (int, np.integer)):
            raise TypeError(f"children indices must be integers, not {type(node).__name__}")
        if not -len(self) <= node < len(self):
            raise IndexError(f"node {node} is not a node of this trie (it has {len(self)} nodes)")
        node = int(node) % len(self)
        made = self._made[node]
        if made is None:
            label = self._trie._label
            made = {label(edge): child for edge, child in self._trie._core.children(node)}
            self._made[node] = made
        return made


class _Jump(Sequence):
    """``trie.jump``: per node, its children as a sorted int32 array."""

    def __init__(self, trie: TokenCharacterTrie):
        self._trie = trie

    def __len__(self) -> int:
        return self._trie.num_nodes

    def __getitem__(self, node: Any) -> Any:
        if isinstance(node, slice):
            return [self[i] for i in range(*node.indices(len(self)))]
        return np.array(sorted(self._trie.children[node].values()), dtype=np.int32)


class _Node2Prefix(Mapping):
    """``trie.node2prefix``: node to the list of symbols on its path, made on access."""

    def __init__(self, trie: TokenCharacterTrie):
        self._trie = trie

    def __len__(self) -> int:
        return self._trie.num_nodes

    def __iter__(self):
        return iter(range(self._trie.num_nodes))

    def __getitem__(self, node: Any) -> list[Any]:
        if isinstance(node, bool) or not isinstance(node, (int, np.integer)) or not 0 <= node < len(self):
            raise KeyError(node)
        label = self._trie._label
        return [label(s) for s in self._trie._core.prefix(int(node))]
