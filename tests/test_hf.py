"""The transformers backend on the real SmolLM2-135M model: the in-process engines'
contract (tests/prefix_engines.py), and what is the transformers engine's own: eviction
under a small KV budget, the output head and output cache, genlm-backend's
arguments, loading by name and from a GGUF file."""

from __future__ import annotations

import functools

import pytest
import torch
from prefix_engines import PrefixEngineContract, assert_matches_reference
from references import assert_close_to, transformers_logprobs

from genlm_anyio import AsyncTransformer, MockAsyncLM, load_model_by_name
from genlm_anyio.compat import legacy
from tools import assets

# Loads SmolLM2's weights: not in the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(hf_parts):
    model, tok = hf_parts
    with AsyncTransformer(model, tok) as lm:
        yield lm


@pytest.fixture(scope="module")
def reference(hf_parts):
    """Plain transformers on the engine's own model object, run when the engine is
    idle (its hooks exist only during its own passes; the reference checks there are none)."""
    return functools.partial(transformers_logprobs, hf_parts[0])


@pytest.fixture
def make(hf_parts):
    """Another engine over the session's SmolLM2."""
    model, tok = hf_parts
    return lambda **kwargs: AsyncTransformer(model, tok, **kwargs)


class TestPrefixEngineContract(PrefixEngineContract):
    """The in-process engines' shared tests, on the transformers engine."""

    output_cache_size_arg = "logprob_cache_size"


def test_the_output_head_computes_one_position_per_sequence(fresh, reference):
    """Issue 8, defect 4: logits for each row's last position only, never (batch, positions, V)."""
    head = fresh.model.get_output_embeddings()
    shapes = []
    handle = head.register_forward_hook(lambda m, args, out: shapes.append((tuple(args[0].shape), tuple(out.shape))))
    # Cold prompts of 1 to 40 tokens, no two alike at the start: one forward pass.
    seqs = [[(97 * n + j) % 40000 + 50 for j in range(n)] for n in range(1, 41, 3)]
    try:
        got = fresh.batch_next_token_logprobs_sync(seqs)
    finally:
        handle.remove()
    hidden = fresh.model.config.hidden_size
    assert shapes == [((len(seqs), 1, hidden), (len(seqs), 1, fresh.vocab_size))]
    assert_matches_reference(reference, seqs[:2] + seqs[-2:], list(got[:2]) + list(got[-2:]))


def test_load_model_by_name_backends():
    path = str(assets.smollm2_dir())
    with load_model_by_name(path, backend="hf", llm_opts={"kv_cache_bytes": 1 << 26}) as lm:
        assert isinstance(lm, AsyncTransformer) and lm.kv_cache.capacity < 10_000
    with load_model_by_name(path, backend="mock") as mock:
        assert isinstance(mock, MockAsyncLM)
        a = mock.next_token_logprobs_sync([1, 2, 3])
        assert torch.equal(a, mock.next_token_logprobs_sync([1, 2, 3]))
        assert torch.logsumexp(a, 0).item() == pytest.approx(0.0, abs=1e-5)
        assert not torch.equal(a, mock.next_token_logprobs_sync([1, 2, 4]))
    with pytest.raises(ValueError, match="backend"):
        load_model_by_name(path, backend="tpu")
    with pytest.raises(NotImplementedError, match="AsyncSGLTransformer .*not available"):
        load_model_by_name(path, backend="sgl")
    with pytest.raises(TypeError, match="name"):
        load_model_by_name(None)


def test_genlm_backend_arguments_batch_size_timeout_and_clear_kv_cache(hf_parts):
    model, tok = hf_parts
    # genlm-backend's positional order: (hf_model, hf_tokenizer, batch_size, timeout),
    # on the class that genlm.backend's name gives; genlm-anyio's own has no timeout.
    with pytest.raises(TypeError, match="timeout"):
        AsyncTransformer(model, tok, 10, timeout=0.5)
    with legacy.AsyncTransformer(model, tok, 10, 0.5) as lm:
        assert lm.batch_size == 10 and lm.timeout == 0.5
        lm.batch_size = 2
        lm.batch_next_token_logprobs_sync([[1], [2], [3], [4], [5]])
        assert lm.batch_stats.largest_batch == 2 and lm.batch_stats.batches == 3
        with pytest.raises(ValueError, match="batch_size"):
            lm.batch_size = 0
        # clear_kv_cache drops keys and values only: the output cache still answers.
        lm.next_token_logprobs_sync([1, 2, 3])
        lm.clear_kv_cache()
        assert lm.kv_cache.stats.in_use == 0
        hits = lm.compute_stats.logprob_cache_hits
        lm.next_token_logprobs_sync([1, 2, 3])
        assert lm.compute_stats.logprob_cache_hits == hits + 1
    with pytest.raises(ValueError, match="timeout"):
        legacy.AsyncTransformer(model, tok, 10, -1)


def test_from_name_takes_genlm_backend_arguments():
    path = str(assets.smollm2_dir())
    with legacy.AsyncTransformer.from_name(path, None, {"dtype": torch.float32}, batch_size=4, timeout=0.01) as lm:
        assert lm.batch_size == 4 and lm.timeout == 0.01 and lm.model.dtype == torch.float32


@pytest.mark.slow
def test_load_model_by_name_reads_a_gguf_file(reference):
    gguf = assets.smollm2_gguf()
    with load_model_by_name(str(gguf), backend="hf") as lm:
        ids = lm.tokenizer.encode("Montreal is")
        # The same weights as the converted folder.
        assert_close_to(reference(ids), lm.next_token_logprobs_sync(ids), "from the GGUF file")
