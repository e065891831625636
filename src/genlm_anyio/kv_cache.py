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

import heapq
from collections import OrderedDict
from dataclasses import dataclass

import torch

# How many recent lookups (and slot lists) are remembered, and how far short of a
# lookup's length a remembered prefix is tried (an extension by k tokens finds
# the sequence it extends k positions back).
_REMEMBERED = 1024
_LOOKBACK = 8


class _Node:
    __slots__ = ("children", "last_used", "parent", "pins", "slot", "token")

    def __init__(self, parent: _Node | None, token: int, slot: int):
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
        self.keys = torch.zeros(
            (self._size, self.layers, self.heads, self.head_dim), dtype=self.dtype, device=self.device
        )
        self.values = torch.zeros_like(self.keys)
        self._free = list(range(self._size - 1, 0, -1))
        self.stats.in_use = 0
        # Recent lookups, so that a long cached prefix is found by hashing its ids
        # rather than by a walk of one dict lookup per token: prefix ids -> node,
        # and node -> its slots from the root.
        self._found: OrderedDict[tuple[int, ...], _Node] = OrderedDict()
        self._slot_rows: OrderedDict[_Node, list[int]] = OrderedDict()

    # -- lookup ---------------------------------------------------------------------
    def _deepest(self, ids: tuple[int, ...], limit: int) -> tuple[_Node, int, list[_Node]]:
        """The deepest cached node along ``ids[:limit]``, its depth, and the nodes
        walked to reach it (past a remembered prefix: none of the nodes above it)."""
        node, depth = self.root, 0
        for back in range(min(limit, _LOOKBACK) + 1):
            found = self._found.get(ids[: limit - back]) if limit - back > 0 else None
            if found is not None and found.parent is not None:  # still in the trie
                node, depth = found, limit - back
                break
        walked = []
        while depth < limit:
            child = node.children.get(ids[depth])
            if child is None:
                break
            node, depth = child, depth + 1
            walked.append(node)
        return node, depth, walked

    def match(self, ids: tuple[int, ...], limit: int) -> tuple[_Node, int]:
        """The deepest cached node along ``ids[:limit]``, and its depth; marks it used."""
        node, depth, walked = self._deepest(ids, limit)
        self._clock += 1
        node.last_used = self._clock
        for passed in walked:
            passed.last_used = self._clock
        if depth:
            self._found[ids[:depth]] = node
            self._found.move_to_end(ids[:depth])
            if len(self._found) > _REMEMBERED:
                self._found.popitem(last=False)
        return node, depth

    def cached_length(self, ids: tuple[int, ...], limit: int) -> int:
        """The depth :meth:`match` would find, without marking any node used (a
        lookup from any thread that changes nothing: the batcher sizes requests by it)."""
        return self._deepest(ids, limit)[1]

    def slots(self, node: _Node) -> list[int]:
        """The slots of the prefix ending at ``node``, in order."""
        end = node
        out: list[int] = []
        while node.parent is not None:
            known = self._slot_rows.get(node)
            if known is not None:
                out.extend(reversed(known))
                break
            out.append(node.slot)
            node = node.parent
        out.reverse()
        if out:
            self._slot_rows[end] = out
            self._slot_rows.move_to_end(end)
            if len(self._slot_rows) > _REMEMBERED:
                self._slot_rows.popitem(last=False)
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
    def _grow(self, count: int) -> None:
        """Double the pool (up to the budget) until ``count`` slots are free."""
        size = self._size
        while size - 1 - self.stats.in_use < count and size < self.capacity:
            size = min(self.capacity, size * 2)
        if size == self._size:
            return
        pad = (size - self._size, self.layers, self.heads, self.head_dim)
        self.keys = torch.cat([self.keys, torch.zeros(pad, dtype=self.dtype, device=self.device)])
        self.values = torch.cat([self.values, torch.zeros(pad, dtype=self.dtype, device=self.device)])
        self._free.extend(range(size - 1, self._size - 1, -1))
        self._size = size

    def _evict(self, count: int) -> None:
        """Evict least recently used unpinned leaves until ``count`` slots are free.

        A parent left childless becomes a leaf in its turn (it was used at least as
        recently as its children), so one walk of the trie serves the whole eviction.
        """
        order, stack = [], [self.root]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        # Children come after their parent in ``order``: walking it backwards sees
        # whether a node holds a pin below it before reaching the node.
        protected: set[int] = set()
        heap: list[tuple[int, int, _Node]] = []
        for node in reversed(order):
            for child in node.children.values():
                # Lookups mark only the nodes they walk: a node is as recent as its subtree.
                node.last_used = max(node.last_used, child.last_used)
            if node.pins or any(id(child) in protected for child in node.children.values()):
                protected.add(id(node))
            elif not node.children and node.parent is not None:
                heap.append((node.last_used, id(node), node))
        if len(self._free) + len(order) - 1 - len(protected - {id(self.root)}) < count:
            raise MemoryError(
                f"the KV cache budget ({self.capacity} tokens) is too small for one batch beside the "
                "pinned prefixes; raise kv_cache_bytes or lower max_batch_tokens"
            )
        heapq.heapify(heap)
        while len(self._free) < count:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None  # the root is never in the heap
            del parent.children[node.token]
            node.parent = None  # out of the trie: remembered lookups of it are stale
            self._free.append(node.slot)
            self.stats.tokens_evicted += 1
            self.stats.in_use -= 1
            if not parent.children and parent.parent is not None and parent.pins == 0:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))

    def _allocate(self, count: int) -> list[int]:
        """``count`` free slots, growing the pool or else evicting; MemoryError if it cannot."""
        if len(self._free) < count:
            self._grow(count)
        if len(self._free) < count:
            self._evict(count)
        slots = [self._free.pop() for _ in range(count)]
        self.stats.in_use += count
        return slots

    def store(self, paths: list[tuple[_Node, list[int]]], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the keys and values of each path of ``tokens`` below its ``node``.

        ``keys`` and ``values`` are ``(tokens, layers, heads, head_dim)``: the rows
        of every path, in order. All or nothing: the slots are allocated, written
        and linked into the trie in one step, and given back if any part fails.
        A token some path already holds (stored meanwhile) keeps its slot.

        Raises:
            MemoryError: the budget cannot hold the new tokens beside the pinned ones
                (nothing is stored).
        """
        count = sum(len(tokens) for _, tokens in paths)
        if count == 0:
            return
        for node, _ in paths:  # the anchors must outlive the eviction
            node.pins += 1
        try:
            slots = self._allocate(count)
        finally:
            for node, _ in paths:
                node.pins -= 1
        created: list[_Node] = []
        try:
            self._write(slots, keys, values)
            offset = 0
            for node, tokens in paths:
                for token, slot in zip(tokens, slots[offset : offset + len(tokens)]):
                    child = node.children.get(token)
                    if child is None:
                        child = _Node(node, token, slot)
                        child.last_used = self._clock
                        node.children[token] = child
                        created.append(child)
                    node = child
                offset += len(tokens)
        except BaseException:
            for node in reversed(created):
                assert node.parent is not None  # created below a path's node
                del node.parent.children[node.token]
            created.clear()
            raise
        finally:
            owned = {node.slot for node in created}
            unused = [slot for slot in slots if slot not in owned]
            self._free.extend(unused)
            self.stats.in_use -= len(unused)
            self.stats.tokens_stored += len(created)

    def forget(self, first_tokens: range) -> int:
        """Drop every prefix whose first token lies in ``first_tokens`` (unpinned
        ones: a running request keeps its path) and free their slots; returns how many."""
        freed = 0
        for token in [t for t in self.root.children if t in first_tokens]:
            stack, doomed = [self.root.children[token]], []
            while stack:
                node = stack.pop()
                doomed.append(node)
                stack.extend(node.children.values())
            if any(node.pins for node in doomed):
                continue
            del self.root.children[token]
            for node in doomed:
                node.parent = None
            self._free.extend(node.slot for node in doomed)
            freed += len(doomed)
        self.stats.in_use -= freed
        return freed

    def _write(self, slots: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        if keys.shape[0] != len(slots) or values.shape[0] != len(slots):
            raise ValueError(f"{len(slots)} slots, but {keys.shape[0]} key rows and {values.shape[0]} value rows")
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.keys.index_copy_(0, index, keys.to(self.dtype))
        self.values.index_copy_(0, index, values.to(self.dtype))
