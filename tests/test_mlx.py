"""The MLX backend (mlx-lm, on mlx's CPU device here) on the real SmolLM2-135M
model: agreement with transformers, batched and cached results against the plain
pass, counts of computed tokens, batching under asyncio and trio, sampling, LoRA
adapters (peft's and mlx-lm's formats), errors, cancellation and closing."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import anyio
import pytest
import torch
import trio
from conftest import ask_after_cancelled_callers, assets, good_beside_bad

from genlm_anyio import AsyncMlxLM, ClosedError, load_model_by_name

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'genlm-anyio[mlx]')")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install 'genlm-anyio[mlx]')")

# Loads SmolLM2's weights: not in the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow

TOL = 1e-4  # batched rows against the plain pass, in log-probability
PROB_TOL = 1e-3  # MLX against transformers, in probability
TEXTS = [
    "Montreal is a city in",
    "The quick brown fox jumps over",
    "def fibonacci(n):",
    "In 1492, Columbus sailed",
    "Paris",
]


@pytest.fixture(scope="module")
def llm():
    with AsyncMlxLM.from_name(str(assets.smollm2_dir())) as lm:
        yield lm


@pytest.fixture
def fresh(llm):
    llm.clear_cache()
    return llm


@pytest.fixture(scope="module")
def hf_logprobs():
    """transformers' next-token log-probabilities of one plain forward pass, on a
    float32 model folder (SmolLM2's, or another one)."""
    from transformers import AutoModelForCausalLM

    models = {}

    @torch.no_grad()
    def run(ids, folder=None):
        folder = str(folder or assets.smollm2_dir())
        if folder not in models:
            models[folder] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return torch.log_softmax(models[folder](torch.tensor([ids])).logits[0, -1].float(), dim=-1)

    return run


def prompt(lm, text=TEXTS[0]):
    return lm.tokenizer.encode(text)


def assert_matches_uncached(lm, seqs, results, lora_name=None):
    for ids, got in zip(seqs, results):
        err = (lm.next_token_logprobs_uncached(ids, lora_name) - got).abs().max().item()
        assert err < TOL, f"{len(ids)} tokens: max abs error {err}"


def assert_close_in_probability(got, want):
    err = (got.exp() - want.exp()).abs().max().item()
    assert err < PROB_TOL, f"max probability difference {err}"


def test_the_model_folder_is_float32_so_both_engines_compute_alike(fresh):
    # transformers' float32 model is the reference: MLX runs the same weights in float32.
    assert json.loads((assets.smollm2_dir() / "config.json").read_text())["dtype"] == "float32"
    assert fresh.kv_cache.dtype == torch.float32


def test_outputs_are_normalized_float32_over_the_model_vocabulary(fresh):
    out = fresh.next_token_logprobs_sync(prompt(fresh))
    assert out.dtype == torch.float32 and out.shape == (fresh.vocab_size,) == (49152,)
    assert torch.logsumexp(out, 0).item() == pytest.approx(0.0, abs=1e-4)
    assert len(fresh.byte_vocab) == len(fresh.str_vocab) == fresh.vocab_size
    # The output head runs apart from the model, on each row's last position only.
    assert fresh._head is not None


def test_lone_and_batched_requests_agree_with_transformers(fresh, hf_logprobs):
    seqs = [prompt(fresh, t) for t in TEXTS]
    for ids in seqs:
        fresh.clear_cache()
        assert_close_in_probability(fresh.next_token_logprobs_sync(ids), hf_logprobs(ids))
    fresh.clear_cache()
    # Rows of different lengths in one batch, some extending a cached prefix.
    fresh.cache_kv(seqs[0])
    batch = [*seqs, seqs[0] + [100, 200], seqs[1][:3]]
    for ids, got in zip(batch, fresh.batch_next_token_logprobs_sync(batch)):
        assert_close_in_probability(got, hf_logprobs(ids))


def test_mixed_batches_match_the_uncached_pass(fresh):
    p = prompt(fresh)
    other = prompt(fresh, TEXTS[1])
    fresh.cache_kv(p)
    seqs = [
        p + [100],
        p + [100, 200],
        p + [300],
        p[:2],
        p[:2] + [5, 6, 7],  # shared prefixes, cached and not
        other,
        other + [11],
        other[:3] + [12, 13],  # an unseen prompt and its relatives
        p + [100],  # a duplicate
        [42],  # a single token
    ]
    results = fresh.batch_next_token_logprobs_sync(seqs)
    assert results.shape == (len(seqs), fresh.vocab_size)
    assert_matches_uncached(fresh, seqs, results)


def test_a_lone_request_equals_the_uncached_pass_exactly(fresh):
    pre = prompt(fresh, "There might be something wrong")
    ext = pre + fresh.tokenizer.encode(" with the caching logic", add_special_tokens=False)
    for ids in (pre, ext):  # cold, then from its cached prefix
        got = anyio.run(fresh.next_token_logprobs, ids)
        assert torch.equal(got, fresh.next_token_logprobs_uncached(ids))
    assert fresh.kv_cache.stats.prefix_tokens_reused >= len(pre)


async def _put(out, i, coro):
    out[i] = await coro


def test_extending_n_cached_sequences_by_one_token_computes_n_tokens(fresh):
    p = prompt(fresh)
    seqs = [p + [1000 + i] for i in range(16)]
    fresh.batch_next_token_logprobs_sync(seqs)
    before = (fresh.stats.tokens_computed, fresh.stats.forward_passes, fresh.kv_cache.stats.prefix_tokens_reused)
    step = [s + [7] for s in seqs]

    async def extend_all():
        out = [None] * len(step)
        async with anyio.create_task_group() as tg:
            for i, s in enumerate(step):
                tg.start_soon(_put, out, i, fresh.next_token_logprobs(s))
        return out

    out = anyio.run(extend_all)
    assert fresh.stats.tokens_computed - before[0] == 16
    assert fresh.stats.forward_passes - before[1] == 1
    assert fresh.kv_cache.stats.prefix_tokens_reused - before[2] == 16 * (len(p) + 1)
    assert_matches_uncached(fresh, step[:4], out[:4])


def test_shared_uncached_prefixes_and_identical_requests_are_computed_once(fresh):
    p = prompt(fresh, "Once upon a time there was")
    before = fresh.stats.tokens_computed
    fresh.batch_next_token_logprobs_sync([p + [5], p + [6], p + [5]])
    # p once, then one token for each distinct continuation.
    assert fresh.stats.tokens_computed - before == len(p) + 2
    before = fresh.stats.tokens_computed
    hits = fresh.stats.logprob_cache_hits
    fresh.next_token_logprobs_sync(p + [6])
    assert fresh.stats.tokens_computed == before and fresh.stats.logprob_cache_hits == hits + 1


@pytest.mark.parametrize("run", [anyio.run, trio.run], ids=["asyncio", "trio"])
def test_concurrent_callers_share_one_forward_pass(fresh, run):
    # Cold prompts of different lengths with no common first token, each asked twice.
    seqs = [[(97 * n + j) % 40000 + 50 for j in range(n)] for n in range(1, 25, 3)]
    assert len({s[0] for s in seqs}) == len(seqs)
    batches, requests, shared = (fresh.batch_stats.batches, fresh.batch_stats.requests, fresh.batch_stats.shared)
    passes, tokens = fresh.stats.forward_passes, fresh.stats.tokens_computed

    async def ask_all():
        out = [None] * (2 * len(seqs))
        async with anyio.create_task_group() as tg:
            for i, s in enumerate(seqs + seqs):
                tg.start_soon(_put, out, i, fresh.next_token_logprobs(s))
        return out

    out = run(ask_all)
    assert fresh.batch_stats.batches - batches == 1
    assert fresh.batch_stats.requests - requests == 2 * len(seqs)
    assert fresh.batch_stats.shared - shared == len(seqs)
    assert fresh.stats.forward_passes - passes == 1
    assert fresh.stats.tokens_computed - tokens == sum(map(len, seqs))
    assert all(torch.equal(a, b) for a, b in zip(out[: len(seqs)], out[len(seqs) :]))
    assert_matches_uncached(fresh, seqs, out)


def test_sampling_is_seeded_and_stops_at_eos(fresh):
    p = prompt(fresh)
    eos = [fresh.tokenizer.eos_token_id]
    a = anyio.run(lambda: fresh.sample(p, 8, eos, seed=3))
    b = trio.run(lambda: fresh.sample(p, 8, eos, seed=3))
    assert a == b and 0 < len(a) <= 8 and not set(a) & set(eos)
    batch = anyio.run(lambda: fresh.batch_sample([p, p[:3]], 5, eos, temperature=0.7, seed=11))
    assert batch[0] == anyio.run(lambda: fresh.sample(p, 5, eos, temperature=0.7, seed=11))
    # Every token is eos: sampling stops at once.
    assert anyio.run(lambda: fresh.sample(p, 5, list(range(fresh.vocab_size)))) == []
    with pytest.raises(ValueError, match="temperature"):
        anyio.run(lambda: fresh.sample(p, 5, eos, temperature=0))


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ([], ValueError, "must not be empty"),
        ([1, 49152], ValueError, r"49152, outside the vocabulary \[0, 49152\)"),
        ([1, 2.5], TypeError, r"token_ids\[1\] must be an int"),
        ("hello", TypeError, "sequence of token ids"),
    ],
)
def test_bad_input_fails_in_its_caller_only(fresh, bad, error, match):
    p = prompt(fresh)
    good, exc = anyio.run(good_beside_bad, fresh, p, bad)
    assert isinstance(exc, error) and re.search(match, str(exc))
    assert good.shape == (fresh.vocab_size,)
    with pytest.raises(error, match=match):
        fresh.next_token_logprobs_sync(bad)
    with pytest.raises(ValueError, match=r"token_ids_list\[1\]"):
        fresh.batch_next_token_logprobs_sync([p, []])


def test_bad_constructor_arguments_are_named(llm):
    model, tok = llm.mlx_lm_model, llm.tokenizer
    with pytest.raises(ValueError, match="prefill_step_size"):
        AsyncMlxLM(model, tok, prefill_step_size=0)
    with pytest.raises(ValueError, match="timeout"):
        AsyncMlxLM(model, tok, timeout=-1)
    with pytest.raises(ValueError, match="cache_opts"):
        AsyncMlxLM(model, tok, cache_opts={"maxbytes": 1})


def test_a_cancelled_caller_leaves_the_model_usable(fresh):
    p = prompt(fresh)
    got = anyio.run(ask_after_cancelled_callers, fresh, p)
    assert (got - fresh.next_token_logprobs_uncached(p + [79])).abs().max() < TOL


def test_closing_makes_the_model_unusable_with_a_clear_error(llm):
    model, tok = llm.mlx_lm_model, llm.tokenizer
    lm = AsyncMlxLM(model, tok)
    lm.next_token_logprobs_sync([1, 2])
    lm.close()
    lm.close()  # idempotent
    assert lm.kv_cache.stats.in_use == 0 and lm.output_cache_bytes == 0
    with pytest.raises(ClosedError):
        lm.next_token_logprobs_sync([1, 2])

    async def use():
        async with AsyncMlxLM(model, tok) as lm2:
            await lm2.next_token_logprobs([1, 2])
        with pytest.raises(ClosedError):
            await lm2.next_token_logprobs([1, 2])

    trio.run(use)


def test_load_model_by_name_and_genlm_backend_paths_give_the_mlx_class():
    with load_model_by_name(str(assets.smollm2_dir()), backend="mlx", llm_opts={"cache_size": 0}) as lm:
        assert isinstance(lm, AsyncMlxLM)
        lm.next_token_logprobs_sync([1, 2])
        lm.next_token_logprobs_sync([1, 2])
        assert lm.stats.logprob_cache_hits == 0  # cache_size=0 (genlm-backend's argument) disables the cache
    script = (
        "import sys, genlm_anyio, genlm_anyio.llm, genlm_anyio.compat\n"
        "assert 'mlx' not in sys.modules and 'mlx_lm' not in sys.modules, 'mlx imported eagerly'\n"
        "genlm_anyio.compat.install()\n"
        "import genlm.backend.llm, genlm.backend.llm.mlx\n"
        "from genlm_anyio.backends.mlx import AsyncMlxLM\n"
        "assert genlm_anyio.AsyncMlxLM is genlm_anyio.llm.AsyncMlxLM is AsyncMlxLM\n"
        "assert genlm.backend.llm.AsyncMlxLM is genlm.backend.llm.mlx.AsyncMlxLM is AsyncMlxLM\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


# -- LoRA ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    """The peft toy adapter, the same adapter in mlx-lm's format, and the model
    with it merged in (transformers' folder)."""
    return assets.smollm2_lora_toy()


def _mlx_lm_format(peft_dir, out_dir):
    """Write the peft adapter at ``peft_dir`` in mlx-lm's adapter format."""
    import mlx.core as mx
    from safetensors.numpy import load_file

    config = json.loads((peft_dir / "adapter_config.json").read_text())
    weights = {}
    for key, array in load_file(str(peft_dir / "adapter_model.safetensors")).items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        part = "lora_a" if ".lora_A." in key else "lora_b"
        weights[f"{module}.{part}"] = mx.array(array.T)
    out_dir.mkdir()
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), weights)
    lora = {"rank": config["r"], "scale": config["lora_alpha"] / config["r"], "dropout": 0.0}
    (out_dir / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 30, "lora_parameters": lora})
    )
    return out_dir


def test_lora_adapters_agree_with_transformers_and_run_beside_the_base_model(fresh, toy, hf_logprobs, tmp_path):
    adapter_dir, merged_dir = toy
    mlx_dir = _mlx_lm_format(adapter_dir, tmp_path / "mlx-adapter")
    fresh.add_new_lora(str(adapter_dir), "toy")
    fresh.add_new_lora(str(mlx_dir), "toy-mlx")
    try:
        assert fresh.loras == {"toy": str(adapter_dir), "toy-mlx": str(mlx_dir)}
        p, other = prompt(fresh), prompt(fresh, TEXTS[1])
        lone = fresh.next_token_logprobs_sync(p, lora_name="toy")
        assert_close_in_probability(lone, hf_logprobs(p, merged_dir))
        assert (lone - fresh.next_token_logprobs_sync(p)).abs().max() > 0.01  # the adapter changes the model
        assert (fresh.next_token_logprobs_sync(p, lora_name="toy-mlx") - lone).abs().max() < TOL
        # Base and adapter rows in one forward pass, each row through its own weights.
        code = prompt(fresh, TEXTS[2])
        passes = fresh.stats.forward_passes

        async def mixed():
            out = {}
            async with anyio.create_task_group() as tg:
                tg.start_soon(_put, out, "base", fresh.next_token_logprobs(other))
                tg.start_soon(_put, out, "toy", fresh.next_token_logprobs(other, lora_name="toy"))
                tg.start_soon(_put, out, "toy-code", fresh.next_token_logprobs(code, lora_name="toy"))
            return out

        out = anyio.run(mixed)
        assert fresh.stats.forward_passes - passes == 1
        assert_close_in_probability(out["base"], hf_logprobs(other))
        assert_close_in_probability(out["toy"], hf_logprobs(other, merged_dir))
        assert_matches_uncached(fresh, [code], [out["toy-code"]], lora_name="toy")
        # Removing an adapter drops its cached keys and values, and its name.
        in_use = fresh.kv_cache.stats.in_use
        fresh.remove_lora("toy")
        assert fresh.kv_cache.stats.in_use < in_use
        with pytest.raises(ValueError, match="no LoRA adapter is registered as 'toy'"):
            fresh.next_token_logprobs_sync(p, lora_name="toy")
        assert_close_in_probability(fresh.next_token_logprobs_sync(p), hf_logprobs(p))
    finally:
        for name in list(fresh.loras):
            fresh.remove_lora(name)


def test_bad_lora_folders_are_refused_with_the_reason(fresh, tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        fresh.add_new_lora(str(tmp_path), "nothing")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ValueError, match="neither a peft LoRA adapter nor an mlx-lm one"):
        fresh.add_new_lora(str(tmp_path), "prefix")
    import mlx.core as mx

    lora = {"rank": 8, "scale": 1.0, "dropout": 0.0}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"num_layers": 1, "lora_parameters": lora}))
    module = "model.layers.0.self_attn.q_proj"  # 576 -> 576
    for a_in, target, match in (
        (100, module, "maps 576 -> 576, the adapter 100 -> 576"),
        (576, "model.nope", "no module"),
    ):
        weights = {f"{target}.lora_a": mx.zeros((a_in, 8)), f"{target}.lora_b": mx.zeros((8, 576))}
        mx.save_safetensors(str(tmp_path / "adapters.safetensors"), weights)
        with pytest.raises(ValueError, match=match):
            fresh.add_new_lora(str(tmp_path), "wrong")
    assert fresh.loras == {}
    assert_matches_uncached(fresh, [[1, 2, 3]], [fresh.next_token_logprobs_sync([1, 2, 3])])
