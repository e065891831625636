"""The prefix KV cache's slot pool: growth up to the budget, eviction, pins and
all-or-nothing stores (property-tested), and, on SmolLM2, what it saves per step."""

from __future__ import annotations

import random

import anyio
import pytest
import torch
from helpers import ask_concurrently
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from references import assert_close_to, transformers_logprobs

from genlm_anyio import kv_cache
from genlm_anyio.kv_cache import PrefixKVCache
from tools import assets

SHAPE = (1, 1, 2)  # layers, heads, head_dim
PER_TOKEN = 2 * 1 * 1 * 2 * 4  # keys and values, float32
ONE_GIB_OF_SMOLLM2 = (1 << 30) // (2 * 30 * 3 * 64 * 4)  # tokens: the default budget on SmolLM2


def pool(capacity: int) -> PrefixKVCache:
    return PrefixKVCache(SHAPE, torch.float32, torch.device("cpu"), capacity * PER_TOKEN)


def path_of(node) -> tuple[int, ...]:
    out = []
    while node.parent is not None:
        out.append(node.token)
        node = node.parent
    return tuple(reversed(out))


def mark(prefix_mark: int, token: int) -> int:
    """The value stored for ``token`` after a prefix marked ``prefix_mark``: a rolling
    hash of the whole prefix, as a token's keys and values depend on its prefix."""
    return (prefix_mark * 31 + token + 1) % (1 << 20)


def mark_of(path: tuple[int, ...]) -> int:
    h = 0
    for token in path:
        h = mark(h, token)
    return h


def store(cache: PrefixKVCache, node, tokens: list[int]) -> None:
    h, marks = mark_of(path_of(node)), []
    for token in tokens:
        h = mark(h, token)
        marks.append(float(h))
    data = torch.tensor(marks).view(-1, 1, 1, 1).expand(-1, *SHAPE).contiguous()
    cache.store([(node, tokens)], data, data)


def nodes(cache: PrefixKVCache) -> list:
    out, stack = [], [cache.root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


def check_invariants(cache: PrefixKVCache) -> None:
    """The pool within its budget, every slot owned by exactly one node or free, each
    node's slot holding its own prefix's values."""
    members, marks, stack = [], [], [(cache.root, 0)]
    while stack:
        node, h = stack.pop()
        for token, child in node.children.items():
            members.append(child)
            marks.append(mark(h, token))
            stack.append((child, marks[-1]))
    assert cache._size <= cache.capacity and cache.keys.shape[0] == cache.values.shape[0] == cache._size
    assert cache.keys.numel() * 4 * 2 <= cache.capacity * PER_TOKEN
    owned = [n.slot for n in members]
    assert len(owned) == cache.stats.in_use
    assert len(cache._free) + cache.stats.in_use == cache._size - 1
    assert sorted(owned + cache._free) == list(range(1, cache._size))
    if members:
        want = torch.tensor(marks, dtype=torch.float32)
        assert torch.equal(cache.keys[[n.slot for n in members], 0, 0, 0], want)


# -- the regressions ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "count", [1, 1023, 1024, 1500, 2044, 2049, 2050, 3000, 3070, 4096, 8000, ONE_GIB_OF_SMOLLM2 - 1]
)
def test_an_empty_pool_stores_any_batch_below_its_budget(count):
    """Defect 3: growth compared the free slots with the *extra* slots needed, so on
    an empty 1 GiB pool batches of 1,024-2,044 and 2,050-3,070 tokens were refused."""
    cache = pool(ONE_GIB_OF_SMOLLM2)
    store(cache, cache.root, list(range(count)))
    assert cache.stats.in_use == cache.stats.tokens_stored == count and cache.stats.tokens_evicted == 0
    check_invariants(cache)


def test_a_batch_beside_cached_tokens_grows_the_pool_instead_of_evicting():
    cache = pool(ONE_GIB_OF_SMOLLM2)
    store(cache, cache.root, [1] * 2100)
    store(cache, cache.root, [2] * 3000)
    assert cache.stats.tokens_evicted == 0 and cache.stats.in_use == 5100
    check_invariants(cache)


def test_a_batch_larger_than_the_budget_is_refused_and_changes_nothing():
    cache = pool(100)
    store(cache, cache.root, [1] * 60)
    with pytest.raises(MemoryError, match="too small"):
        store(cache, cache.root, [2] * 100)
    assert cache.stats.in_use == 60 and cache.stats.tokens_evicted == 0
    check_invariants(cache)


def test_a_failed_write_gives_its_slots_back():
    """Defect 6: slots were counted as used before the write; a fault in between
    left them owned by nobody until clear_cache()."""
    cache = pool(100)
    store(cache, cache.root, [1, 2, 3])
    bad = torch.zeros((2, *SHAPE))  # two rows for three tokens
    with pytest.raises(ValueError, match="3 slots"):
        cache.store([(cache.root, [4, 5, 6])], bad, bad)
    assert cache.stats.in_use == 3
    check_invariants(cache)


def test_a_failure_while_linking_unlinks_and_gives_everything_back(monkeypatch):
    cache = pool(100)
    store(cache, cache.root, [1, 2])
    made = []

    class Faulty(kv_cache._Node):
        __slots__ = ()

        def __init__(self, *args):
            if len(made) == 3:
                raise MemoryError("out of Python memory")
            made.append(self)
            super().__init__(*args)

    monkeypatch.setattr(kv_cache, "_Node", Faulty)
    with pytest.raises(MemoryError, match="Python"):
        store(cache, cache.root.children[1], [7, 8, 9, 10])
    assert len(made) == 3 and cache.stats.in_use == 2 and cache.stats.tokens_stored == 2
    check_invariants(cache)


# -- the property test ---------------------------------------------------------------------
op = st.one_of(
    # (what, which node, how many tokens, which tokens): few distinct tokens, so paths overlap.
    st.tuples(st.just("store"), st.integers(0, 10**6), st.integers(1, 2500), st.integers(0, 5)),
    st.tuples(st.just("pin"), st.integers(0, 10**6), st.just(0), st.just(0)),
    st.tuples(st.just("unpin"), st.integers(0, 10**6), st.just(0), st.just(0)),
    st.tuples(st.just("clear"), st.just(0), st.just(0), st.just(0)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(capacity=st.integers(2, 3000), ops=st.lists(op, max_size=12))
def test_the_pool_never_refuses_below_its_budget_nor_exceeds_it_nor_evicts_a_pin(capacity, ops):
    cache = pool(capacity)
    pinned: list = []
    for kind, pick, length, seed in ops:
        members = nodes(cache)
        if kind == "store":
            tokens = [(seed * (i // 5 + 1)) % 3 for i in range(length)]
            anchor = members[pick % len(members)]
            # What no eviction may take: the pinned nodes, their ancestors, the anchor's path.
            protected = {id(n) for p in pinned + [anchor] for n in _ancestry(p)}
            room = capacity - 1 - len(protected)
            used, evicted = cache.stats.in_use, cache.stats.tokens_evicted
            try:
                store(cache, anchor, tokens)
            except MemoryError:
                assert len(tokens) > room, "refused a batch that eviction could make room for"
                assert (cache.stats.in_use, cache.stats.tokens_evicted) == (used, evicted), "evicted, then refused"
            else:
                assert len(tokens) <= room
                if used + len(tokens) <= capacity - 1:
                    assert cache.stats.tokens_evicted == evicted, "evicted below the budget"
        elif kind == "pin" and len(members) > 1:
            node = members[1 + pick % (len(members) - 1)]
            cache.pin(node, +1)
            pinned.append(node)
        elif kind == "unpin" and pinned:
            cache.pin(pinned.pop(pick % len(pinned)), -1)
        elif kind == "clear" and not pinned:
            cache.clear()
        for node in pinned:
            assert _reachable(cache, node), "a pinned node was evicted"
        check_invariants(cache)


def _ancestry(node) -> list:
    """``node`` and its ancestors below the root."""
    out = []
    while node.parent is not None:
        out.append(node)
        node = node.parent
    return out


def _reachable(cache: PrefixKVCache, node) -> bool:
    walk = cache.root
    for token in path_of(node):
        walk = walk.children.get(token)
        if walk is None:
            return False
    return walk is node


# -- on the real model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genlm_anyio import AsyncTransformer

    path = assets.smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with AsyncTransformer(model, AutoTokenizer.from_pretrained(path), logprob_cache_size=0) as lm:
        yield lm


@pytest.mark.slow  # loads SmolLM2's weights
def test_128_distinct_prompts_are_cached_and_each_step_computes_128_tokens(smollm2):
    """Defect 3 on SmolLM2: 128 distinct prompts (2,700 tokens) stored no KV, and
    every later step recomputed them all instead of one token per sequence."""
    lm = smollm2
    lm.clear_cache()
    rng = random.Random(3)
    # Distinct first tokens: no prefix is shared, so all of them are new KV.
    seqs = [[1000 + 97 * i] + [rng.randrange(1000, 40000) for _ in range(20)] for i in range(128)]
    prompt_tokens = sum(map(len, seqs))
    assert prompt_tokens > 2048  # beyond the pool's first size and its first doubling
    before = lm.compute_stats.tokens_computed
    lm.batch_next_token_logprobs_sync(seqs)
    assert lm.compute_stats.tokens_computed - before == prompt_tokens
    assert lm.kv_cache.stats.in_use == prompt_tokens and lm.kv_cache.stats.tokens_evicted == 0

    for token in (11, 12):
        seqs = [s + [token] for s in seqs]
        before = lm.compute_stats.tokens_computed
        out = anyio.run(ask_concurrently, lm, seqs)
        assert lm.compute_stats.tokens_computed - before == 128
    for s, got in list(zip(seqs, out))[::43]:
        assert_close_to(transformers_logprobs(lm.model, s), got, f"{len(s)} tokens")


@pytest.mark.slow  # loads SmolLM2's weights
def test_a_fault_while_storing_leaves_no_slot_owned_by_nobody(smollm2, monkeypatch):
    """Defect 6 on SmolLM2: a fault after the slots were taken leaked them."""
    from genlm_anyio.backends import hf

    lm = smollm2
    lm.clear_cache()
    lm.next_token_logprobs_sync(lm.tokenizer.encode("A cached prompt"))
    stored = lm.kv_cache.stats.in_use

    def broken(cache, layer):
        raise RuntimeError("device fault while reading the new keys")

    monkeypatch.setattr(hf, "_layer_kv", broken)
    with pytest.raises(RuntimeError, match="device fault"):
        lm.next_token_logprobs_sync(lm.tokenizer.encode("Another prompt, not cached"))
    monkeypatch.undo()
    cache = lm.kv_cache
    assert cache.stats.in_use == stored == len(nodes(cache)) - 1
    assert len(cache._free) + cache.stats.in_use == cache._size - 1
    ids = lm.tokenizer.encode("Another prompt, not cached")
    assert_close_to(transformers_logprobs(lm.model, ids), lm.next_token_logprobs_sync(ids), "after the fault")
