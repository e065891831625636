"""TokenCharacterTrie against genlm-backend 0.3.1's trie (the layout reference)
and against brute force, on real vocabularies and on random ones."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import load_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from genlm_anyio import Token, TokenCharacterTrie, decode_vocab
from genlm_anyio.batching import ClosedError
from genlm_anyio.compat import legacy
from genlm_anyio.lifetime import Closeable
from genlm_anyio.trie import AsyncTokenCharacterTrie, ParallelTokenCharacterTrie


class EndOfSequence:
    """Like genlm-control's end-of-sequence symbol: a hashable that iterates to itself."""

    def __init__(self, name: str = "EOS"):
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EndOfSequence) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __iter__(self):
        return iter([self])

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(scope="module")
def gpt2_trie():
    vocab, _ = decode_vocab(load_tokenizer("gpt-2"))
    return vocab, TokenCharacterTrie(vocab)


def reference_under(vocab, prefix: bytes) -> np.ndarray:
    return np.array([i for i, t in enumerate(vocab) if bytes(t).startswith(prefix)], dtype=np.int64)


def genlm_backend_trie(vocab):
    """genlm-backend's own trie of ``vocab`` (its Token class in place of ours)."""
    from genlm.backend.tokenization import Token as BackendToken
    from genlm.backend.trie import TokenCharacterTrie as BackendTrie

    theirs = [BackendToken(t.token_id, bytes(t)) if isinstance(t, Token) else t for t in vocab]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return BackendTrie(theirs)


def assert_same_as_genlm_backend(vocab, trie, ws):
    ref = genlm_backend_trie(vocab)
    assert trie.num_nodes == len(trie.children) == len(ref.children)
    assert trie.root == ref.root
    assert list(trie.children) == ref.children  # same nodes, edges, numbering and dict order
    assert trie.word2leaf == ref.word2leaf and trie.leaf2word == ref.leaf2word
    np.testing.assert_array_equal(trie.idx_to_leaf, ref.idx_to_leaf)
    assert trie.idx_to_leaf.dtype == np.int32
    np.testing.assert_array_equal(trie.ordering, ref.ordering)
    assert dict(trie.node2prefix) == ref.node2prefix
    assert all(np.array_equal(a, b) for a, b in zip(trie.jump, ref.jump))
    np.testing.assert_allclose(trie.weight_sum(ws), ref.weight_sum(ws), rtol=1e-12)
    # genlm-backend's max starts from 0, so it agrees for non-negative weights.
    np.testing.assert_array_equal(trie.weight_max(ws), ref.weight_max(ws))


@pytest.mark.slow  # genlm-backend's trie on whole real vocabularies: ~25 s
@pytest.mark.parametrize("name", ["gpt-2", "qwen2"])
def test_layout_and_values_equal_genlm_backends_on_real_vocabularies(name):
    vocab, _ = decode_vocab(load_tokenizer(name))
    trie = TokenCharacterTrie(vocab)
    assert_same_as_genlm_backend(vocab, trie, np.random.default_rng(0).random(len(vocab)))


@pytest.mark.slow  # importing genlm-backend's trie imports its vLLM module: ~20 s
def test_duplicates_and_non_byte_symbols_as_genlm_backend_has_them():
    eos = EndOfSequence()
    vocab = [Token(0, b"ab"), Token(1, b"a"), Token(2, b"ab"), Token(3, b""), eos, "ab", (b"a"[0], eos), Token(4, b"")]
    trie = TokenCharacterTrie(vocab)
    assert_same_as_genlm_backend(vocab, trie, np.random.default_rng(1).random(len(vocab)))
    assert trie.children[trie.root][eos] == trie.parent(trie.token_node(4))
    assert trie.node2prefix[trie.token_node(6)] == [97, eos]
    ws = np.arange(1.0, 9.0)
    sums = trie.weight_sum(ws)
    assert sums[trie.node_of(b"a")] == 1 + 2 + 3 + 7  # "ab", "a", "ab", (97, eos)
    assert [sums[trie.token_node(i)] for i in range(8)] == list(ws)
    with pytest.raises(ValueError, match="non-byte"):
        trie.prefix(trie.token_node(4))


def test_duplicate_words_and_bad_entries_raise_as_genlm_backend_does():
    with pytest.warns(DeprecationWarning, match="Passing plain bytes to TokenCharacterTrie is deprecated"):
        with pytest.raises(ValueError, match=r"Duplicate word in vocabulary: b'hello' \(entries 0 and 2\)"):
            TokenCharacterTrie([b"hello", b"world", b"hello"])
    with pytest.raises(ValueError, match=r"Duplicate word in vocabulary: \(b'test', 0\)"):
        TokenCharacterTrie([Token(0, b"test"), Token(1, b"other"), Token(0, b"test")])
    with pytest.raises(ValueError, match="Duplicate word in vocabulary: EOS"):
        TokenCharacterTrie([Token(0, b"a"), EndOfSequence(), EndOfSequence()])
    with pytest.raises(TypeError, match=r"decode\[1\].*hashable"):
        TokenCharacterTrie([Token(0, b"a"), [1, 2]])
    with pytest.raises(TypeError, match=r"decode\[1\].*iterable.*int"):
        TokenCharacterTrie([Token(0, b"a"), 5])

    class YieldsADict:
        def __iter__(self):
            return iter([{}])

    with pytest.raises(TypeError, match=r"decode\[0\].*unhashable symbol"):
        TokenCharacterTrie([YieldsADict()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TokenCharacterTrie([Token(0, b"a"), Token(1, b"a")])  # tokens: no warning, no duplicate


def test_reductions_match_reference_on_a_real_vocabulary(gpt2_trie):
    vocab, trie = gpt2_trie
    rng = np.random.default_rng(0)
    ws = rng.random(len(vocab))
    logws = np.log(ws)
    logws[rng.random(len(vocab)) < 0.3] = -np.inf
    sums, maxes, lses = trie.weight_sum(ws), trie.weight_max(ws), trie.weight_logsumexp(logws)
    assert sums.dtype == np.float64 and sums.shape == (trie.num_nodes,) == (len(trie.children),)
    leaves = trie.idx_to_leaf[:, 1]
    np.testing.assert_array_equal(sums[leaves], ws)
    np.testing.assert_array_equal(lses[leaves], logws)
    prefixes = [b"", b"a", b" the", b"\n", b"Th", b"\xc3"] + [
        bytes(vocab[i])[:k] for i, k in zip(rng.integers(0, len(vocab), 40), rng.integers(1, 4, 40))
    ]
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
    np.testing.assert_allclose(
        trie.batch_weight_logsumexp(np.log(ws))[2], trie.weight_logsumexp(np.log(ws[2])), rtol=1e-12
    )
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
    assert isinstance(trie._preprocess_ws(torch.tensor(ws[0])), np.ndarray)


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
    root = trie.root
    assert root == trie.num_nodes - 1 and trie.parent(root) is None and trie.prefix(root) == b""
    kids = trie.children[root]
    assert len([k for k in kids if isinstance(k, int)]) == 256  # every byte is a token in byte-level BPE
    assert all(child < root for child in kids.values())
    th, t = trie.node_of(b"th"), trie.node_of(b"t")
    assert trie.children[t][ord("h")] == th and trie.parent(th) == t
    the = next(i for i, tok in enumerate(vocab) if bytes(tok) == b"the")
    leaf = trie.token_node(the)
    assert leaf == trie.word2leaf[(b"the", the)] and trie.leaf2word[leaf] == (b"the", the)
    assert trie.parent(leaf) == trie.node_of(b"the") and trie.children[trie.node_of(b"the")][None, the] == leaf
    assert trie.prefix(leaf) == b"the" and list(trie.tokens_under(leaf)) == [the]
    assert trie.node2prefix[trie.node_of(b"the")] == list(b"the")
    assert trie.children[-1] is trie.children[root]  # each dict is made once
    assert trie.node_of(b"\xff\xfe\xfd") is None
    assert len(trie) == trie.num_nodes


vocabs = st.lists(st.binary(max_size=5).map(lambda b: bytes(x % 4 for x in b)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(vocab=vocabs, seed=st.integers(0, 2**32 - 1))
def test_random_vocabularies_against_reference(vocab, seed):
    vocab = [Token(i, b) for i, b in enumerate(vocab)]
    trie = TokenCharacterTrie(vocab)
    ws = np.random.default_rng(seed).random(len(vocab))
    sums, maxes, lses = trie.weight_sum(ws), trie.weight_max(ws), trie.weight_logsumexp(np.log(ws))
    leaves = set(trie.idx_to_leaf[:, 1].tolist())
    for node in range(trie.num_nodes):
        under = trie.tokens_under(node) if node in leaves else reference_under(vocab, trie.prefix(node))
        assert len(under) > 0
        assert sums[node] == pytest.approx(ws[under].sum())
        assert maxes[node] == ws[under].max()
        assert lses[node] == pytest.approx(np.log(ws[under].sum()))
        for data in (trie.prefix(node), trie.prefix(node) + b"\x00\x01"):
            want = [i for i, t in enumerate(vocab) if data.startswith(t)]
            np.testing.assert_array_equal(np.flatnonzero(trie.mask_prefix_of(data)), want)


@pytest.mark.slow  # imports genlm-backend (and its vLLM module)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(vocab=vocabs, eos_at=st.none() | st.integers(0, 60), seed=st.integers(0, 2**32 - 1))
def test_random_vocabularies_against_genlm_backend(vocab, eos_at, seed):
    # Tokens with repeated bytes (distinct ids), and maybe an end-of-sequence entry.
    vocab = [Token(i, b) for i, b in enumerate(vocab)]
    if eos_at is not None:
        vocab.insert(min(eos_at, len(vocab)), EndOfSequence())
    trie = TokenCharacterTrie(vocab)
    assert_same_as_genlm_backend(vocab, trie, np.random.default_rng(seed).random(len(vocab)))


def test_bad_input_raises_value_or_type_errors_naming_it(gpt2_trie):
    vocab, trie = gpt2_trie
    V = len(vocab)
    with pytest.raises(ValueError, match=r"ws must have shape \(50257,\)"):
        trie.weight_sum(np.ones(V - 1))
    with pytest.raises(ValueError, match=r"ws must have shape \(B, 50257\)"):
        trie.batch_weight_sum(np.ones(V))
    with pytest.raises(TypeError, match="ws must hold float32 or float64, not int64"):
        trie.weight_sum(np.ones(V, dtype=np.int64))
    nan = np.ones(V)
    nan[7] = np.nan
    with pytest.raises(ValueError, match=r"NaN \(token 7\)"):
        trie.weight_sum(nan)
    with pytest.raises(ValueError, match=r"NaN \(token 7\)"):
        trie.weight_max(nan)
    with pytest.raises(ValueError, match="NaN.*row 1, token 7"):
        trie.batch_weight_logsumexp(np.stack([np.ones(V), nan]))
    with pytest.raises(IndexError, match="node"):
        trie.children[trie.num_nodes]
    with pytest.raises(TypeError, match="integers"):
        trie.children["0"]
    with pytest.raises(KeyError):
        trie.node2prefix[trie.num_nodes]
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
    with pytest.raises(ValueError, match=r"transition target 5 is outside \[-1, 2\)"):
        trie.dfa_mask(np.full((2, 256), 5), 0, np.ones(2, bool))
    with pytest.raises(ValueError, match="state"):
        trie.dfa_mask(np.zeros((2, 256), dtype=np.int32), 2, np.ones(2, bool))
    with pytest.raises(ValueError, match="live"):
        trie.dfa_mask(np.zeros((2, 256), dtype=np.int32), 0, np.ones(3, bool))
    with pytest.raises(ValueError, match="one value per node"):
        trie.visualize(np.ones(3))


def test_empty_tokens_and_a_small_layout():
    # genlm-backend's numbering, by hand: children in order of their first
    # entry, postorder. "ab"'s leaves (entries 0, 1) are 0 and 1, "ab" is 2, the
    # leaf of "a" (entry 2) is 3, "a" is 4; the leaves of "" are 5 and 6; root 7.
    vocab = [Token(0, b"ab"), Token(1, b"ab"), Token(2, b"a"), Token(3, b""), Token(4, b"")]
    trie = TokenCharacterTrie(vocab)
    assert list(trie.children) == [
        {},
        {},
        {(None, 0): 0, (None, 1): 1},
        {},
        {98: 2, (None, 2): 3},
        {},
        {},
        {97: 4, (None, 3): 5, (None, 4): 6},
    ]
    assert trie.num_nodes == 8 and trie.root == 7
    sums = trie.weight_sum(np.array([1.0, 2.0, 4.0, 8.0, 16.0]))
    assert sums[trie.root] == 31.0 and sums[trie.node_of(b"a")] == 7.0 and sums[trie.node_of(b"ab")] == 3.0
    np.testing.assert_array_equal(np.sort(trie.tokens_under(trie.root)), np.arange(5))
    assert trie.parent(trie.token_node(3)) == trie.parent(trie.token_node(4)) == trie.root
    np.testing.assert_array_equal(trie.mask_prefix_of(b""), [False, False, False, True, True])


def test_a_result_is_never_overwritten_by_a_later_call(gpt2_trie):
    vocab, trie = gpt2_trie
    rng = np.random.default_rng(5)
    a_in, b_in = rng.random((64, len(vocab))), rng.random((64, len(vocab)))
    a = trie.batch_weight_sum(a_in)
    a_copy = a.copy()
    view = trie.batch_weight_sum(b_in)[3]  # only a view survives
    b_row = view.copy()
    c = trie.batch_weight_sum(a_in)
    np.testing.assert_array_equal(a, a_copy)
    np.testing.assert_array_equal(view, b_row)
    np.testing.assert_array_equal(c, a_copy)
    assert not np.shares_memory(a, c) and not np.shares_memory(view, c)
    del a, c
    d = trie.batch_weight_sum(b_in)
    np.testing.assert_array_equal(d[3], b_row)
    np.testing.assert_array_equal(view, b_row)
    single = trie.weight_max(a_in[0])
    kept = single.copy()
    trie.weight_max(b_in[0])
    np.testing.assert_array_equal(single, kept)


def test_parallel_trie_matches_the_rust_trie(gpt2_trie):
    vocab, trie = gpt2_trie
    parallel = ParallelTokenCharacterTrie(vocab, device="cpu")
    assert parallel.num_nodes == trie.num_nodes and parallel.device == "cpu"
    ws = np.random.default_rng(2).random((2, len(vocab)))
    np.testing.assert_allclose(parallel.batch_weight_sum(ws), trie.batch_weight_sum(ws), rtol=1e-10)
    np.testing.assert_array_equal(parallel.batch_weight_max(ws), trie.batch_weight_max(ws))
    np.testing.assert_allclose(parallel.weight_sum(torch.tensor(ws[0])), trie.weight_sum(ws[0]), rtol=1e-10)
    np.testing.assert_array_equal(parallel.weight_max(ws[1]), trie.weight_max(ws[1]))
    np.testing.assert_allclose(
        parallel.batch_weight_sum([torch.tensor(w) for w in ws]), trie.batch_weight_sum(ws), rtol=1e-10
    )
    bad = ws.copy()
    bad[1, 9] = np.nan
    with pytest.raises(ValueError, match="row 1, token 9"):
        parallel.batch_weight_sum(bad)
    with pytest.raises(ValueError, match=r"NaN \(token 9\)"):
        parallel.weight_max(bad[1])
    with pytest.raises(ValueError, match="shape"):
        parallel.weight_sum(ws)
    for device in ("invalid", "tpu", 3):
        with pytest.raises(ValueError, match="device"):
            ParallelTokenCharacterTrie(vocab[:3], device=device)


@pytest.mark.parametrize("library", ["asyncio", "trio"])
@pytest.mark.parametrize("backend", ["sequential", "parallel"])
def test_async_trie_batches_concurrent_reductions(gpt2_trie, library, backend):
    import anyio

    vocab, trie = gpt2_trie
    ws = np.random.default_rng(3).random((12, len(vocab)))
    atrie = (
        AsyncTokenCharacterTrie.from_vocab(vocab, device="cpu")
        if backend == "parallel"
        else AsyncTokenCharacterTrie(trie)
    )
    assert isinstance(atrie.trie, ParallelTokenCharacterTrie) == (backend == "parallel")  # parallel is the default
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
    assert len(errors) == 1 and "ws must have shape" in str(errors[0])
    # The bad request joins the batch and fails alone.
    assert atrie.batch_stats.batches == 1 and atrie.batch_stats.largest_batch == 13
    assert atrie._batcher is None and atrie.closed  # leaving the block closed it
    for (op, i), got in results.items():
        want = trie.weight_sum(ws[i]) if op == "sum" else trie.weight_max(ws[i])
        np.testing.assert_allclose(got, want, rtol=1e-10)
    with pytest.raises(ClosedError):
        anyio.run(atrie.weight_sum, ws[0])
    with pytest.raises(ValueError, match="backend"):
        AsyncTokenCharacterTrie.from_vocab(vocab, backend="gpu")


@pytest.mark.parametrize("backend", ["sequential", "parallel"])
@pytest.mark.parametrize("op", ["sum", "max"])
def test_async_trie_nan_fails_only_its_sender(gpt2_trie, backend, op):
    import anyio

    vocab, trie = gpt2_trie
    ws = np.random.default_rng(4).random((6, len(vocab)))
    ws[4, 11] = np.nan
    atrie = AsyncTokenCharacterTrie.from_vocab(
        vocab, backend=backend, **({"device": "cpu"} if backend == "parallel" else {})
    )
    outcomes: dict[int, object] = {}

    async def one(i):
        try:
            outcomes[i] = await getattr(atrie, f"weight_{op}")(ws[i])
        except ValueError as exc:
            outcomes[i] = exc

    async def main():
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(one, i)

    anyio.run(main)
    atrie.close()
    assert atrie.batch_stats.batches == 1 and atrie.batch_stats.largest_batch == 6
    error = outcomes.pop(4)
    assert isinstance(error, ValueError) and str(error) == "weights contain NaN (token 11)"
    for i, got in outcomes.items():
        want = trie.weight_sum(ws[i]) if op == "sum" else trie.weight_max(ws[i])
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_visualize_draws_every_node_and_edge():
    graphviz = pytest.importorskip("graphviz")
    trie = TokenCharacterTrie([Token(0, b"a"), Token(1, b"ab"), EndOfSequence()])
    dot = trie.visualize(trie.weight_sum(np.array([0.2, 0.3, 0.5])))
    assert isinstance(dot, graphviz.Digraph)
    source = dot.source
    assert source.count("->") == trie.num_nodes - 1
    assert "doublecircle" in source and "end of entry 2" in source and "1.0000" in source


@pytest.mark.parametrize("library", ["asyncio", "trio"])
def test_async_trie_lifetime(gpt2_trie, library):
    """shutdown()/cleanup() pause the worker (genlm-backend's names, on the class
    genlm.backend's name gives); close()/aclose(), `with` and `async with` end the
    trie, as they end a model."""
    import anyio

    vocab, trie = gpt2_trie
    ws = np.random.default_rng(5).random(len(vocab))
    want = trie.weight_sum(ws)
    atrie = legacy.AsyncTokenCharacterTrie(trie)
    assert isinstance(atrie, Closeable) and not hasattr(AsyncTokenCharacterTrie(trie), "shutdown")

    async def paused_then_closed():
        np.testing.assert_allclose(await atrie.weight_sum(ws), want)
        await atrie.cleanup()
        assert atrie._task is None and not atrie.closed
        np.testing.assert_allclose(await atrie.weight_sum(ws), want)  # a new worker
        await atrie.aclose()
        await atrie.aclose()  # closing twice is a no-op
        with pytest.raises(ClosedError):
            await atrie.weight_sum(ws)

    anyio.run(paused_then_closed, backend=library)
    assert atrie.closed and atrie._task is None

    with AsyncTokenCharacterTrie(trie) as synced:
        np.testing.assert_allclose(anyio.run(synced.weight_max, ws, backend=library), trie.weight_max(ws))
    assert synced.closed
    with pytest.raises(ClosedError):
        synced.start()
