"""The vLLM backend on vLLM's multiprocess engine, whose engine core runs in a
child process, and what happens when that process dies.

Run it in a pytest process of its own (``pytest -m vllm tests/test_vllm_process.py``):
vLLM fixes its settings for the whole process once an in-process engine has
started, so the one in-process engine here starts last of all.
"""

from __future__ import annotations

import os
import signal

import anyio
import psutil  # a dependency of vLLM's
import pytest
import torch
from helpers import VLLM_EAGER_OPTS, Outcomes

from genlm_anyio import AsyncVirtualLM, ClosedError
from genlm_anyio.backends.vllm.rows import CapturedRows, RankedRows, WorkerRows
from tools import assets

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DIED = "engine process died"


def sis(lm: AsyncVirtualLM, particles: int = 8, steps: int = 6) -> tuple[list[list[int]], list[float]]:
    """Sequential importance sampling as the seed example runs it: every particle
    extends its sequence by one token per step, all of them at once, each drawn by
    inverse CDF from a fixed uniform number; returns the sequences and their log weights."""
    prompt = lm.tokenizer.encode("Montreal is")
    uniforms = torch.rand(steps, particles, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seqs, weights = [list(prompt) for _ in range(particles)], [0.0] * particles

    async def main():
        rows: list[torch.Tensor | None] = [None] * particles

        async def one(i):
            rows[i] = await lm.next_token_logprobs(seqs[i])

        for t in range(steps):
            async with anyio.create_task_group() as tg:
                for i in range(particles):
                    tg.start_soon(one, i)
            for i, row in enumerate(rows):
                cdf = row.double().exp().cumsum(0)
                token = min(int(torch.searchsorted(cdf, uniforms[t, i] * cdf[-1])), lm.vocab_size - 1)
                seqs[i].append(token)
                weights[i] += row[token].item()

    anyio.run(main)
    return seqs, weights


def test_a_killed_engine_process_fails_every_waiting_caller_and_close_returns(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    lm = AsyncVirtualLM.from_name(str(assets.smollm2_dir()), engine_opts=VLLM_EAGER_OPTS)
    try:
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        engine = [p for p in started if "EngineCore" in " ".join(p.cmdline()) + p.name()]
        assert len(engine) == 1, [(p.pid, p.name(), p.cmdline()) for p in started]
        with pytest.raises(RuntimeError, match="not in this process"):
            lm.underlying_model  # noqa: B018 - the engine core (and its model) is the child process
        p = lm.tokenizer.encode("Montreal is a city in")
        out = lm.next_token_logprobs_sync(p)
        assert out.shape == (lm.vocab_size,) and torch.isfinite(out).all()
        assert torch.logsumexp(out, 0).item() == pytest.approx(0.0, abs=1e-4)
        # The worker is in the child, so rows come through its extension, V float32s
        # each, and a resumed session (re-sent to the child) gives the row a new request gives.
        rows = lm.engine.rows
        assert isinstance(rows, WorkerRows)
        received = rows.bytes_received
        resumed = lm.engine.stats.sessions_resumed
        grown = lm.next_token_logprobs_sync(p + [11])
        assert lm.engine.stats.sessions_resumed == resumed + 1
        assert rows.bytes_received == received + 4 * lm.vocab_size
        lm.clear_cache()
        assert (grown - lm.next_token_logprobs_sync(p + [11])).abs().max().item() < 1e-4

        outcomes = Outcomes()

        async def main():
            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    requests = lm.engine.stats.requests
                    tg.start_soon(outcomes.ask, lm.sample(p, 4000, [], seed=1))
                    # Once its decode loop runs (the engine's thread counts what it adds), the rest queue.
                    while lm.engine.stats.requests == requests:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                    for t in range(50):
                        tg.start_soon(outcomes.ask, lm.next_token_logprobs(p + [t]))
                    await anyio.sleep(0.5)
                    os.kill(engine[0].pid, signal.SIGKILL)
                # The model fails clearly from now on, and closes.
                with pytest.raises(RuntimeError, match=DIED):
                    await lm.next_token_logprobs(p + [99])
                await lm.aclose()
                with pytest.raises(ClosedError):
                    await lm.next_token_logprobs(p)

        anyio.run(main)
        assert len(outcomes) == 51
        assert all(isinstance(e, RuntimeError) and DIED in str(e) for e in outcomes), outcomes[:3]
        assert lm.engine._core is None
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not [p for p in alive if p in engine], alive
    finally:
        lm.close()


def test_sis_on_the_multiprocess_engine_equals_sis_in_process(monkeypatch, capfd):
    """The same SIS run on the multiprocess engine, its rows through genlm-anyio's
    worker extension; on it again with a worker extension of the user's (vLLM
    takes one), its rows through ``logprobs=-1`` (vLLM's ranking, over the
    engine's socket); and, once they are closed, on an in-process engine (rows
    from genlm-anyio's logits processor): the same particles, the same weights.
    Last in this file: see the module's docstring."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    runs = {}
    user_extension = {**VLLM_EAGER_OPTS, "worker_extension_cls": "helpers.UserWorkerExtension"}
    for source, opts, multiprocess in (
        (WorkerRows, VLLM_EAGER_OPTS, True),
        (RankedRows, user_extension, True),
        (CapturedRows, VLLM_EAGER_OPTS, False),
    ):
        lm = AsyncVirtualLM.from_name(str(assets.smollm2_dir()), engine_opts=opts, multiprocess=multiprocess)
        try:
            assert type(lm.engine.rows) is source
            runs[source] = sis(lm)
            # Step 1 asks once for the shared prompt; from step 3 on every particle resumes its session.
            assert lm.engine.stats.sessions_resumed >= 8 * 4
            # Each batch is one engine round and one forward pass: an engine core in
            # another process, which steps as soon as a request arrives, is held
            # while a round's requests go in.
            assert lm.engine.stats.engine_steps == lm.engine.stats.rounds >= 6, lm.engine.stats
            if multiprocess:  # vLLM's line for each pause and resume is dropped in the engine process
                logged = "".join(capfd.readouterr())
                assert "(EngineCore" in logged  # the engine process's lines are the ones read here
                assert "setting pause state" not in logged
            if source is WorkerRows:
                # One row per engine request or resumed session, V float32s each.
                stats = lm.engine.stats
                assert lm.engine.rows.bytes_received == (stats.requests + stats.sessions_resumed) * 4 * lm.vocab_size
            if source is RankedRows:  # the user's extension is in the workers
                assert lm.engine._engine.collective_rpc("user_extension_answer") == [42]
        finally:
            lm.close()
    in_seqs, in_weights = runs[CapturedRows]
    for source in (WorkerRows, RankedRows):
        seqs, weights = runs[source]
        assert seqs == in_seqs, source.__name__
        assert max(abs(a - b) for a, b in zip(weights, in_weights)) < 1e-3, source.__name__
