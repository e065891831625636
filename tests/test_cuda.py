"""The transformers backend and the parallel trie on a CUDA device.

The model is SmolLM2-135M's Llama shape with seeded random weights (float32, so
that cached and uncached passes can be compared closely), over the SmolLM2
tokenizer: from ``GENLM_ANYIO_TOKENIZER`` (a folder), or the asset cache.
Skipped where torch sees no CUDA device; ``benches/gpu.sh`` runs it on one.
"""

from __future__ import annotations

import os

import anyio
import numpy as np
import pytest
import torch
from helpers import ask_concurrently
from references import transformers_logprobs

from genlm_anyio import AsyncTransformer, TokenCharacterTrie
from genlm_anyio.trie import ParallelTokenCharacterTrie

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_lm():
    from transformers import AutoTokenizer

    from tools import assets

    tokenizer = AutoTokenizer.from_pretrained(os.environ.get("GENLM_ANYIO_TOKENIZER") or assets.smollm2_dir())
    model = assets.random_llama("smollm2", tokenizer, "cuda", torch.float32)
    with AsyncTransformer(model, tokenizer) as lm:
        yield lm


def test_the_model_runs_on_the_device_and_a_lone_request_matches_plain_transformers(cuda_lm):
    assert cuda_lm.device.type == "cuda"
    ids = cuda_lm.tokenizer.encode("Montreal is a city in")
    want = transformers_logprobs(cuda_lm.model, ids)
    torch.testing.assert_close(cuda_lm.next_token_logprobs_sync(ids).cpu(), want, atol=1e-4, rtol=0)


def test_extending_by_one_token_computes_one_token_and_batches_agree(cuda_lm):
    prompt = cuda_lm.tokenizer.encode("The capital of France")
    cuda_lm.next_token_logprobs_sync(prompt)
    before = cuda_lm.compute_stats.tokens_computed
    cuda_lm.next_token_logprobs_sync(prompt + [11])
    assert cuda_lm.compute_stats.tokens_computed - before == 1

    rows = [prompt + [t] for t in range(20, 36)]

    passes = cuda_lm.compute_stats.forward_passes
    got = anyio.run(ask_concurrently, cuda_lm, rows)
    assert cuda_lm.compute_stats.forward_passes - passes == 1
    for row, logps in zip(rows, got):
        torch.testing.assert_close(logps.cpu(), transformers_logprobs(cuda_lm.model, row), atol=1e-3, rtol=0)


def test_seeded_sampling_repeats_when_recomputed(cuda_lm):
    prompt = cuda_lm.tokenizer.encode("Once upon a time")
    eos = [cuda_lm.tokenizer.eos_token_id]
    cuda_lm.clear_cache()
    a = anyio.run(lambda: cuda_lm.sample(prompt, 8, eos, seed=3))
    assert 0 < len(a) <= 8
    # No cached keys, values or results: the second run computes the same passes again.
    cuda_lm.clear_cache()
    passes, hits = cuda_lm.compute_stats.forward_passes, cuda_lm.compute_stats.logprob_cache_hits
    assert anyio.run(lambda: cuda_lm.sample(prompt, 8, eos, seed=3)) == a
    assert cuda_lm.compute_stats.forward_passes - passes == min(len(a) + 1, 8)
    assert cuda_lm.compute_stats.logprob_cache_hits == hits


def test_the_parallel_trie_on_the_device_equals_the_rust_trie(cuda_lm):
    vocab = cuda_lm.byte_vocab
    ws = np.random.default_rng(0).random((4, len(vocab)))
    rust = TokenCharacterTrie(vocab)
    gpu = ParallelTokenCharacterTrie(vocab, device="cuda")
    np.testing.assert_allclose(gpu.batch_weight_sum(ws), rust.batch_weight_sum(ws), rtol=1e-5)
    np.testing.assert_allclose(gpu.batch_weight_max(ws), rust.batch_weight_max(ws), rtol=1e-6)
