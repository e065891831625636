"""The trie's sums and maxima as torch operations, on a GPU where there is one."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..arrays import address
from .rust import TokenCharacterTrie


class ParallelTokenCharacterTrie(TokenCharacterTrie):
    """:class:`TokenCharacterTrie` whose reductions run in torch on ``device``.

    The node/token relation is a sparse ``(num_nodes, V)`` matrix with one entry
    per (ancestor, token) pair, so a batch of sums is one sparse-dense product and
    a batch of maxima one ``scatter_reduce``. ``device`` defaults to CUDA when it
    is available. Results are float64 numpy arrays, as with the Rust trie.
    """

    def __init__(self, decode: Sequence[bytes], device: str | torch.device | None = None):
        super().__init__(decode)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        parents = np.empty(self.num_nodes, dtype=np.int64)
        self._core.parents(address(parents))
        rows, cols = [], []
        nodes, tokens = self._token_nodes.copy(), np.arange(self.vocab_size)
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

    def _batch(self, ws: Any) -> torch.Tensor:
        batch = torch.as_tensor(ws).to(self.device, torch.float64)
        if batch.dim() != 2 or batch.shape[1] != self.vocab_size:
            raise ValueError(f"ws must have shape (B, {self.vocab_size}), not {tuple(batch.shape)}")
        if torch.isnan(batch).any():
            row, index = (int(i) for i in torch.nonzero(torch.isnan(batch))[0])
            raise ValueError(f"weights contain NaN (row {row}, token {index})")
        return batch

    def batch_weight_sum(self, ws: Any) -> np.ndarray:
        return torch.sparse.mm(self._matrix, self._batch(ws).T).T.cpu().numpy()

    def batch_weight_max(self, ws: Any) -> np.ndarray:
        batch = self._batch(ws)
        out = torch.full((batch.shape[0], self.num_nodes), -torch.inf, dtype=torch.float64, device=self.device)
        index = self._rows.expand(batch.shape[0], -1)
        out.scatter_reduce_(1, index, batch[:, self._cols], reduce="amax")
        return out.cpu().numpy()

    def weight_sum(self, ws: Any) -> np.ndarray:
        return self.batch_weight_sum(_row(ws))[0]

    def weight_max(self, ws: Any) -> np.ndarray:
        return self.batch_weight_max(_row(ws))[0]


def _row(ws: Any) -> torch.Tensor:
    row = torch.as_tensor(ws)
    if row.dim() != 1:
        raise ValueError(f"ws must have shape (V,), not {tuple(row.shape)}")
    return row.unsqueeze(0)
