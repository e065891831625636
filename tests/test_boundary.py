"""The Rust/Python boundary: arrays reach the core through the buffer protocol,
and the core checks them (element type, contiguity, shape, writability, overlap),
naming the argument; ``out=`` is filled and returned, and no result is reused."""

from __future__ import annotations

import array
import re
import threading

import numpy as np
import pytest
import torch

from genlm_anyio import Token, TokenCharacterTrie
from genlm_anyio.trie import AsyncTokenCharacterTrie, ParallelTokenCharacterTrie

VOCAB = [Token(i, b) for i, b in enumerate([b"ab", b"ab", b"a", b"", b"b", b"ba", b"bab"])]
V = len(VOCAB)
REDUCTIONS = ["weight_sum", "weight_max", "weight_logsumexp"]


@pytest.fixture(scope="module")
def trie():
    return TokenCharacterTrie(VOCAB)


def weights(rows=None, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random(V) + 0.1 if rows is None else rng.random((rows, V)) + 0.1


def call(trie, method, ws, **kwargs):
    return getattr(trie, method)(np.log(ws) if "logsumexp" in method else ws, **kwargs)


@pytest.mark.parametrize("method", REDUCTIONS + [f"batch_{m}" for m in REDUCTIONS])
def test_out_is_written_and_returned(trie, method):
    batch = method.startswith("batch_")
    ws = weights(3 if batch else None)
    want = call(trie, method, ws)
    out = np.full(want.shape, -7.0)
    got = call(trie, method, ws, out=out)
    assert got is out
    np.testing.assert_array_equal(out, want)
    # Float32 weights into a float64 out, and an out that is not a numpy array.
    mv = memoryview(array.array("d", [0.0] * want.size)).cast("B").cast("d", list(want.shape))
    narrow = ws.astype(np.float32)
    assert call(trie, method, narrow, out=mv) is mv
    np.testing.assert_array_equal(np.asarray(mv), call(trie, method, narrow))


@pytest.mark.parametrize("method", ["weight_sum", "batch_weight_max"])
def test_bad_out_raises_naming_it(trie, method):
    batch = method.startswith("batch_")
    ws = weights(2 if batch else None)
    n = trie.num_nodes
    shape = (2, n) if batch else (n,)
    shown = re.escape(f"(2, {n})" if batch else f"({n},)")
    read_only = np.zeros(shape)
    read_only.flags.writeable = False
    cases = [
        (np.zeros(shape, np.float32), TypeError, "out must hold float64, not float32"),
        (np.zeros(shape, np.int64), TypeError, "out must hold float64, not int64"),
        (np.zeros((n, 2)).T if batch else np.zeros(2 * n)[::2], ValueError, "out must be C-contiguous"),
        (read_only, ValueError, r"out must be writable \(it is read-only\)"),
        (np.zeros(n - 1), ValueError, rf"out must have shape {shown}, not \({n - 1},\)"),
        (np.zeros((3, n)), ValueError, rf"out must have shape {shown}, not \(3, {n}\)"),
        ([0.0] * n, TypeError, "out must be an array supporting the buffer protocol, not list"),
        (bytearray(8 * n), TypeError, "out must hold float64, not uint8"),
    ]
    for out, exc, match in cases:
        with pytest.raises(exc, match=match):
            getattr(trie, method)(ws, out=out)


def test_an_out_overlapping_the_weights_is_refused(trie):
    base = np.zeros(V + trie.num_nodes)
    base[:V] = weights()
    with pytest.raises(ValueError, match="out must not share memory with an input"):
        trie.weight_sum(base[:V], out=base[V - 1 : V - 1 + trie.num_nodes])
    out = base[V:]
    assert trie.weight_sum(base[:V], out=out) is out
    np.testing.assert_array_equal(out, trie.weight_sum(weights()))


def test_bad_weights_raise_naming_them(trie):
    with pytest.raises(TypeError, match="ws must hold float32 or float64, not int64"):
        trie.weight_sum(np.ones(V, dtype=np.int64))
    with pytest.raises(TypeError, match="ws must hold float32 or float64, not bool"):
        trie.batch_weight_max(torch.ones((2, V), dtype=torch.bool))
    with pytest.raises(TypeError, match="logws must hold float32 or float64, not int32"):
        trie.weight_logsumexp(np.zeros(V, dtype=np.int32))
    with pytest.raises(ValueError, match=rf"ws must have shape \({V},\), not \(3, 7\)"):
        trie.weight_sum(np.ones((3, 7)))
    with pytest.raises(ValueError, match=rf"ws must have shape \(B, {V}\), not \(3, 5\)"):
        trie.batch_weight_sum(np.ones((3, 5)))
    with pytest.raises(ValueError, match=rf"logws must have shape \(B, {V}\), not \({V},\)"):
        trie.batch_weight_logsumexp(np.zeros(V))
    with pytest.raises(ValueError, match=rf"ws must have shape \({V},\), not \(\)"):
        trie.weight_max(1.0)
    # The core itself refuses what the public methods would copy or widen.
    with pytest.raises(ValueError, match="ws must be C-contiguous"):
        trie._core.reduce("sum", np.ones(2 * V)[::2], False, None)
    with pytest.raises(TypeError, match="ws must hold float32 or float64, not buffer format '>d'"):
        trie._core.reduce("sum", np.ones(V, dtype=">f8"), False, None)
    with pytest.raises(TypeError, match="ws must hold float32 or float64, not float16"):
        trie._core.reduce("sum", np.ones(V, dtype=np.float16), False, None)


def test_weights_that_are_converted_not_refused(trie):
    ws = weights()
    want = trie.weight_sum(ws)
    for arr in (
        ws.astype(">f8"),  # non-native byte order, widened
        ws.astype(np.float16),
        list(ws),
        array.array("d", ws),
        memoryview(array.array("f", ws)),
        torch.tensor(ws, dtype=torch.bfloat16),
    ):
        np.testing.assert_allclose(trie.weight_sum(arr), want, rtol=1e-2)
    strided = np.zeros(2 * V)
    strided[::2] = ws
    np.testing.assert_array_equal(trie.weight_sum(strided[::2]), want)
    # Raw bytes are refused: they are not floats.
    with pytest.raises(TypeError, match="ws must hold float32 or float64"):
        trie.weight_sum(bytearray(8 * V))


def test_a_result_is_a_new_array_every_call(trie):
    ws = weights(4)
    first = trie.batch_weight_sum(ws)
    kept = first.copy()
    row = trie.weight_max(ws[0])
    row_kept = row.copy()
    for seed in range(3):
        second = trie.batch_weight_sum(weights(4, seed=seed + 1))
        assert not np.shares_memory(first, second)
        trie.weight_max(weights(seed=seed + 1))
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_array_equal(row, row_kept)


def test_masks_check_their_arrays(trie):
    table = np.zeros((2, 256), dtype=np.int8)  # widened losslessly
    np.testing.assert_array_equal(trie.dfa_mask(table, 0, [True, True]), np.ones(V, bool))
    with pytest.raises(TypeError, match="transitions must hold int32 or int64, not uint64"):
        trie.dfa_mask(np.zeros((2, 256), dtype=np.uint64), 0, [True, True])
    with pytest.raises(TypeError, match="transitions must hold int32 or int64, not float64"):
        trie.dfa_mask(np.zeros((2, 256)), 0, [True, True])
    with pytest.raises(ValueError, match=r"transitions must have shape \(S, 256\), not \(2, 255\)"):
        trie.dfa_mask(np.zeros((2, 255), dtype=np.int32), 0, [True, True])
    with pytest.raises(TypeError, match="live must hold bool, not int64"):
        trie.dfa_mask(np.zeros((2, 256), dtype=np.int32), 0, [1, 1])
    with pytest.raises(ValueError, match=r"live must have shape \(2,\), not \(3,\)"):
        trie.dfa_mask(np.zeros((2, 256), dtype=np.int32), 0, [True] * 3)
    with pytest.raises(ValueError, match=r"state 2 is outside \[0, 2\)"):
        trie.dfa_mask(np.zeros((2, 256), dtype=np.int32), 2, [True, True])
    with pytest.raises(ValueError, match=rf"out must have shape \({V},\), not \(3,\)"):
        trie._core.mask_startswith(b"a", np.zeros(3, bool))
    with pytest.raises(TypeError, match="out must hold bool, not uint8"):
        trie._core.mask_startswith(b"a", np.zeros(V, np.uint8))
    with pytest.raises(TypeError, match="out must hold int64, not int32"):
        trie._core.sorted_tokens(np.zeros(V, np.int32))


def test_parallel_trie_takes_out_too(trie):
    parallel = ParallelTokenCharacterTrie(VOCAB, device="cpu")
    ws = weights(2)
    for method in ("weight_sum", "weight_max", "batch_weight_sum", "batch_weight_max"):
        arg = ws if method.startswith("batch_") else ws[0]
        want = getattr(trie, method)(arg)
        out = np.zeros(want.shape)
        assert getattr(parallel, method)(arg, out=out) is out
        np.testing.assert_allclose(out, want, rtol=1e-12)
        with pytest.raises(ValueError, match="out must have shape"):
            getattr(parallel, method)(arg, out=np.zeros(want.size + 1))
        with pytest.raises(TypeError, match="out must hold float64, not float32"):
            getattr(parallel, method)(arg, out=np.zeros(want.shape, np.float32))


def test_async_trie_refuses_a_bad_request_even_batched_with_good_ones(trie):
    import anyio

    atrie = AsyncTokenCharacterTrie(trie)
    good = weights(3)
    outcomes: dict[int, object] = {}

    async def one(i, ws):
        try:
            outcomes[i] = await atrie.weight_sum(ws)
        except (TypeError, ValueError) as exc:
            outcomes[i] = exc

    async def main():
        async with atrie, anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i, good[i])
            tg.start_soon(one, 3, np.ones(V, dtype=np.int64))  # would be upcast if stacked with floats
            tg.start_soon(one, 4, good[0].astype(np.float32))

    anyio.run(main)
    assert atrie.batch_stats.batches == 1 and atrie.batch_stats.largest_batch == 5
    assert isinstance(outcomes[3], TypeError) and "ws must hold float32 or float64" in str(outcomes[3])
    for i in range(3):
        np.testing.assert_array_equal(outcomes[i], trie.weight_sum(good[i]))
    np.testing.assert_allclose(outcomes[4], trie.weight_sum(good[0]), rtol=1e-6)


def test_an_array_another_thread_is_using_cannot_be_written_by_a_second_call():
    """One thread fills ``out`` call after call (the GIL released while each
    computes); another thread's calls that would write ``out`` or the first
    thread's weights are refused, and reading those weights is shared."""
    big = TokenCharacterTrie([Token(i, bytes([i % 251, i // 251])) for i in range(6000)])
    ws = np.random.default_rng(3).random((200, big.vocab_size))
    out = np.empty((200, big.num_nodes))
    small = TokenCharacterTrie(VOCAB)
    stop = threading.Event()

    def fill():
        while not stop.is_set():
            big.batch_weight_sum(ws, out=out)

    filler = threading.Thread(target=fill)
    filler.start()
    refused: dict[str, str] = {}
    try:
        for _ in range(100_000):
            # Reading the weights the other call reads is allowed at any time.
            np.testing.assert_allclose(big.weight_sum(ws[7])[big.root], ws[7].sum())
            for name, target in [("out", out[0, : small.num_nodes]), ("weights", ws.reshape(-1)[: small.num_nodes])]:
                if name not in refused:
                    try:
                        small.weight_sum(weights(), out=target)
                    except ValueError as e:
                        refused[name] = str(e)
            if len(refused) == 2:
                break
    finally:
        stop.set()
        filler.join()
    assert refused["out"].startswith("out shares memory with an array that another call into the core is writing now")
    assert refused["weights"].startswith(
        "out shares memory with an array that another call into the core is reading now"
    )
    # The filler's result is intact: each leaf holds its weight, the root the row's total.
    big.batch_weight_sum(ws, out=out)
    leaves = [big.token_node(i) for i in range(big.vocab_size)]
    np.testing.assert_array_equal(out[:, leaves], ws)
    np.testing.assert_allclose(out[:, big.root], ws.sum(axis=1))


def test_a_large_batch_result_reuses_memory_only_once_nothing_holds_it():
    vocab = [Token(i, bytes([i % 251, i // 251])) for i in range(6000)]
    big = TokenCharacterTrie(vocab)
    ws = np.random.default_rng(7).random((400, len(vocab)))  # (400, num_nodes) float64: >= 16 MB
    first = big.batch_weight_sum(ws)
    assert first.nbytes >= 16 << 20
    address = first.__array_interface__["data"][0]
    row = first[5]
    kept = row.copy()
    second = big.batch_weight_max(ws)  # ``row`` still holds the first block
    assert not np.shares_memory(second, row)
    np.testing.assert_array_equal(row, kept)
    addresses = {address, second.__array_interface__["data"][0]}
    del first, row, second
    third = big.batch_weight_sum(ws)
    assert third.__array_interface__["data"][0] in addresses  # a freed block came back
    np.testing.assert_array_equal(third[5], kept)
    view = torch.from_numpy(third)  # any other holder keeps the block out of the pool
    del third
    fourth = big.batch_weight_sum(ws * 2)
    assert fourth.__array_interface__["data"][0] != view.data_ptr()
    np.testing.assert_array_equal(view[5].numpy(), kept)
