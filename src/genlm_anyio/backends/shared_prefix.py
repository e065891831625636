"""Attention over a prefix that many rows of a batch share, read once.

The shape of sequential Monte Carlo is many short suffixes over one long shared
prompt. Gathering every row's whole past into a padded tensor copies the prompt's
keys and values once per row, and attention then reads each copy. Here the rows
of a batch are split into *groups* that share a cached prefix: the group's prefix
keys and values are gathered once, every query of every row of the group is
scored against them in one matrix product, and each row's own part (its cached
suffix after the shared prefix, plus its new tokens) is attended separately. The
two partial softmaxes are merged exactly through their log-sum-exp (the idea of
Hydragen and of cascade attention): the result is the plain attention, up to
float rounding.

This module plans the groups (:func:`plan`) and computes the attention of one
layer (:func:`attend`); it knows nothing of any engine. The transformers engine
wires it in through transformers' attention-function registry
(:mod:`genlm_anyio.backends.hf`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Below this many prefix tokens saved (rows beyond the first times the shared
# length), a pass runs on the model's own attention: short prompts gain nothing.
MIN_SAVED_TOKENS = 256
# Most elements of one layer's score matrix over the rows' own parts (float32):
# a pass whose new tokens are many (a long new prompt) runs on the model's own,
# memory-efficient attention instead.
MAX_OWN_SCORES = 1 << 26


@dataclass(frozen=True)
class Group:
    """Rows of a batch whose pasts start with the same cached prefix."""

    rows: list[int]
    """Batch rows, ascending."""
    slots: list[int]
    """The KV slots of the shared prefix, in order."""


@dataclass(frozen=True)
class Plan:
    """How one forward pass splits its rows' pasts: shared prefixes and own parts."""

    groups: list[Group]
    own: list[list[int]]
    """Per row, the slots of its past after its group's shared prefix (its whole past outside a group)."""

    @property
    def own_length(self) -> int:
        """The longest own past: the width of the padded per-row past."""
        return max(len(o) for o in self.own)


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the common prefix of ``a`` and ``b``."""
    limit = min(len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    lo, hi = 0, limit  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisect with C-speed slice comparisons
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _groups(rows: list[int], past: Sequence[Sequence[int]]) -> list[Group]:
    """Split ``rows`` into groups, each the rows that share the prefix saving the most
    token reads ((members - 1) x length) among those shared with the longest past left."""
    groups = []
    while len(rows) >= 2:
        ref = past[max(rows, key=lambda r: len(past[r]))]
        common = {r: common_length(ref, past[r]) for r in rows}
        # With lengths sorted longest first, the i-th length is shared by i + 1 rows.
        lengths = sorted(common.values(), reverse=True)
        count, length = max(enumerate(lengths, 1), key=lambda c: (c[0] - 1) * c[1])
        if count < 2 or length == 0:
            break
        groups.append(Group([r for r in rows if common[r] >= length], list(ref[:length])))
        rows = [r for r in rows if common[r] < length]
    return groups


def plan(past: Sequence[Sequence[int]]) -> Plan | None:
    """Group the rows of a pass by the cached prefixes their pasts (KV slot lists) share.

    Slots are owned by one trie node each, so equal slot prefixes are one cached
    prefix (rows under different LoRA adapters never share a slot). A group shares
    one prefix, the longest common to all of its rows; a row in no group keeps its
    whole past as its own. Returns None where sharing would save fewer than
    :data:`MIN_SAVED_TOKENS` token reads.
    """
    groups = _groups([r for r, slots in enumerate(past) if slots], past)
    if sum((len(g.rows) - 1) * len(g.slots) for g in groups) < MIN_SAVED_TOKENS:
        return None
    own = [list(p) for p in past]
    for group in groups:
        for row in group.rows:
            own[row] = own[row][len(group.slots) :]
    return Plan(groups, own)


def own_mask(own_lengths: Sequence[int], own_width: int, new_width: int, device: torch.device) -> torch.Tensor:
    """Which keys of the per-row part each new position sees: ``(rows, new_width, own_width + new_width)``.

    Row ``b`` sees its own cached keys (the first ``own_lengths[b]`` of the padded
    ``own_width``) and its new keys up to and including the query's position.
    """
    keys = torch.arange(own_width, device=device)
    past = keys[None, :] < torch.tensor(list(own_lengths), device=device)[:, None]  # (rows, own_width)
    causal = torch.ones((new_width, new_width), dtype=torch.bool, device=device).tril()
    rows = len(own_lengths)
    return torch.cat([past[:, None, :].expand(rows, new_width, own_width), causal.expand(rows, -1, -1)], dim=-1)


def _partial(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One part of a softmax: its row maxima, its unnormalised output and its sums."""
    top = scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores - top)
    return top, weights @ values, weights.sum(dim=-1, keepdim=True)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    shared: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    scaling: float,
) -> torch.Tensor:
    """Attention of one layer over shared prefixes and each row's own keys.

    Args:
        query: ``(rows, heads, new, dim)``.
        key, value: each row's own keys and values, ``(rows, kv_heads, own + new, dim)``.
        mask: :func:`own_mask`'s ``(rows, new, own + new)``.
        shared: per group, ``(rows, keys, values)``: a row index tensor and the
            group's prefix keys and values, each ``(kv_heads, prefix, dim)``.
        scaling: the softmax scale.

    Returns:
        ``(rows, new, heads, dim)``, in the query's dtype (computed in float32).
    """
    rows, heads, new, dim = query.shape
    kv_heads = key.shape[1]
    per_kv = heads // kv_heads
    # Query heads h * per_kv ... (h + 1) * per_kv - 1 read kv head h (grouped-query attention).
    q = query.float().reshape(rows, kv_heads, per_kv * new, dim)
    scores = q @ key.float().transpose(-1, -2) * scaling  # (rows, kv_heads, per_kv * new, own + new)
    visible = mask[:, None, None].expand(rows, 1, per_kv, new, mask.shape[-1]).reshape(rows, 1, per_kv * new, -1)
    scores.masked_fill_(~visible, float("-inf"))
    top, out, total = _partial(scores, value.float())  # every row sees its newest key: top is finite
    del scores
    for index, prefix_keys, prefix_values in shared:
        count = index.shape[0]
        # Every query of the group's rows against the prefix, in one product per kv head.
        qg = q.index_select(0, index).transpose(0, 1).reshape(kv_heads, count * per_kv * new, dim)
        top_s, out_s, total_s = _partial(qg @ prefix_keys.float().transpose(-1, -2) * scaling, prefix_values.float())
        # (kv_heads, count * queries, .) -> (count, kv_heads, queries, .), as the rows' own parts.
        top_s, out_s, total_s = (
            t.reshape(kv_heads, count, per_kv * new, -1).transpose(0, 1) for t in (top_s, out_s, total_s)
        )
        top_o = top.index_select(0, index)
        both = torch.maximum(top_o, top_s)
        scale_o, scale_s = torch.exp(top_o - both), torch.exp(top_s - both)
        out.index_copy_(0, index, out.index_select(0, index) * scale_o + out_s * scale_s)
        total.index_copy_(0, index, total.index_select(0, index) * scale_o + total_s * scale_s)
        top.index_copy_(0, index, both)
    return (out / total).reshape(rows, heads, new, dim).transpose(1, 2).to(query.dtype).contiguous()
