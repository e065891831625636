"""The vLLM backend on the real engine (vllm-cpu) and the real SmolLM2-135M model.

vLLM changes torch's thread settings for the whole process, so these tests run
in a pytest process of their own: ``pytest -m vllm`` (``make test`` does that).
One engine serves the module (it takes minutes to start); the last test closes it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from types import SimpleNamespace

import anyio
import pytest
import torch
import trio
from conftest import ask_after_cancelled_callers, assets, good_beside_bad

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
pytest.importorskip("vllm")

from genlm_anyio import AsyncTransformer, AsyncVirtualLM, ClosedError, load_model_by_name
from genlm_anyio.backends.vllm_engine import VLLMEngine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# Max abs difference of probabilities allowed between vLLM and transformers.
AGREE = 1e-3


@pytest.fixture(scope="module")
def vllm_lm():
    lm = load_model_by_name(
        str(assets.smollm2_dir()),
        backend="vllm",
        llm_opts={
            "engine_opts": {
                "dtype": "float32",
                "block_size": 32,
                "seed": 0,
                # As genlm-backend's own LoRA tests start theirs: adapters are the user's choice.
                "enable_lora": True,
                "max_lora_rank": 8,
                "max_loras": 2,
            }
        },
    )
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def hf_lm():
    with AsyncTransformer.from_name(str(assets.smollm2_dir()), hf_opts={"dtype": torch.float32}) as lm:
        yield lm


def prompt(lm, text="Montreal is a city in"):
    return lm.tokenizer.encode(text)


def mixed_batch(lm) -> list[list[int]]:
    p, q = prompt(lm), prompt(lm, "The quick brown fox jumps over the lazy")
    # Different lengths, a shared prefix, an extension, a one-token sequence and a duplicate.
    return [p, q, p + [28], p[:3], q + [253, 1030], [42], p]


def assert_agrees(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.exp() - want.exp()).abs().max().item()
    assert err < AGREE, f"max abs difference of probabilities {err}"


def test_the_engine_is_set_up_for_full_vocabulary_logprobs(vllm_lm):
    config = vllm_lm.engine._engine.model_config
    assert isinstance(vllm_lm, AsyncVirtualLM)
    assert vllm_lm.engine._engine.vllm_config.cache_config.enable_prefix_caching
    assert (config.max_logprobs, config.logprobs_mode) == (-1, "raw_logprobs")
    out = vllm_lm.next_token_logprobs_sync(prompt(vllm_lm))
    assert out.dtype == torch.float32 and out.shape == (vllm_lm.vocab_size,) == (49152,)
    assert torch.isfinite(out).all()
    assert torch.logsumexp(out, 0).item() == pytest.approx(0.0, abs=1e-4)
    assert len(vllm_lm.byte_vocab) == vllm_lm.vocab_size


def test_underlying_model_is_the_in_process_engines_torch_model(vllm_lm):
    model = vllm_lm.underlying_model
    assert isinstance(model, torch.nn.Module) and type(model).__name__ == "LlamaForCausalLM"  # SmolLM2's architecture
    assert any(p.shape[0] == vllm_lm.vocab_size for p in model.parameters())  # the token embedding


@pytest.mark.parametrize("run", [anyio.run, trio.run], ids=["asyncio", "trio"])
def test_logprobs_agree_with_transformers_for_a_mixed_batch(vllm_lm, hf_lm, run):
    seqs = mixed_batch(vllm_lm)
    vllm_lm.clear_cache()
    before = vllm_lm.batch_stats.batches

    async def main():
        results = [None] * len(seqs)

        async def one(i):
            results[i] = await vllm_lm.next_token_logprobs(seqs[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(seqs)):
                tg.start_soon(one, i)
        return results

    results = run(main)
    # All concurrent requests went to the engine together; the duplicate ran once.
    assert vllm_lm.batch_stats.batches == before + 1
    for ids, got in zip(seqs, results):
        assert_agrees(got, hf_lm.next_token_logprobs_uncached(ids))
    assert torch.equal(results[0], results[-1])
    # With the prefixes now cached, the same requests give the same answers.
    again = vllm_lm.batch_next_token_logprobs_sync(seqs)
    for got, first in zip(again, results):
        assert (got - first).abs().max().item() < 1e-4


def test_extending_n_sequences_by_one_token_computes_n_tokens(vllm_lm, hf_lm):
    vllm_lm.clear_cache()
    scheduler = vllm_lm.engine._core.engine_core.scheduler
    stats = vllm_lm.engine.stats
    seqs = [prompt(vllm_lm) + [t] for t in (300, 301, 302, 303)]
    vllm_lm.batch_next_token_logprobs_sync(seqs)
    # Each sequence stays in the engine as an idle session, holding its KV.
    assert len(scheduler.requests) == len(vllm_lm.engine._sessions) == 4
    for grow in ([10], [11, 12]):
        before = replace(stats)
        seqs = [s + grow for s in seqs]
        got = vllm_lm.batch_next_token_logprobs_sync(seqs)
        assert stats.sessions_resumed - before.sessions_resumed == 4
        assert stats.tokens_computed - before.tokens_computed == 4 * len(grow)
        assert stats.requests == before.requests
        for ids, lp in zip(seqs, got):
            assert_agrees(lp, hf_lm.next_token_logprobs_uncached(ids))
    # Two requests extend one sequence (a resampled particle): one resumes its
    # session, the other is a new request; the sessions nobody extended end.
    before = replace(stats)
    forks = [seqs[0] + [20], seqs[0] + [21]]
    got = vllm_lm.batch_next_token_logprobs_sync(forks)
    assert stats.sessions_resumed - before.sessions_resumed == 1 and stats.requests - before.requests == 1
    for ids, lp in zip(forks, got):
        assert_agrees(lp, hf_lm.next_token_logprobs_uncached(ids))
    assert len(scheduler.requests) == len(vllm_lm.engine._sessions) == 2
    vllm_lm.clear_cache()
    assert not scheduler.requests and not vllm_lm.engine._sessions


def test_duplicates_are_computed_once(vllm_lm):
    p = prompt(vllm_lm)
    stats = vllm_lm.batch_stats
    shared, batched = stats.shared, stats.batched_requests

    async def main():
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(vllm_lm.next_token_logprobs, p + [11])

    anyio.run(main)
    assert stats.shared - shared == 4 and stats.batched_requests - batched == 1


def test_sync_calls_from_plain_threads(vllm_lm, hf_lm):
    seqs = mixed_batch(vllm_lm)[:4]
    results = [None] * len(seqs)

    def worker(i):
        results[i] = vllm_lm.next_token_logprobs_sync(seqs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(seqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ids, got in zip(seqs, results):
        assert_agrees(got, hf_lm.next_token_logprobs_uncached(ids))


@pytest.mark.parametrize(
    "bad,error,match",
    [
        ([], ValueError, "must not be empty"),
        ([1, 49152], ValueError, "outside the vocabulary"),
        ([1, 2.5], TypeError, r"token_ids\[1\] must be an int"),
        ([1] * 8192, ValueError, "max_model_len"),
    ],
)
def test_bad_input_fails_in_its_caller_only(vllm_lm, bad, error, match):
    p = prompt(vllm_lm)
    good, exc = anyio.run(good_beside_bad, vllm_lm, p, bad)
    assert isinstance(exc, error)
    assert __import__("re").search(match, str(exc))
    assert good.shape == (vllm_lm.vocab_size,)


def test_an_engine_failure_reaches_every_caller_of_its_batch_and_the_model_recovers(vllm_lm, hf_lm, monkeypatch):
    core = vllm_lm.engine._core
    real = core.get_output

    def broken():
        monkeypatch.setattr(core, "get_output", real)
        raise RuntimeError("engine step failed")

    monkeypatch.setattr(core, "get_output", broken)
    p = prompt(vllm_lm)
    errors = []

    async def one(ids):
        try:
            await vllm_lm.next_token_logprobs(ids)
        except RuntimeError as exc:
            errors.append(exc)

    async def main():
        async with anyio.create_task_group() as tg:
            for t in (101, 102, 103):
                tg.start_soon(one, p + [t])

    anyio.run(main)
    assert len(errors) == 3 and all("engine step failed" in str(e) for e in errors)
    # The failed batch's requests were aborted: the engine is idle and serves new ones.
    assert not core.engine_core.scheduler.requests and not vllm_lm.engine._sessions
    assert_agrees(vllm_lm.next_token_logprobs_sync(p + [101]), hf_lm.next_token_logprobs_uncached(p + [101]))


def test_a_cancelled_caller_leaves_the_model_usable(vllm_lm, hf_lm):
    p = prompt(vllm_lm)
    got = trio.run(ask_after_cancelled_callers, vllm_lm, p)
    assert_agrees(got, hf_lm.next_token_logprobs_uncached(p + [79]))


def test_native_sampling_is_seeded_and_stops_at_eos(vllm_lm):
    p = prompt(vllm_lm)
    first = anyio.run(lambda: vllm_lm.sample(p, 12, [], seed=7))
    assert len(first) == 12
    assert trio.run(lambda: vllm_lm.sample(p, 12, [], seed=7)) == first
    # A stop id ends the run before it, and the seeded draws before it are unchanged.
    stop = first[5]
    cut = first.index(stop)
    assert anyio.run(lambda: vllm_lm.sample(p, 12, [stop], seed=7)) == first[:cut]
    batch = anyio.run(lambda: vllm_lm.batch_sample([p, p[:2], p], 6, [], temperature=0.8, seed=3))
    assert [len(b) for b in batch] == [6, 6, 6]
    assert batch[0] == anyio.run(lambda: vllm_lm.sample(p, 6, [], temperature=0.8, seed=3))
    assert anyio.run(lambda: vllm_lm.sample(p, 0, [])) == []
    with pytest.raises(ValueError, match="temperature"):
        anyio.run(lambda: vllm_lm.sample(p, 5, [], temperature=0))
    with pytest.raises(ValueError, match="max_model_len"):
        anyio.run(lambda: vllm_lm.sample(p, 9000, []))


def test_the_hook_names_the_vllm_version_when_it_does_not_fit():
    import vllm

    with pytest.raises(RuntimeError, match=f"vLLM {vllm.__version__}"):
        VLLMEngine(SimpleNamespace(engine_core=None, input_processor=None))
    with pytest.raises(ValueError, match="engine_opts may not set"):
        AsyncVirtualLM.from_name(str(assets.smollm2_dir()), engine_opts={"max_logprobs": 20})
    with pytest.raises(TypeError, match="engine_opts"):
        AsyncVirtualLM.from_name(str(assets.smollm2_dir()), engine_opts="tp=2")


@pytest.fixture(scope="module")
def with_adapters(vllm_lm, hf_lm, lora_adapters):
    for lm in (vllm_lm, hf_lm):
        lm.add_new_lora(lora_adapters["shifted"], "shifted")
        lm.add_new_lora(lora_adapters["shifted2"], "shifted2")
    return vllm_lm, hf_lm


def test_lora_requests_agree_with_peft_and_share_one_engine_batch(with_adapters):
    vllm_lm, hf_lm = with_adapters
    p, q = prompt(vllm_lm, "Once upon a time"), prompt(vllm_lm, "In the beginning there was")
    requests = [(p, None), (p, "shifted"), (p, "shifted2"), (q, "shifted"), (q, None)]
    batches = vllm_lm.batch_stats.batches

    async def all_at_once():
        out = [None] * len(requests)

        async def one(i, ids, name):
            out[i] = await vllm_lm.next_token_logprobs(ids, lora_name=name)

        async with anyio.create_task_group() as tg:
            for i, (ids, name) in enumerate(requests):
                tg.start_soon(one, i, ids, name)
        return out

    split = vllm_lm.engine.stats.split_rounds
    results = anyio.run(all_at_once)
    assert vllm_lm.batch_stats.batches - batches == 1
    # vllm-cpu 0.32 cannot run base rows beside adapter rows (docs/vllm.md): two engine rounds there.
    assert vllm_lm.engine.stats.split_rounds - split == (1 if vllm_lm.engine._cpu else 0)
    for (ids, name), got in zip(requests, results):
        assert_agrees(got, hf_lm.next_token_logprobs_uncached(ids, lora_name=name))
    assert (results[1].exp() - results[0].exp()).abs().max() > 5 * AGREE  # the adapter matters


def test_lora_sessions_are_never_shared_across_adapters(with_adapters):
    vllm_lm, hf_lm = with_adapters
    p = prompt(vllm_lm, "Sessions per adapter")
    stats = vllm_lm.engine.stats
    vllm_lm.batch_next_token_logprobs_sync([p], lora_name="shifted")
    resumed = stats.sessions_resumed
    # The same tokens plus one under the other adapter: a new request, not shifted's session.
    other = vllm_lm.next_token_logprobs_sync(p + [5], lora_name="shifted2")
    assert stats.sessions_resumed == resumed
    assert_agrees(other, hf_lm.next_token_logprobs_uncached(p + [5], lora_name="shifted2"))
    vllm_lm.next_token_logprobs_sync(p, lora_name="shifted")
    own = vllm_lm.next_token_logprobs_sync(p + [5], lora_name="shifted")
    assert stats.sessions_resumed == resumed + 1
    assert_agrees(own, hf_lm.next_token_logprobs_uncached(p + [5], lora_name="shifted"))


def test_lora_registration_errors_and_sampling(with_adapters, lora_adapters):
    vllm_lm, _ = with_adapters
    p = prompt(vllm_lm)
    with pytest.raises(ValueError, match="nope"):
        vllm_lm.next_token_logprobs_sync(p, lora_name="nope")
    with pytest.raises(ValueError, match="nope"):
        anyio.run(lambda: vllm_lm.sample(p, 3, [], lora_name="nope"))
    with pytest.raises(RuntimeError, match="lora_name"):
        vllm_lm.set_lora(lora_adapters["shifted"], "x")
    eos = [vllm_lm.tokenizer.eos_token_id]
    a = anyio.run(lambda: vllm_lm.sample(p, 6, eos, seed=4, lora_name="shifted"))
    assert a == trio.run(lambda: vllm_lm.sample(p, 6, eos, seed=4, lora_name="shifted"))
    vllm_lm.add_new_lora(lora_adapters["identity"], "tmp")
    assert_agrees(vllm_lm.next_token_logprobs_sync(p, lora_name="tmp"), vllm_lm.next_token_logprobs_sync(p))
    vllm_lm.remove_lora("tmp")
    with pytest.raises(ValueError, match="'tmp'"):
        vllm_lm.next_token_logprobs_sync(p, lora_name="tmp")


def test_closing_releases_the_engine_and_makes_the_model_unusable(vllm_lm):
    """Last: it closes the module's engine."""
    vllm_lm.next_token_logprobs_sync([1, 2])

    async def use():
        async with vllm_lm:
            await vllm_lm.next_token_logprobs([1, 2, 3])
        with pytest.raises(ClosedError):
            await vllm_lm.next_token_logprobs([1, 2])

    trio.run(use)
    assert vllm_lm.engine._core is None
    with pytest.raises(ClosedError):
        vllm_lm.next_token_logprobs_sync([1, 2])
    vllm_lm.close()  # idempotent
