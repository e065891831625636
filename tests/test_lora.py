"""LoRA adapters on the transformers backend: adapters built with peft on
SmolLM2 (tests/conftest.py), checked against peft's own forward pass; mixed
batches, per-adapter caches, registration and errors."""

from __future__ import annotations

import anyio
import pytest
import torch
import trio
from references import TOL, max_error

from genlm_anyio import AsyncTransformer
from genlm_anyio.backends.base import Query, RequestFailed
from genlm_anyio.compat import legacy
from tools import assets

# Loads SmolLM2's weights: not in the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow


def _load_base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(assets.smollm2_dir(), dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(lora_adapters):
    """peft's own model with the two shifted adapters: ``reference(ids, name)`` is
    the next-token log-probabilities of one plain forward pass (name None: adapters off)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load_base(), lora_adapters["shifted"], adapter_name="shifted")
    model.load_adapter(lora_adapters["shifted2"], adapter_name="shifted2")
    model.eval()

    @torch.no_grad()
    def run(ids, name):
        if name is None:
            with model.disable_adapter():
                logits = model(torch.tensor([ids])).logits[0, -1]
        else:
            model.set_adapter(name)
            logits = model(torch.tensor([ids])).logits[0, -1]
        return torch.log_softmax(logits.float(), dim=-1)

    return run


@pytest.fixture(scope="module")
def llm(lora_adapters):
    from transformers import AutoTokenizer

    with AsyncTransformer(_load_base(), AutoTokenizer.from_pretrained(assets.smollm2_dir())) as lm:
        lm.add_new_lora(lora_adapters["shifted"], "shifted")
        lm.add_new_lora(lora_adapters["shifted2"], "shifted2")
        yield lm


def ids_of(llm, text):
    return llm.tokenizer.encode(text)


def close(a, b):
    return max_error(a, b) < TOL


def test_adapter_results_match_peft_forward_pass(fresh, reference):
    p = ids_of(fresh, "Montreal is a city in")
    for name in ("shifted", "shifted2"):
        want = reference(p, name)
        assert not close(want, reference(p, None))  # the adapter changes the answer
        assert close(fresh.next_token_logprobs_uncached(p, lora_name=name), want)
        assert close(fresh.next_token_logprobs_sync(p, lora_name=name), want)  # computed, then cached
        assert close(fresh.next_token_logprobs_sync(p + [42], lora_name=name), reference(p + [42], name))  # from its KV
        batch = fresh.batch_next_token_logprobs_sync([p[:3], p + [7, 8]], lora_name=name)
        assert close(batch[0], reference(p[:3], name)) and close(batch[1], reference(p + [7, 8], name))


def test_identity_adapter_equals_the_base_model(fresh, lora_adapters, reference):
    p = ids_of(fresh, "The quick brown fox")
    fresh.add_new_lora(lora_adapters["identity"], "identity")
    try:
        assert close(anyio.run(lambda: fresh.next_token_logprobs(p, lora_name="identity")), reference(p, None))
        eos = [fresh.tokenizer.eos_token_id]
        base = anyio.run(lambda: fresh.sample(p, 6, eos, seed=5))
        # Recomputed under the adapter (its own cache entries): the base model's sums
        # plus peft's exact zeros (B = 0), so the same tokens by construction.
        assert trio.run(lambda: fresh.sample(p, 6, eos, seed=5, lora_name="identity")) == base
    finally:
        fresh.remove_lora("identity")


def test_mixed_batch_runs_every_adapter_in_one_forward_pass(fresh, reference):
    p = ids_of(fresh, "Once upon a time")
    q = ids_of(fresh, "In the beginning there was")
    requests = [(p, None), (p, "shifted"), (p, "shifted2"), (q, "shifted"), (q, None), (q, "shifted2")]
    before = (fresh.compute_stats.forward_passes, fresh.compute_stats.tokens_computed)

    async def all_at_once():
        out = [None] * len(requests)

        async def one(i, ids, name):
            out[i] = await fresh.next_token_logprobs(ids, lora_name=name)

        async with anyio.create_task_group() as tg:
            for i, (ids, name) in enumerate(requests):
                tg.start_soon(one, i, ids, name)
        return out

    results = anyio.run(all_at_once)
    # One forward pass; no prefix shared across adapters, so every token computed once per adapter.
    assert fresh.compute_stats.forward_passes - before[0] == 1
    assert fresh.compute_stats.tokens_computed - before[1] == 3 * len(p) + 3 * len(q)
    for (ids, name), got in zip(requests, results):
        assert close(got, reference(ids, name)), (len(ids), name)
    # The same ids under two adapters are two answers.
    assert not close(results[1], results[2])


def test_caches_are_per_adapter(fresh, reference):
    p = ids_of(fresh, "A cache per adapter")
    fresh.next_token_logprobs_sync(p, lora_name="shifted")
    stats, kv = fresh.compute_stats, fresh.kv_cache.stats
    before = (stats.tokens_computed, stats.logprob_cache_hits, kv.prefix_tokens_reused)
    # Same ids, other adapter, base: neither the output cache nor the KV of "shifted" serves them.
    other = fresh.next_token_logprobs_sync(p, lora_name="shifted2")
    base = fresh.next_token_logprobs_sync(p)
    assert stats.tokens_computed - before[0] == 2 * len(p)
    assert stats.logprob_cache_hits == before[1] and kv.prefix_tokens_reused == before[2]
    assert close(other, reference(p, "shifted2")) and close(base, reference(p, None))
    # Under its own adapter, the output cache answers, and an extension computes one token.
    fresh.next_token_logprobs_sync(p, lora_name="shifted")
    assert stats.logprob_cache_hits == before[1] + 1
    fresh.next_token_logprobs_sync(p + [9], lora_name="shifted")
    assert stats.tokens_computed - before[0] == 2 * len(p) + 1
    assert kv.prefix_tokens_reused - before[2] == len(p)
    assert sorted(str(q.adapter and q.adapter.name) for q in fresh._logprob_cache) == [
        "None",
        "shifted",
        "shifted",
        "shifted2",
    ]


def test_reregistering_and_removing_an_adapter_drops_its_entries(fresh, lora_adapters, reference):
    p = ids_of(fresh, "Rebinding a name")
    fresh.add_new_lora(lora_adapters["identity"], "reg")
    try:
        assert close(fresh.next_token_logprobs_sync(p, lora_name="reg"), reference(p, None))
        assert fresh.loras["reg"] == lora_adapters["identity"]
        computed, held = fresh.compute_stats.tokens_computed, fresh.kv_cache.stats.in_use
        fresh.add_new_lora(lora_adapters["shifted"], "reg")
        assert not any(q.adapter and q.adapter.name == "reg" for q in fresh._logprob_cache)
        assert fresh.kv_cache.stats.in_use == held - len(p)  # the old registration's KV slots are free
        # The new weights, computed from scratch: none of the old registration's KV is reused.
        assert close(fresh.next_token_logprobs_sync(p, lora_name="reg"), reference(p, "shifted"))
        assert fresh.compute_stats.tokens_computed - computed == len(p)
        held = fresh.kv_cache.stats.in_use
    finally:
        fresh.remove_lora("reg")
    assert fresh.kv_cache.stats.in_use == held - len(p)
    assert "reg" not in fresh.loras
    assert not any(q.adapter and q.adapter.name == "reg" for q in fresh._logprob_cache)
    with pytest.raises(ValueError, match="'reg'"):
        fresh.next_token_logprobs_sync(p, lora_name="reg")
    with pytest.raises(ValueError, match="'reg'"):
        fresh.remove_lora("reg")


def test_unknown_lora_name_fails_only_its_caller(fresh, reference):
    p = ids_of(fresh, "Unknown adapters")
    outcome = {}

    async def good():
        outcome["good"] = await fresh.next_token_logprobs(p, lora_name="shifted")

    async def bad():
        try:
            await fresh.next_token_logprobs(p, lora_name="nope")
        except ValueError as exc:
            outcome["bad"] = exc

    async def both():
        async with anyio.create_task_group() as tg:
            tg.start_soon(good)
            tg.start_soon(bad)

    anyio.run(both)
    assert "add_new_lora" in str(outcome["bad"]) and "'nope'" in str(outcome["bad"])
    assert close(outcome["good"], reference(p, "shifted"))
    for call in (
        lambda: fresh.next_token_logprobs_sync(p, lora_name="nope"),
        lambda: fresh.batch_next_token_logprobs_sync([p], lora_name="nope"),
        lambda: fresh.next_token_logprobs_uncached(p, lora_name="nope"),
        lambda: fresh.cache_kv(p, lora_name="nope"),
        lambda: anyio.run(lambda: fresh.batch_sample([p], 2, [], lora_name="nope")),
    ):
        with pytest.raises(ValueError, match="nope"):
            call()
    with pytest.raises(TypeError, match="lora_name"):
        fresh.next_token_logprobs_sync(p, lora_name=3)


def test_a_request_whose_adapter_is_removed_before_it_runs_fails_alone(fresh, lora_adapters, reference):
    p = ids_of(fresh, "Removed while waiting")
    fresh.add_new_lora(lora_adapters["shifted"], "gone")
    stale = fresh._query(p, "gone")  # as submitted before the removal
    fresh.remove_lora("gone")
    out = fresh._batcher.submit_sync([stale, Query(tuple(p), None)])
    assert isinstance(out[0], RequestFailed) and "'gone'" in out[0].message
    assert close(out[1], reference(p, None))


def test_set_lora_and_clear_lora_are_gone_as_in_genlm_backend(fresh, lora_adapters):
    # genlm-backend's names exist on the class genlm.backend's name gives, not on genlm-anyio's own.
    assert not hasattr(fresh, "set_lora") and not hasattr(fresh, "clear_lora")
    with legacy.MockAsyncLM(fresh.tokenizer) as compat_lm:
        with pytest.raises(RuntimeError, match="lora_name"):
            compat_lm.set_lora(lora_adapters["shifted"], "x")
        with pytest.raises(RuntimeError, match="lora_name"):
            compat_lm.clear_lora()
