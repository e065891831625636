"""ReplicatedLM's routing, failure isolation and lifetime, over transformers
replicas of SmolLM2 (sharing one copy of the weights, each with its own caches
and worker). The same class over two vLLM engines: tests/test_vllm_replicas.py."""

from __future__ import annotations

import anyio
import pytest
import torch
from helpers import answers_or_errors, load_tokenizer
from references import assert_close_to, transformers_logprobs

from genlm_anyio import AsyncTransformer, ClosedError, MockAsyncLM
from genlm_anyio.backends.replicas import ReplicatedLM
from tools import assets

pytestmark = pytest.mark.slow

PROMPT = [464, 2068, 7586, 21831]


@pytest.fixture
def replicas(hf_parts):
    """``replicas(n)``: n transformers replicas over the one SmolLM2 (their own caches and workers)."""
    made: list[AsyncTransformer] = []

    def make(n: int = 2) -> list[AsyncTransformer]:
        made.extend(AsyncTransformer(*hf_parts) for _ in range(n))
        return made[-n:]

    yield make
    for lm in made:
        lm.close()


def computed(lm: AsyncTransformer) -> int:
    """The requests a replica has computed (its batching engine's count)."""
    return lm.batch_stats.batched_requests


async def sis(lm, n: int, steps: int, seed: int = 0) -> list[list[int]]:
    """Particles that each extend their own start by ``steps`` tokens, one request
    per step, all particles concurrently: each particle's sequence after each step."""
    paths: list[list[list[int]]] = [[] for _ in range(n)]

    async def particle(i: int) -> None:
        ids = PROMPT + [1000 + i]  # distinct from the start, as SMC particles soon are
        generator = torch.Generator().manual_seed(seed + i)
        for _ in range(steps):
            logprobs = await lm.next_token_logprobs(ids)
            ids = ids + [int(torch.multinomial(logprobs.exp(), 1, generator=generator))]
            paths[i].append(ids)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(particle, i)
    return paths


def test_a_particles_steps_stay_on_one_replica_and_its_paths_are_one_replicas(replicas):
    n, steps = 8, 6
    with ReplicatedLM(replicas()) as rep:
        paths = anyio.run(sis, rep, n, steps)
        # Each particle's requests went to one replica.
        homes = []
        for path in paths:
            where = {rep.replica_of(ids) for ids in path[:-1]}
            assert len(where) == 1, where
            homes.append(where.pop())
        assert set(homes) == {0, 1}  # both replicas got particles
        assert (
            sum(rep.routing_stats.requests) == rep.routing_stats.affinity_hits + rep.routing_stats.balanced == n * steps
        )
        assert rep.routing_stats.balanced == n and rep.routing_stats.affinity_hits == n * (steps - 1)
        # Every replica computed only what was routed to it.
        assert [computed(r) for r in rep.replicas] == rep.routing_stats.requests
    # One replica batches 8 rows where two batch 4 each: rows within TOL of each other,
    # so the same draws, unless one falls within TOL of a boundary of the cumulative
    # distribution (chance below n * steps * TOL per run; seeded, so fixed per machine).
    (one,) = replicas(1)
    assert anyio.run(sis, one, n, steps) == paths


def test_sequences_without_a_recorded_prefix_are_spread_evenly(replicas, hf_parts):
    with ReplicatedLM(replicas(3)) as rep:
        seqs = [[t, t + 1] for t in range(100, 112)]
        got = rep.batch_next_token_logprobs_sync(seqs)
        assert rep.routing_stats.requests == [4, 4, 4] and rep.routing_stats.balanced == 12
        for ids, row in zip(seqs, got):
            assert_close_to(transformers_logprobs(hf_parts[0], ids), row, str(ids))


def test_a_busy_replica_gives_up_its_prefix_beyond_max_imbalance(replicas):
    with ReplicatedLM(replicas(), max_imbalance=2) as rep:
        rep.next_token_logprobs_sync(PROMPT)
        home = rep.replica_of(PROMPT)
        rep.batch_next_token_logprobs_sync([PROMPT + [t] for t in range(10)])
        # One request of the batch was on the prompt's replica at most 2 ahead of the other.
        counts = rep.routing_stats.requests
        assert counts[home] - 1 - counts[1 - home] in (2, 3)
        assert rep.routing_stats.affinity_hits + rep.routing_stats.balanced == 11


def test_sampling_goes_to_one_replica_which_then_holds_the_sample(replicas):
    one, *two = replicas(3)
    with ReplicatedLM(two) as rep:
        got = anyio.run(lambda: rep.sample(PROMPT, 5, [], seed=7))
        # Both compute the same lone steps (the prompt, then one token at a time): equal by construction.
        assert got == anyio.run(lambda: one.sample(PROMPT, 5, [], seed=7))
        home = rep.replica_of(PROMPT)
        assert computed(rep.replicas[home]) == 5 and computed(rep.replicas[1 - home]) == 0
        assert rep.replica_of(PROMPT + got + [1]) == home


def test_a_failing_replica_fails_only_its_callers(replicas, hf_parts):
    with ReplicatedLM(replicas()) as rep:
        rep.replicas[1].close()
        seqs = [[t] for t in range(300, 306)]
        outcomes = anyio.run(answers_or_errors, rep, seqs, ClosedError)
        for i, seq in enumerate(seqs):
            if rep.replica_of(seq) == 1:
                assert isinstance(outcomes[i], ClosedError) and "replica 1" in str(outcomes[i])
            else:
                assert_close_to(transformers_logprobs(hf_parts[0], seq), outcomes[i], str(seq))
        assert rep.routing_stats.requests == [3, 3]


def test_lora_adapters_are_loaded_into_every_replica(hf_parts, lora_adapters):
    """Both replicas over one freshly loaded model (the adapters go into it), one of
    them also beside an instance that shares the model and has no adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets.smollm2_dir(), dtype=torch.float32)
    tok = hf_parts[1]
    with ReplicatedLM([AsyncTransformer(model, tok) for _ in range(2)]) as rep, AsyncTransformer(model, tok) as plain:
        rep.add_new_lora(lora_adapters["shifted"], "a")
        seqs = [[5, 6], [7, 8]]
        got = rep.batch_next_token_logprobs_sync(seqs, lora_name="a")
        assert rep.routing_stats.requests == [1, 1]  # each replica answered one under the adapter
        base = plain.next_token_logprobs_sync([5, 6])  # the base model, though the model holds adapters
        assert_close_to(transformers_logprobs(hf_parts[0], [5, 6]), base, "base")
        peft_base = AutoModelForCausalLM.from_pretrained(assets.smollm2_dir(), dtype=torch.float32)
        with_adapter = PeftModel.from_pretrained(peft_base, lora_adapters["shifted"]).eval()
        for ids, row in zip(seqs, got):  # one row from each replica
            assert_close_to(transformers_logprobs(with_adapter, ids), row, f"{ids} under the adapter")
        assert (got[0] - base).abs().max() > 1e-2
        rep.remove_lora("a")
        for r in rep.replicas:
            with pytest.raises(ValueError, match="a"):
                r.next_token_logprobs_sync([5, 6], lora_name="a")


def test_close_and_aclose_close_every_replica(replicas):
    rep = ReplicatedLM(replicas())
    rep.close()
    for r in rep.replicas:
        with pytest.raises(ClosedError):
            r.next_token_logprobs_sync([1])
    with pytest.raises(ClosedError):
        rep.next_token_logprobs_sync([1])

    async def main():
        async with ReplicatedLM(replicas()) as rep:
            await rep.next_token_logprobs([1, 2])
        return rep

    rep = anyio.run(main)
    for r in rep.replicas:
        with pytest.raises(ClosedError):
            r.next_token_logprobs_sync([1])


def test_bad_replicas_are_refused(replicas):
    with pytest.raises(ValueError, match="replicas"):
        ReplicatedLM([])
    with pytest.raises(TypeError, match="replicas"):
        ReplicatedLM(replicas(1)[0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"replicas\[1\]"):
        ReplicatedLM([replicas(1)[0], "model"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="vocab"), MockAsyncLM(load_tokenizer("qwen2")) as other:
        ReplicatedLM([replicas(1)[0], other])
    with pytest.raises(ValueError, match="max_imbalance"):
        ReplicatedLM(replicas(), max_imbalance=-1)
    with pytest.raises(TypeError, match="replicas"):
        ReplicatedLM.from_name("x", replicas="2")  # type: ignore[arg-type]


def test_two_transformers_replicas_from_name_split_the_work_and_agree_with_one():
    with ReplicatedLM.from_name(
        str(assets.smollm2_dir()), replicas=2, backend="hf", replica_opts={"hf_opts": {"dtype": torch.float32}}
    ) as rep:
        seqs = [rep.tokenizer.encode(t) for t in ("Montreal is", "The quick brown fox", "1 2 3", "Hello")]
        got = anyio.run(rep.batch_next_token_logprobs, seqs)
        assert rep.routing_stats.requests == [2, 2]
        grown = rep.batch_next_token_logprobs_sync([s + [28] for s in seqs])
        assert rep.routing_stats.requests == [4, 4] and rep.routing_stats.affinity_hits == 4
        model = rep.replicas[0].model  # the replicas share it
        for ids, a, b in zip(seqs, got, grown):
            assert_close_to(transformers_logprobs(model, ids), a, str(ids))
            assert_close_to(transformers_logprobs(model, ids + [28]), b, f"{ids} + [28]")
