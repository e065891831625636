"""The token-byte trie on the Rust core.

:class:`TokenCharacterTrie` runs on the Rust core (flat arrays, rayon across
batch rows, the GIL released while it computes).
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np

from .. import _core
from ..arrays import address, float_array

__all__ = ["TokenCharacterTrie"]

# Outputs this large are kept for reuse (see TokenCharacterTrie._output).
_SPARE_MIN_BYTES = 16 << 20


class TokenCharacterTrie:
    """A trie of the byte strings of a vocabulary (one entry per token id).

    Each node is a byte prefix of at least one token; node ``root`` (0) is the
    empty prefix. Per node, ``weight_sum(ws)`` gives the total weight of the
    tokens whose bytes start with that prefix, ``weight_max`` their maximum and
    ``weight_logsumexp`` their log-space sum. Duplicate and empty byte strings are
    allowed (an empty token sits at the root).
    """

    root: int = 0

    def __init__(self, decode: Sequence[bytes]):
        self.decode = list(decode)
        self._core = _core.TrieCore(self.decode)
        self.vocab_size: int = self._core.vocab_size
        self.num_nodes: int = self._core.num_nodes
        self._sorted_tokens = np.empty(self.vocab_size, dtype=np.int64)
        self._core.sorted_tokens(address(self._sorted_tokens))
        self._token_nodes = np.empty(self.vocab_size, dtype=np.int64)
        self._core.token_nodes(address(self._token_nodes))
        self._spare: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"TokenCharacterTrie(vocab_size={self.vocab_size}, num_nodes={self.num_nodes})"

    def __len__(self) -> int:
        return self.num_nodes

    # -- mass propagation ---------------------------------------------------------
    def _reduce(self, kind: str, ws: Any, ndim: int) -> np.ndarray:
        name = "ws" if kind != "logsumexp" else "logws"
        arr = float_array(ws, name, ndim, self.vocab_size)
        out = self._output(arr.shape[:-1] + (self.num_nodes,))
        rows = arr.shape[0] if ndim == 2 else None
        self._core.reduce(kind, address(arr), arr.dtype == np.float64, rows, address(out))
        return out

    def _output(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float64 array for a result.

        A large batch output is mostly first-touch page faults when freshly
        allocated, so the last one is kept and reused once nobody else holds it
        (its only references are then ``self._spare``, the local name and
        ``getrefcount``'s argument); a result still in use is never touched.
        """
        spare = self._spare
        if spare is not None and spare.shape == shape and sys.getrefcount(spare) == 3:
            return spare
        out = np.empty(shape, dtype=np.float64)
        if out.nbytes >= _SPARE_MIN_BYTES:
            self._spare = out
        return out

    def weight_sum(self, ws: Any) -> np.ndarray:
        """Per node, the sum of ``ws`` (shape ``(V,)``) over the tokens under it: float64 ``(num_nodes,)``."""
        return self._reduce("sum", ws, 1)

    def weight_max(self, ws: Any) -> np.ndarray:
        """Per node, the max of ``ws`` (shape ``(V,)``) over the tokens under it."""
        return self._reduce("max", ws, 1)

    def weight_logsumexp(self, logws: Any) -> np.ndarray:
        """Per node, ``log(sum(exp(logws)))`` over the tokens under it, stable; ``-inf`` where all are ``-inf``."""
        return self._reduce("logsumexp", logws, 1)

    def batch_weight_sum(self, ws: Any) -> np.ndarray:
        """:meth:`weight_sum` of each row of ``ws`` (shape ``(B, V)``): ``(B, num_nodes)``."""
        return self._reduce("sum", ws, 2)

    def batch_weight_max(self, ws: Any) -> np.ndarray:
        """:meth:`weight_max` of each row of ``ws`` (shape ``(B, V)``)."""
        return self._reduce("max", ws, 2)

    def batch_weight_logsumexp(self, logws: Any) -> np.ndarray:
        """:meth:`weight_logsumexp` of each row of ``logws`` (shape ``(B, V)``)."""
        return self._reduce("logsumexp", logws, 2)

    # -- navigation ---------------------------------------------------------------
    def _node(self, node: Any) -> int:
        if isinstance(node, bool) or not isinstance(node, (int, np.integer)):
            raise TypeError(f"node must be an int, not {type(node).__name__}")
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node {node} is not a node of this trie (it has {self.num_nodes} nodes)")
        return int(node)

    def children(self, node: int) -> dict[int, int]:
        """The children of ``node``: ``{byte: child node}``."""
        return dict(self._core.children(self._node(node)))

    def node_of(self, prefix: bytes) -> int | None:
        """The node of the byte string ``prefix``, or None if no token starts with it."""
        return self._core.node_of(_as_bytes(prefix, "prefix"))

    def prefix(self, node: int) -> bytes:
        """The byte prefix that ``node`` stands for."""
        return self._core.prefix(self._node(node))

    def parent(self, node: int) -> int | None:
        """The parent of ``node`` (None for the root)."""
        return self._core.parent(self._node(node))

    def tokens_under(self, node: int) -> np.ndarray:
        """The ids (int64) of the tokens whose bytes start with ``node``'s prefix."""
        start, stop = self._core.tokens_under_range(self._node(node))
        return self._sorted_tokens[start:stop].copy()

    def token_node(self, token_id: int) -> int:
        """The node of token ``token_id``'s full byte string."""
        if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
            raise TypeError(f"token_id must be an int, not {type(token_id).__name__}")
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token_id {token_id} is outside [0, {self.vocab_size})")
        return int(self._token_nodes[token_id])

    # -- masks --------------------------------------------------------------------
    def _mask(self, fill: Any, *args: Any) -> np.ndarray:
        mask = np.empty(self.vocab_size, dtype=np.bool_)
        fill(*args, address(mask))
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
        if not np.issubdtype(table.dtype, np.integer):
            raise TypeError(f"transitions must hold integers, not {table.dtype}")
        if table.ndim != 2 or table.shape[1] != 256:
            raise ValueError(f"transitions must have shape (S, 256), not {table.shape}")
        if table.size and (table.min() < -1 or table.max() >= table.shape[0]):
            raise ValueError(f"transitions entries must lie in [-1, {table.shape[0]})")
        table = np.ascontiguousarray(table, dtype=np.int32)
        live_arr = np.asarray(live)
        if live_arr.dtype != np.bool_:
            raise TypeError(f"live must be a bool array, not {live_arr.dtype}")
        if live_arr.shape != (table.shape[0],):
            raise ValueError(f"live must have shape ({table.shape[0]},), not {live_arr.shape}")
        if isinstance(state, bool) or not isinstance(state, (int, np.integer)):
            raise TypeError(f"state must be an int, not {type(state).__name__}")
        if not 0 <= state < table.shape[0]:
            raise ValueError(f"state {state} is outside [0, {table.shape[0]})")
        live_arr = np.ascontiguousarray(live_arr)
        return self._mask(
            self._core.dfa_mask, address(table), table.shape[0], int(state), address(live_arr)
        )


def _as_bytes(data: Any, name: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes, not {type(data).__name__}")
    return bytes(data)
