"""TokenCharacterTrie against an independent reference, on a real vocabulary and
on random ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from genlm_anyio import TokenCharacterTrie, decode_vocab


@pytest.fixture(scope="module")
def gpt2_trie():
    vocab, _ = decode_vocab(load_tokenizer("gpt-2"))
    return vocab, TokenCharacterTrie(vocab)


def reference_under(vocab, prefix: bytes) -> np.ndarray:
    return np.array([i for i, t in enumerate(vocab) if bytes(t).startswith(prefix)], dtype=np.int64)


def test_reductions_match_reference_on_a_real_vocabulary(gpt2_trie):
    vocab, trie = gpt2_trie
    rng = np.random.default_rng(0)
    ws = rng.random(len(vocab))
    logws = np.log(ws)
    logws[rng.random(len(vocab)) < 0.3] = -np.inf
    sums, maxes, lses = trie.weight_sum(ws), trie.weight_max(ws), trie.weight_logsumexp(logws)
    assert sums.dtype == np.float64 and sums.shape == (trie.num_nodes,)
    prefixes = [b"", b"a", b" the", b"\n", b"Th", b"\xc3"] + [bytes(vocab[i])[:k] for i, k in zip(rng.integers(0, len(vocab), 40), rng.integers(1, 4, 40))]
    for prefix in prefixes:
        node = trie.node_of(prefix)
        under = reference_under(vocab, prefix)
        if node is None:
            assert len(under) == 0
            continue
        assert trie.prefix(node) == prefix
        np.testing.assert_array_equal(np.sort(trie.tokens_under(node)), under)
        assert sums[node] == pytest.approx(ws[under].sum(), rel=1e-12)
        assert maxes[node] == ws[under].max()
        finite = logws[under][np.isfinite(logws[under])]
        want = np.log(np.exp(finite).sum()) if len(finite) else -np.inf
        assert lses[node] == pytest.approx(want, rel=1e-12, abs=1e-12)
        np.testing.assert_array_equal(np.flatnonzero(trie.mask_startswith(prefix)), under)


def test_batches_equal_rows_and_inputs_of_every_float_type(gpt2_trie):
    vocab, trie = gpt2_trie
    ws = np.random.default_rng(1).random((3, len(vocab)))
    batch = trie.batch_weight_sum(ws)
    assert batch.shape == (3, trie.num_nodes)
    for r in range(3):
        np.testing.assert_allclose(batch[r], trie.weight_sum(ws[r]), rtol=1e-12)
    np.testing.assert_allclose(trie.batch_weight_max(ws)[1], trie.weight_max(ws[1]))
    np.testing.assert_allclose(trie.batch_weight_logsumexp(np.log(ws))[2], trie.weight_logsumexp(np.log(ws[2])), rtol=1e-12)
    want = trie.weight_sum(ws[0])
    for arr in (
        ws[0].astype(np.float32),
        ws[0].astype(np.float16),
        torch.tensor(ws[0]),
        torch.tensor(ws[0], dtype=torch.bfloat16),
        torch.tensor(ws[0], requires_grad=True),
        np.asfortranarray(np.stack([ws[0], ws[0]]))[0],
        ws[0][::-1].copy()[::-1],  # a negative-stride view
    ):
        np.testing.assert_allclose(trie.weight_sum(arr), want, rtol=1e-2)


def test_masks_on_a_real_vocabulary(gpt2_trie):
    vocab, trie = gpt2_trie
    data = b" the quick"
    mask = trie.mask_prefix_of(data)
    want = [i for i, t in enumerate(vocab) if data.startswith(bytes(t))]
    np.testing.assert_array_equal(np.flatnonzero(mask), want)
    assert mask.dtype == np.bool_ and mask.shape == (len(vocab),)
    # A DFA for lower-case ASCII words: state 0 --[a-z]--> 0; everything else dead.
    transitions = np.full((2, 256), 1, dtype=np.int32)
    transitions[0, ord("a") : ord("z") + 1] = 0
    live = np.array([True, False])
    mask = trie.dfa_mask(transitions, 0, live)
    want = [i for i, t in enumerate(vocab) if all(ord("a") <= b <= ord("z") for b in bytes(t))]
    np.testing.assert_array_equal(np.flatnonzero(mask), want)


def test_navigation(gpt2_trie):
    vocab, trie = gpt2_trie
    assert trie.root == 0 and trie.parent(0) is None and trie.prefix(0) == b""
    kids = trie.children(trie.root)
    assert len(kids) == 256  # every byte is a token in byte-level BPE
    th = trie.node_of(b"th")
    assert trie.children(trie.node_of(b"t"))[ord("h")] == th and trie.parent(th) == trie.node_of(b"t")
    the = [i for i, t in enumerate(vocab) if bytes(t) == b"the"][0]
    assert trie.token_node(the) == trie.node_of(b"the")
    assert trie.node_of(b"\xff\xfe\xfd") is None
    assert len(trie) == trie.num_nodes


vocabs = st.lists(st.binary(max_size=5).map(lambda b: bytes(x % 4 for x in b)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(vocab=vocabs, seed=st.integers(0, 2**32 - 1))
def test_random_vocabularies_against_reference(vocab, seed):
    trie = TokenCharacterTrie(vocab)
    ws = np.random.default_rng(seed).random(len(vocab))
    sums, maxes, lses = trie.weight_sum(ws), trie.weight_max(ws), trie.weight_logsumexp(np.log(ws))
    for node in range(trie.num_nodes):
        under = reference_under(vocab, trie.prefix(node))
        assert len(under) > 0
        assert sums[node] == pytest.approx(ws[under].sum())
        assert maxes[node] == ws[under].max()
        assert lses[node] == pytest.approx(np.log(ws[under].sum()))
        for data in (trie.prefix(node), trie.prefix(node) + b"\x00\x01"):
            want = [i for i, t in enumerate(vocab) if data.startswith(t)]
            np.testing.assert_array_equal(np.flatnonzero(trie.mask_prefix_of(data)), want)


def test_bad_input_raises_value_or_type_errors_naming_it(gpt2_trie):
    vocab, trie = gpt2_trie
    V = len(vocab)
    with pytest.raises(ValueError, match=r"ws must have shape \(50257,\)"):
        trie.weight_sum(np.ones(V - 1))
    with pytest.raises(ValueError, match=r"ws must have shape \(B, 50257\)"):
        trie.batch_weight_sum(np.ones(V))
    with pytest.raises(TypeError, match="ws must hold floats"):
        trie.weight_sum(np.ones(V, dtype=np.int64))
    nan = np.ones(V)
    nan[7] = np.nan
    with pytest.raises(ValueError, match="NaN.*token 7"):
        trie.weight_sum(nan)
    with pytest.raises(ValueError, match="NaN.*token 7"):
        trie.weight_max(nan)
    with pytest.raises(ValueError, match="NaN.*row 1, token 7"):
        trie.batch_weight_logsumexp(np.stack([np.ones(V), nan]))
    with pytest.raises(ValueError, match="node"):
        trie.children(trie.num_nodes)
    with pytest.raises(ValueError, match="node"):
        trie.prefix(-1)
    with pytest.raises(TypeError, match="node"):
        trie.tokens_under("0")
    with pytest.raises(ValueError, match="token_id"):
        trie.token_node(V)
    with pytest.raises(TypeError, match="prefix"):
        trie.node_of("th")
    with pytest.raises(ValueError, match="transitions"):
        trie.dfa_mask(np.zeros((2, 255), dtype=np.int32), 0, np.ones(2, bool))
    with pytest.raises(ValueError, match="transitions entries"):
        trie.dfa_mask(np.full((2, 256), 5), 0, np.ones(2, bool))
    with pytest.raises(ValueError, match="state"):
        trie.dfa_mask(np.zeros((2, 256), dtype=np.int32), 2, np.ones(2, bool))
    with pytest.raises(ValueError, match="live"):
        trie.dfa_mask(np.zeros((2, 256), dtype=np.int32), 0, np.ones(3, bool))
    with pytest.raises(TypeError, match="vocabulary entry 1 must be bytes"):
        TokenCharacterTrie([b"a", "b"])


def test_duplicates_and_empty_tokens():
    trie = TokenCharacterTrie([b"ab", b"", b"ab", b"a", b""])
    assert trie.num_nodes == 3
    np.testing.assert_array_equal(trie.weight_sum(np.array([1.0, 2.0, 4.0, 8.0, 16.0])), [31.0, 13.0, 5.0])
    np.testing.assert_array_equal(np.sort(trie.tokens_under(trie.root)), np.arange(5))
    assert trie.token_node(1) == trie.token_node(4) == trie.root
    np.testing.assert_array_equal(trie.mask_prefix_of(b""), [False, True, False, False, True])


def test_a_reused_batch_output_never_overwrites_a_result_in_use(gpt2_trie):
    vocab, trie = gpt2_trie
    rng = np.random.default_rng(5)
    a_in, b_in = rng.random((64, len(vocab))), rng.random((64, len(vocab)))
    a = trie.batch_weight_sum(a_in)
    assert a.nbytes >= 16 << 20  # large enough to be kept for reuse
    a_copy = a.copy()
    view = trie.batch_weight_sum(b_in)[3]  # only a view survives
    b_row = view.copy()
    c = trie.batch_weight_sum(a_in)
    np.testing.assert_array_equal(a, a_copy)
    np.testing.assert_array_equal(view, b_row)
    np.testing.assert_array_equal(c, a_copy)
    del a, c, view
    d = trie.batch_weight_sum(b_in)
    np.testing.assert_array_equal(d[3], b_row)


def test_parallel_trie_matches_the_rust_trie(gpt2_trie):
    from genlm_anyio.trie import ParallelTokenCharacterTrie

    vocab, trie = gpt2_trie
    parallel = ParallelTokenCharacterTrie(vocab, device="cpu")
    assert parallel.num_nodes == trie.num_nodes
    ws = np.random.default_rng(2).random((2, len(vocab)))
    np.testing.assert_allclose(parallel.batch_weight_sum(ws), trie.batch_weight_sum(ws), rtol=1e-10)
    np.testing.assert_array_equal(parallel.batch_weight_max(ws), trie.batch_weight_max(ws))
    np.testing.assert_allclose(parallel.weight_sum(torch.tensor(ws[0])), trie.weight_sum(ws[0]), rtol=1e-10)
    np.testing.assert_array_equal(parallel.weight_max(ws[1]), trie.weight_max(ws[1]))
    bad = ws.copy()
    bad[1, 9] = np.nan
    with pytest.raises(ValueError, match="row 1, token 9"):
        parallel.batch_weight_sum(bad)
    with pytest.raises(ValueError, match="shape"):
        parallel.weight_sum(ws)


@pytest.mark.parametrize("library", ["asyncio", "trio"])
@pytest.mark.parametrize("backend", ["rust", "parallel"])
def test_async_trie_batches_concurrent_reductions(gpt2_trie, library, backend):
    import anyio

    from genlm_anyio.trie import AsyncTokenCharacterTrie

    vocab, trie = gpt2_trie
    ws = np.random.default_rng(3).random((12, len(vocab)))
    kwargs = {"device": "cpu"} if backend == "parallel" else {}
    atrie = AsyncTokenCharacterTrie.from_vocab(vocab, backend=backend, **kwargs) if backend == "parallel" else AsyncTokenCharacterTrie(trie)
    results: dict[tuple[str, int], np.ndarray] = {}
    errors = []

    async def one(op, i):
        results[op, i] = await getattr(atrie, f"weight_{op}")(ws[i])

    async def bad():
        try:
            await atrie.weight_sum(np.ones(3))
        except ValueError as exc:
            errors.append(exc)

    async def main():
        async with atrie:
            async with anyio.create_task_group() as tg:
                for i in range(12):
                    tg.start_soon(one, "sum" if i % 3 else "max", i)
                tg.start_soon(bad)

    anyio.run(main, backend=library)
    assert len(errors) == 1 and "shape" in str(errors[0])
    assert atrie.batch_stats.batches == 1 and atrie.batch_stats.largest_batch == 12
    for (op, i), got in results.items():
        want = trie.weight_sum(ws[i]) if op == "sum" else trie.weight_max(ws[i])
        np.testing.assert_allclose(got, want, rtol=1e-10)
    with pytest.raises(ValueError, match="backend"):
        AsyncTokenCharacterTrie.from_vocab(vocab, backend="gpu")
