"""ReplicatedLM's routing, failure isolation and lifetime, over mock replicas
(deterministic log-probabilities over a real tokenizer, no weights). The same
class over two vLLM engines: tests/test_vllm_replicas.py."""

from __future__ import annotations

import anyio
import pytest
import torch
from conftest import assets, load_tokenizer

from genlm_anyio import ClosedError, MockAsyncLM
from genlm_anyio.backends.replicas import ReplicatedLM

PROMPT = [464, 2068, 7586, 21831]


def mocks(n: int = 2) -> list[MockAsyncLM]:
    return [MockAsyncLM(load_tokenizer("gpt-2")) for _ in range(n)]


async def sis(lm, n: int, steps: int, seed: int = 0) -> list[list[int]]:
    """Particles that each extend PROMPT by ``steps`` tokens, one request per
    step, all particles concurrently: each particle's sequence after each step."""
    paths: list[list[list[int]]] = [[] for _ in range(n)]

    async def particle(i: int) -> None:
        ids = list(PROMPT)
        generator = torch.Generator().manual_seed(seed + i)
        for _ in range(steps):
            logprobs = await lm.next_token_logprobs(ids)
            ids = ids + [int(torch.multinomial(logprobs.exp(), 1, generator=generator))]
            paths[i].append(ids)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(particle, i)
    return paths


def test_a_particles_steps_stay_on_one_replica_and_results_equal_one_replicas():
    n, steps = 8, 6
    with ReplicatedLM(mocks()) as rep:
        paths = anyio.run(sis, rep, n, steps)
        # From the second step on (the first asks for the prompt all particles
        # share), each particle's requests went to one replica.
        homes = []
        for path in paths:
            where = {rep.replica_of(ids) for ids in path[:-1]}
            assert len(where) == 1, where
            homes.append(where.pop())
        assert set(homes) == {0, 1}  # both replicas got particles
        assert sum(rep.stats.requests) == rep.stats.affinity_hits + rep.stats.balanced == n * steps - (n - 1)
        assert rep.stats.affinity_hits >= n * (steps - 2)
        # Every replica computed only what was routed to it.
        assert [r.computed for r in rep.replicas] == rep.stats.requests
    with MockAsyncLM(load_tokenizer("gpt-2")) as one:
        assert anyio.run(sis, one, n, steps) == paths


def test_sequences_without_a_recorded_prefix_are_spread_evenly():
    with ReplicatedLM(mocks(3)) as rep:
        seqs = [[t, t + 1] for t in range(100, 112)]
        got = rep.batch_next_token_logprobs_sync(seqs)
        assert rep.stats.requests == [4, 4, 4] and rep.stats.balanced == 12
        assert torch.equal(got, rep.replicas[0].batch_next_token_logprobs_sync(seqs))


def test_a_busy_replica_gives_up_its_prefix_beyond_max_imbalance():
    with ReplicatedLM(mocks(), max_imbalance=2) as rep:
        rep.next_token_logprobs_sync(PROMPT)
        home = rep.replica_of(PROMPT)
        rep.batch_next_token_logprobs_sync([PROMPT + [t] for t in range(10)])
        # One request of the batch was on the prompt's replica at most 2 ahead of the other.
        counts = rep.stats.requests
        assert counts[home] - 1 - counts[1 - home] in (2, 3)
        assert rep.stats.affinity_hits + rep.stats.balanced == 11


def test_sampling_goes_to_one_replica_which_then_holds_the_sample():
    with ReplicatedLM(mocks()) as rep, MockAsyncLM(load_tokenizer("gpt-2")) as one:
        got = anyio.run(lambda: rep.sample(PROMPT, 5, [], seed=7))
        assert got == anyio.run(lambda: one.sample(PROMPT, 5, [], seed=7))
        home = rep.replica_of(PROMPT)
        assert rep.replicas[home].computed == 5 and rep.replicas[1 - home].computed == 0
        assert rep.replica_of(PROMPT + got + [1]) == home


def test_a_failing_replica_fails_only_its_callers():
    with ReplicatedLM(mocks()) as rep:
        rep.replicas[1].close()
        seqs = [[t] for t in range(300, 306)]
        outcomes: dict[int, object] = {}

        async def ask(i):
            try:
                outcomes[i] = await rep.next_token_logprobs(seqs[i])
            except ClosedError as exc:
                outcomes[i] = exc

        async def main():
            async with anyio.create_task_group() as tg:
                for i in range(len(seqs)):
                    tg.start_soon(ask, i)

        anyio.run(main)
        for i, seq in enumerate(seqs):
            if rep.replica_of(seq) == 1:
                assert isinstance(outcomes[i], ClosedError) and "replica 1" in str(outcomes[i])
            else:
                assert torch.equal(outcomes[i], rep.replicas[0].next_token_logprobs_sync(seq))
        assert rep.stats.requests == [3, 3]


def test_lora_adapters_are_loaded_into_every_replica():
    with ReplicatedLM(mocks()) as rep:
        rep.add_new_lora("/nowhere/adapter", "a")
        assert all(r.loras == {"a": "/nowhere/adapter"} for r in rep.replicas)
        got = rep.batch_next_token_logprobs_sync([[5, 6], [7, 8]], lora_name="a")
        assert torch.equal(got[0], rep.replicas[0].next_token_logprobs_sync([5, 6], lora_name="a"))
        assert not torch.equal(got[0], rep.replicas[0].next_token_logprobs_sync([5, 6]))
        rep.remove_lora("a")
        assert all(r.loras == {} for r in rep.replicas)


def test_close_and_aclose_close_every_replica():
    rep = ReplicatedLM(mocks())
    rep.close()
    for r in rep.replicas:
        with pytest.raises(ClosedError):
            r.next_token_logprobs_sync([1])
    with pytest.raises(ClosedError):
        rep.next_token_logprobs_sync([1])

    async def main():
        async with ReplicatedLM(mocks()) as rep:
            await rep.next_token_logprobs([1, 2])
        return rep

    rep = anyio.run(main)
    for r in rep.replicas:
        with pytest.raises(ClosedError):
            r.next_token_logprobs_sync([1])


def test_bad_replicas_are_refused():
    with pytest.raises(ValueError, match="replicas"):
        ReplicatedLM([])
    with pytest.raises(TypeError, match="replicas"):
        ReplicatedLM(mocks(1)[0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"replicas\[1\]"):
        ReplicatedLM([mocks(1)[0], "model"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="vocab"):
        ReplicatedLM([MockAsyncLM(load_tokenizer("gpt-2")), MockAsyncLM(load_tokenizer("qwen2"))])
    with pytest.raises(ValueError, match="max_imbalance"):
        ReplicatedLM(mocks(), max_imbalance=-1)
    with pytest.raises(TypeError, match="replicas"):
        ReplicatedLM.from_name("x", replicas="2")  # type: ignore[arg-type]


@pytest.mark.slow
def test_two_transformers_replicas_from_name_split_the_work_and_agree_with_one():
    with ReplicatedLM.from_name(
        str(assets.smollm2_dir()), replicas=2, backend="hf", replica_opts={"hf_opts": {"dtype": torch.float32}}
    ) as rep:
        seqs = [rep.tokenizer.encode(t) for t in ("Montreal is", "The quick brown fox", "1 2 3", "Hello")]
        got = anyio.run(rep.batch_next_token_logprobs, seqs)
        assert rep.stats.requests == [2, 2]
        grown = rep.batch_next_token_logprobs_sync([s + [28] for s in seqs])
        assert rep.stats.requests == [4, 4] and rep.stats.affinity_hits == 4
        for ids, a, b in zip(seqs, got, grown):
            want = rep.replicas[0].next_token_logprobs_uncached(ids)
            assert (a - want).abs().max().item() < 1e-4
            assert (b - rep.replicas[1].next_token_logprobs_uncached(ids + [28])).abs().max().item() < 1e-4
