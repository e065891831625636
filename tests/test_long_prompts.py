"""Long shared prompts and many particles (issue 15) on the real SmolLM2-135M, on
transformers and on MLX: a step of 128 particles after a 2,000-token cached
prompt is one forward pass of 128 tokens (requests are admitted by the tokens
they compute, not by their length), new prompts in the same batch ride along,
and a prompt longer than a forward pass is computed in chunks. Counted by the
engines' counters; rows checked against a plain transformers forward pass
(``model(ids).logits``, no hooks of ours).

On MLX the prompt is 64 tokens and the chunk 32: mlx's Linux CPU wheel ships a
reference BLAS (docs/backends.md), and the MLX engine still gathers each row's
whole past, so that a step of 128 rows over a 2,000-token (or even 256-token)
past runs longer than a test may here. The counts do not depend on the
model's speed.
"""

from __future__ import annotations

import random

import anyio
import pytest
import torch
from helpers import ask_concurrently
from prefix_engines import TOL

from genlm_anyio import AsyncMlxLM, AsyncTransformer
from tools import assets

# Loads SmolLM2's weights: not in the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow

PARTICLES = 128
# Per engine: the cached prompt's tokens, a forward-pass cap smaller than it, and
# a new prompt longer than that cap.
SIZES = {"transformers": (2000, 512, 1300), "mlx": (64, 32, 80)}
# Per engine: the new prompts that ride along with the particles. Every row of a
# pass is padded to the longest new prompt, and mlx's CPU build computes each
# padded position (about 10 ms each here): 128 rows x 12 take 150 s on MLX.
NEW_PROMPTS = {"transformers": (4, 8, 12), "mlx": (2, 3, 4)}
MLX_PROB_TOL = 1e-3  # MLX against transformers, in probability (tests/test_mlx.py)


def _ids(seed: int, n: int) -> list[int]:
    """``n`` token ids of an unpredictable text (no two seeds share a first token)."""
    rng = random.Random(seed)
    return [1000 + 97 * seed] + [rng.randrange(1000, 40000) for _ in range(n - 1)]


@pytest.fixture(scope="module")
def reference(hf_parts):
    """A plain transformers forward pass: log-softmax of ``model(ids).logits`` at
    the last position (each computed once, for both engines: a 2,000-token pass is slow here)."""
    model, _ = hf_parts
    done = {}

    @torch.inference_mode()
    def run(ids):
        key = tuple(ids)
        if key not in done:
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            done[key] = torch.log_softmax(logits.float(), dim=-1)
        return done[key]

    return run


@pytest.fixture(scope="module", params=["transformers", "mlx"])
def engine(request, hf_parts):
    """An engine of each kind, with its maker (``make(**opts)``: another over the same weights)."""
    if request.param == "transformers":
        model, tok = hf_parts

        def make(**opts):
            return AsyncTransformer(model, tok, **opts)

        close = TOL
    else:
        pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'genlm-anyio[mlx]')")
        pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install 'genlm-anyio[mlx]')")
        loaded = AsyncMlxLM.from_name(str(assets.smollm2_dir()))

        def make(**opts):
            if "max_forward_tokens" in opts:  # genlm-backend's name for the same limit
                opts["prefill_step_size"] = opts.pop("max_forward_tokens")
            return AsyncMlxLM(loaded.mlx_lm_model, loaded.tokenizer, **opts)

        close = None
    lm = make()
    yield request.param, lm, make, close
    lm.close()
    if request.param == "mlx":
        loaded.close()


def _assert_matches(kind, close, reference, seqs, rows):
    for ids, got in zip(seqs, rows):
        want = reference(ids)
        if close is not None:
            err = (got - want).abs().max().item()
            assert err < close, f"{kind}, {len(ids)} tokens: max abs error {err}"
        else:
            err = (got.exp() - want.exp()).abs().max().item()
            assert err < MLX_PROB_TOL, f"{kind}, {len(ids)} tokens: max probability difference {err}"


def _counts(lm):
    return lm.compute_stats.forward_passes, lm.compute_stats.tokens_computed, lm.batch_stats.batches


def _since(lm, before):
    return tuple(now - then for now, then in zip(_counts(lm), before))


def test_a_step_of_128_particles_after_a_2000_token_prompt_is_one_forward_pass(engine, reference):
    kind, lm, _, close = engine
    prompt_tokens, _, _ = SIZES[kind]
    lm.clear_cache()
    prompt = _ids(1, prompt_tokens)
    before = _counts(lm)
    lm.cache_kv(prompt)
    assert _since(lm, before) == (1, prompt_tokens, 1)
    for step in range(2):  # the prompt's extension, then theirs
        particles = [prompt + [2000 + i] + [3000 + i] * step for i in range(PARTICLES)]
        before = _counts(lm)
        out = anyio.run(ask_concurrently, lm, particles)
        # One batch, one forward pass, one token per particle.
        assert _since(lm, before) == (1, PARTICLES, 1), kind
        _assert_matches(kind, close, reference, particles[:1], out[:1])


def test_new_prompts_ride_along_with_the_particles(engine, reference):
    kind, lm, _, close = engine
    lm.clear_cache()
    prompt = _ids(1, SIZES[kind][0])
    lm.cache_kv(prompt)
    fresh = [_ids(10 + k, n) for k, n in enumerate(NEW_PROMPTS[kind])]
    particles = [prompt + [2000 + i] for i in range(PARTICLES - len(fresh))]  # a full batch in all
    before = _counts(lm)
    out = anyio.run(ask_concurrently, lm, particles + fresh)
    assert _since(lm, before) == (1, len(particles) + sum(NEW_PROMPTS[kind]), 1), kind
    _assert_matches(kind, close, reference, [particles[0], *fresh], [out[0], *out[len(particles) :]])


def test_a_prompt_longer_than_a_forward_pass_is_computed_in_chunks(engine, reference):
    kind, _, make, close = engine
    prompt_tokens, cap, other_tokens = SIZES[kind]
    with make(max_forward_tokens=cap) as lm:
        prompt = _ids(1, prompt_tokens)
        before = _counts(lm)
        alone = lm.next_token_logprobs_sync(prompt)
        # Chunks of the cap (the last one shorter), each chunk's keys and values kept for the next.
        assert _since(lm, before) == (-(-prompt_tokens // cap), prompt_tokens, 1), kind
        assert lm.compute_stats.largest_forward_tokens == cap
        assert lm.kv_cache.stats.in_use == prompt_tokens
        _assert_matches(kind, close, reference, [prompt], [alone])

        # A long new prompt beside particles (as many as one batch admits): the
        # particles in one pass, the prompt after them, in chunks.
        particles = [prompt + [2000 + i] for i in range(min(PARTICLES, cap))]
        other = _ids(4, other_tokens)
        before = _counts(lm)
        out = anyio.run(ask_concurrently, lm, [*particles, other])
        assert _since(lm, before) == (1 + -(-other_tokens // cap), len(particles) + other_tokens, 2), kind
        assert lm.compute_stats.largest_forward_tokens == cap
        _assert_matches(kind, close, reference, [particles[0], other], [out[0], out[-1]])
