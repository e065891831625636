"""The trie's sums and maxima as torch operations, on a GPU where there is one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import _core
from ..arrays import is_torch_tensor
from .token_trie import TokenCharacterTrie


class ParallelTokenCharacterTrie(TokenCharacterTrie):
    """:class:`TokenCharacterTrie` whose reductions run in torch on ``device``.

    The entry/node relation is a sparse ``(num_nodes, V)`` matrix with one entry
    per (node, entry under it) pair, so a batch of sums is one sparse-dense
    product and a batch of maxima one ``scatter_reduce``, in float64. ``device``
    is ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (ValueError otherwise, or for CUDA
    where there is none); None means CUDA when it is available. Results are
    float64 numpy arrays, as with the Rust trie.
    """

    def __init__(self, decode: Sequence[Any], device: str | torch.device | None = None, **kwargs: Any):
        super().__init__(decode, **kwargs)
        self.device: str = _device(device)
        parents = np.empty(self.num_nodes, dtype=np.int64)
        self._core.node_parents(parents)
        rows, cols = [], []
        nodes, tokens = self._token_leaves.copy(), np.arange(self.vocab_size)
        while len(nodes):
            rows.append(nodes)
            cols.append(tokens)
            keep = nodes != self.root
            nodes, tokens = parents[nodes[keep]], tokens[keep]
        self._rows = torch.from_numpy(np.concatenate(rows)).to(self.device)
        self._cols = torch.from_numpy(np.concatenate(cols)).to(self.device)
        index = torch.stack([self._rows, self._cols])
        values = torch.ones(len(self._rows), dtype=torch.float64, device=self.device)
        shape = (self.num_nodes, self.vocab_size)
        self._matrix = torch.sparse_coo_tensor(index, values, shape, check_invariants=False).coalesce()

    # As in genlm-backend, this trie's weights are a torch tensor, the Rust trie's a numpy array.
    def _preprocess_ws(self, ws: Any) -> torch.Tensor:  # type: ignore[override]
        """A batch of weights (a ``(B, V)`` array or tensor, or a sequence of ``(V,)``
        rows) as a float64 ``(B, V)`` tensor on ``device``; ValueError for a wrong
        shape or a NaN."""
        if isinstance(ws, (list, tuple)) and ws and all(is_torch_tensor(w) for w in ws):
            batch = torch.stack([w.detach().to(self.device, torch.float64) for w in ws])
        elif is_torch_tensor(ws):
            batch = ws.detach().to(self.device, torch.float64)
        else:
            batch = torch.as_tensor(np.asarray(ws, dtype=np.float64), device=self.device)
        if batch.dim() != 2 or batch.shape[1] != self.vocab_size:
            raise ValueError(f"ws must have shape (B, {self.vocab_size}), not {tuple(batch.shape)}")
        nan = torch.isnan(batch)
        if nan.any():
            row, index = (int(i) for i in torch.nonzero(nan)[0])
            raise ValueError(f"weights contain NaN (row {row}, token {index})")
        return batch

    def batch_weight_sum(self, ws: Any, *, out: Any = None) -> np.ndarray:
        return _deliver(torch.sparse.mm(self._matrix, self._preprocess_ws(ws).T).T, out)

    def batch_weight_max(self, ws: Any, *, out: Any = None) -> np.ndarray:
        batch = self._preprocess_ws(ws)
        maxes = torch.full((batch.shape[0], self.num_nodes), -torch.inf, dtype=torch.float64, device=self.device)
        index = self._rows.expand(batch.shape[0], -1)
        maxes.scatter_reduce_(1, index, batch[:, self._cols], reduce="amax")
        return _deliver(maxes, out)

    def weight_sum(self, ws: Any, *, out: Any = None) -> np.ndarray:
        return _deliver(_single(self.batch_weight_sum, ws), out)

    def weight_max(self, ws: Any, *, out: Any = None) -> np.ndarray:
        return _deliver(_single(self.batch_weight_max, ws), out)


def _device(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or None, not {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or None, not {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    return str(parsed)


def _deliver(result: torch.Tensor | np.ndarray, out: Any) -> np.ndarray:
    """``result`` as a numpy array, or copied into ``out`` (checked by the core, as
    the Rust trie's ``out`` is) and ``out`` returned."""
    array = result.cpu().numpy() if isinstance(result, torch.Tensor) else result
    if out is None:
        return array
    _core.copy_into(np.ascontiguousarray(array), out)
    return out


def _single(batch_op: Any, ws: Any) -> np.ndarray:
    """``batch_op`` on the one row ``ws`` (shape ``(V,)``), with errors about it, not a batch."""
    row = ws.detach() if is_torch_tensor(ws) else torch.as_tensor(np.asarray(ws, dtype=np.float64))
    if row.dim() != 1:
        raise ValueError(f"ws must have shape (V,), not {tuple(row.shape)}")
    try:
        return batch_op(row.unsqueeze(0))[0]
    except ValueError as exc:
        raise ValueError(str(exc).replace("(row 0, token", "(token")) from None
