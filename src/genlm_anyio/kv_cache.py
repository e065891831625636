"""A prefix cache of attention keys and values, shared by all sequences.

Every cached token is a node of a token trie (its path from the root is the
token's prefix) owning one slot of a preallocated pool, per layer, for its key
and value vectors. A request finds its longest cached prefix by walking the
trie, gathers that prefix's slots into the past of a batched forward pass, and
stores the keys and values of the tokens it computed in fresh slots.

The pool has a fixed budget of bytes; when it runs out, the least recently used
leaves that no running request has pinned are evicted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class _Node:
    __slots__ = ("parent", "token", "slot", "children", "last_used", "pins")

    def __init__(self, parent: "_Node | None", token: int, slot: int):
        self.parent = parent
        self.token = token
        self.slot = slot
        self.children: dict[int, _Node] = {}
        self.last_used = 0
        self.pins = 0


@dataclass
class CacheStats:
    """Counters of a :class:`PrefixKVCache`."""

    tokens_stored: int = 0
    tokens_evicted: int = 0
    prefix_tokens_reused: int = 0
    """Tokens a request found cached instead of computing them."""
    capacity_tokens: int = 0
    in_use: int = 0
    """Slots holding a token now."""


class PrefixKVCache:
    """Keys and values of token prefixes in a slot pool of ``budget_bytes``.

    ``shape`` is ``(layers, kv_heads, head_dim)``; the pool grows (by doubling)
    up to the budget, so an unused budget costs nothing.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, budget_bytes: int):
        self.layers, self.heads, self.head_dim = shape
        self.dtype, self.device = dtype, device
        bytes_per_token = 2 * self.layers * self.heads * self.head_dim * torch.finfo(dtype).bits // 8
        self.capacity = int(budget_bytes // bytes_per_token)
        if self.capacity < 2:
            raise ValueError(f"kv_cache_bytes={budget_bytes} holds fewer than 2 tokens ({bytes_per_token} bytes each)")
        self.stats = CacheStats(capacity_tokens=self.capacity)
        self.clear()

    def clear(self) -> None:
        """Forget every prefix and release the pool."""
        self.root = _Node(None, -1, -1)
        self._clock = 0
        self._size = min(self.capacity, 1024)
        # Slot 0 is all zeros: the padding of gathered pasts.
        # Slot-major, so that gathering or storing a token moves one contiguous row.
        self.keys = torch.zeros((self._size, self.layers, self.heads, self.head_dim), dtype=self.dtype, device=self.device)
        self.values = torch.zeros_like(self.keys)
        self._free = list(range(self._size - 1, 0, -1))
        self.stats.in_use = 0

    # -- lookup ---------------------------------------------------------------------
    def match(self, ids: tuple[int, ...], limit: int) -> tuple[_Node, int]:
        """The deepest cached node along ``ids[:limit]``, and its depth."""
        node, depth = self.root, 0
        self._clock += 1
        while depth < limit:
            child = node.children.get(ids[depth])
            if child is None:
                break
            node, depth = child, depth + 1
            node.last_used = self._clock
        return node, depth

    @staticmethod
    def slots(node: _Node) -> list[int]:
        """The slots of the prefix ending at ``node``, in order."""
        out = []
        while node.parent is not None:
            out.append(node.slot)
            node = node.parent
        out.reverse()
        return out

    def pin(self, node: _Node, delta: int) -> None:
        """Protect (``+1``) or release (``-1``) ``node`` and so its ancestors from eviction."""
        node.pins += delta

    def gather(self, slot_rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values of several prefixes, right-padded with the
        zero slot: two ``(layers, batch, heads, length, head_dim)`` tensors."""
        length = max(len(r) for r in slot_rows)
        index = torch.zeros((len(slot_rows), length), dtype=torch.long)
        for b, row in enumerate(slot_rows):
            index[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        flat = index.view(-1).to(self.device)
        shape = (len(slot_rows), length, self.layers, self.heads, self.head_dim)
        # (batch, length, layers, heads, dim) -> (layers, batch, heads, length, dim)
        keys = self.keys.index_select(0, flat).view(shape).permute(2, 0, 3, 1, 4)
        values = self.values.index_select(0, flat).view(shape).permute(2, 0, 3, 1, 4)
        return keys, values

    # -- storing --------------------------------------------------------------------
    def _grow(self, needed: int) -> None:
        size = self._size
        while size - self.stats.in_use - 1 < needed and size < self.capacity:
            size = min(self.capacity, size * 2)
        if size == self._size:
            return
        pad = (size - self._size, self.layers, self.heads, self.head_dim)
        self.keys = torch.cat([self.keys, torch.zeros(pad, dtype=self.dtype, device=self.device)])
        self.values = torch.cat([self.values, torch.zeros(pad, dtype=self.dtype, device=self.device)])
        self._free.extend(range(size - 1, self._size - 1, -1))
        self._size = size

    def _evict(self, needed: int) -> None:
        """Free at least ``needed`` slots, least recently used unpinned leaves first."""
        while len(self._free) < needed:
            leaves = []
            stack = [self.root]
            while stack:
                node = stack.pop()
                if node.children:
                    stack.extend(node.children.values())
                elif node.parent is not None and node.pins == 0:
                    leaves.append(node)
            if not leaves:
                raise MemoryError(
                    f"the KV cache budget ({self.capacity} tokens) is too small for one batch; "
                    "raise kv_cache_bytes or lower max_batch_tokens"
                )
            leaves.sort(key=lambda n: n.last_used)
            # Evict a good share at once: each scan walks the whole trie.
            for node in leaves[: max(needed - len(self._free), len(leaves) // 4, 1)]:
                del node.parent.children[node.token]
                self._free.append(node.slot)
                self.stats.tokens_evicted += 1
                self.stats.in_use -= 1

    def allocate(self, count: int) -> list[int]:
        """``count`` free slots (growing the pool or evicting as needed)."""
        if len(self._free) < count:
            self._grow(count - len(self._free))
        if len(self._free) < count:
            self._evict(count)
        slots = [self._free.pop() for _ in range(count)]
        self.stats.in_use += count
        return slots

    def extend(self, node: _Node, tokens: list[int], slots: list[int]) -> _Node:
        """Add the path ``tokens`` below ``node``, owning ``slots``; returns its end."""
        for token, slot in zip(tokens, slots):
            child = _Node(node, token, slot)
            child.last_used = self._clock
            node.children[token] = child
            node = child
        self.stats.tokens_stored += len(tokens)
        return node

    def write(self, slots: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``(len(slots), layers, heads, head_dim)`` keys and values in ``slots``."""
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.keys.index_copy_(0, index, keys.to(self.dtype))
        self.values.index_copy_(0, index, values.to(self.dtype))
