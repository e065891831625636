"""The runtime's guarantees on the real SmolLM2-135M model: no stranded request,
load, cancellation storms, faults, collection and close of a dropped or hung
model (issue 8). Figures are printed (``pytest -s``); the asserts are on counts."""

from __future__ import annotations

import gc
import random
import resource
import threading
import warnings
import weakref

import anyio
import pytest
import torch
from helpers import ask_all_at_once
from references import TOL, max_error, transformers_logprobs

from genlm_anyio import AsyncTransformer, ClosedError
from tools import assets

# Loads SmolLM2's weights: not in the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow

BACKENDS = ["asyncio", "trio"]


@pytest.fixture(scope="module")
def lm(hf_parts):
    with AsyncTransformer(*hf_parts) as model:
        yield model


class Gated:
    """The real model behind a gate: each forward pass waits for ``go`` (or fails
    with ``fault`` once it is let through)."""

    def __init__(self, model):
        self.model = model
        self.go = threading.Event()
        self.started = threading.Event()
        self.fault: BaseException | None = None

    def __getattr__(self, name):  # everything but the forward pass is the model's
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        self.started.set()
        self.go.wait()
        if self.fault is not None:
            raise self.fault
        return self.model(*args, **kwargs)


def matches_reference(model, ids, got) -> bool:
    """``got`` is within TOL of plain transformers' pass of ``ids`` on ``model``."""
    return max_error(transformers_logprobs(model, ids), got) < TOL


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("genlm-anyio")]


# -- defect 0 through the public API ----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("joiner", ["batch", "sync"])
def test_a_batch_of_running_sequences_does_not_strand_the_next_request(hf_parts, backend, joiner):
    """While a request computes, a batch (or sync) call whose sequences all share it
    left a stale release: the next lone request was never led and waited forever."""
    model, tok = hf_parts
    with AsyncTransformer(model, tok) as lm:
        gate = lm.model = Gated(model)
        ids = tok.encode("The river flows")
        other = tok.encode("A different question")
        got = {}

        async def main():
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _put(got, "first", lm.next_token_logprobs(ids)))
                await anyio.to_thread.run_sync(gate.started.wait)
                if joiner == "batch":
                    tg.start_soon(lambda: _put(got, "joined", lm.batch_next_token_logprobs([ids])))
                else:
                    tg.start_soon(
                        lambda: _put(got, "joined", anyio.to_thread.run_sync(lm.batch_next_token_logprobs_sync, [ids]))
                    )
                await anyio.sleep(0.05)
                gate.go.set()
            with anyio.fail_after(30):
                got["next"] = await lm.next_token_logprobs(other)

        anyio.run(main, backend=backend)
        assert torch.equal(got["first"], got["joined"][0])  # one computed row, shared: equal by construction
        lm.model = model
        assert matches_reference(model, ids, got["first"]) and matches_reference(model, other, got["next"])


async def _put(out, key, coro):
    out[key] = await coro


# -- defect 11 ----------------------------------------------------------------------------------
def test_a_model_dropped_without_close_is_collected_and_its_worker_ends(hf_parts):
    lm = AsyncTransformer(*hf_parts, kv_cache_bytes=1 << 24)
    lm.next_token_logprobs_sync([1, 2, 3])
    thread = lm._batcher._thread
    ref = weakref.ref(lm)
    del lm
    gc.collect()
    assert ref() is None
    thread.join(10)
    assert not thread.is_alive()


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_of_a_hung_model_returns_after_its_timeout_and_fails_the_callers(hf_parts, backend):
    model, tok = hf_parts
    lm = AsyncTransformer(model, tok)
    gate = lm.model = Gated(model)
    errors = []

    async def ask(ids):
        try:
            await lm.next_token_logprobs(ids)
        except ClosedError as exc:
            errors.append(str(exc))

    async def main():
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, [1, 2])
            await anyio.to_thread.run_sync(gate.started.wait)
            for i in range(5):
                tg.start_soon(ask, [3, i])  # queued behind the hung batch
            await anyio.sleep(0.05)
            with pytest.warns(RuntimeWarning, match="still computing after 0.5 s"):
                with anyio.fail_after(20):
                    await lm.aclose(timeout=0.5)

    anyio.run(main, backend=backend)
    assert len(errors) == 6
    assert sum("still computing" in e for e in errors) == 1 and sum("before this request ran" in e for e in errors) == 5
    gate.go.set()  # the forward pass ends at last; a second close frees the caches
    lm._batcher._thread.join(30)
    lm.close()
    assert lm.kv_cache.stats.in_use == 0


# -- faults ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_forward_pass_fails_every_waiting_caller_clearly_and_close_returns(hf_parts, backend):
    model, tok = hf_parts
    lm = AsyncTransformer(model, tok)
    gate = lm.model = Gated(model)
    gate.fault = RuntimeError("CUDA error: device-side assert triggered")
    errors = []

    async def ask(ids):
        try:
            await lm.next_token_logprobs(ids)
        except RuntimeError as exc:
            errors.append(exc)

    async def main():
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask, [1, 2])
                await anyio.to_thread.run_sync(gate.started.wait)
                for i in range(50):  # the next batch, and callers sharing its requests
                    tg.start_soon(ask, [3, i % 40])
                await anyio.sleep(0.05)
                gate.go.set()

    anyio.run(main, backend=backend)
    assert len(errors) == 51 and len({id(e) for e in errors}) == 51
    assert all("device-side assert" in str(e) and e.__cause__ is not None for e in errors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the worker stopped in time: no warning
        lm.close(timeout=10)
    assert lm._batcher.closed and not lm._batcher._thread.is_alive()


# -- load -------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_thousand_concurrent_callers_get_right_answers_within_the_kv_budget(hf_parts, backend):
    """1,000 concurrent callers (800 distinct sequences over 25 prompts; 200 share a
    request): every caller answered, a sample within TOL of plain transformers, the KV pool
    within its byte budget while it evicts."""
    model, tok = hf_parts
    budget = 32 << 20  # 728 tokens of SmolLM2: less than the load's distinct prefixes
    bases = [tok.encode(f"Question {chr(65 + i)}: what is the name of") for i in range(25)]
    seqs = [bases[i % 25] + [1000 + i // 25] for i in range(800)]
    order = [i % 800 for i in range(1000)]
    random.Random(1).shuffle(order)
    with AsyncTransformer(model, tok, kv_cache_bytes=budget, logprob_cache_size=0) as lm:
        got = anyio.run(ask_all_at_once, lm, seqs, order, 120, backend=backend)
        assert len(got) == 1000
        for caller in range(0, 1000, 50):
            assert matches_reference(model, seqs[order[caller]], got[caller])
        pool_bytes = 2 * lm.kv_cache.keys.numel() * lm.kv_cache.keys.element_size()
        assert pool_bytes <= budget and lm.kv_cache.stats.in_use < lm.kv_cache.capacity
        assert lm.kv_cache.stats.tokens_evicted > 0
        assert lm.batch_stats.shared >= 200
        print(
            f"\n[load {backend}] 1000 callers: {lm.batch_stats.batches} batches, "
            f"{lm.compute_stats.tokens_computed} tokens computed, KV pool {pool_bytes / 2**20:.1f} MiB "
            f"of {budget / 2**20:.0f} MiB, {lm.kv_cache.stats.tokens_evicted} evicted; "
            f"peak RSS {peak_rss_mib():.0f} MiB"
        )


# -- cancellation storms ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_cancellation_storms_leave_no_wrong_answer_no_hung_caller_and_no_thread(lm, backend):
    """Storms of 300 callers over shared sequences, each single or batch call cancelled
    at a random point (or not): every answer that arrives is right, none hangs, no
    thread is left behind, and the model answers correctly afterwards."""
    tok = lm.tokenizer
    stems = [tok.encode(t) for t in ("The cat sat on", "Rain fell over the", "In the year two")]
    seqs = [stems[i % 3] + [2000 + i % 7] * (1 + i % 3) for i in range(42)]
    want = {tuple(s): transformers_logprobs(lm.model, s) for s in seqs}
    threads_before = set(threading.enumerate())
    totals = {"answered": 0, "cancelled": 0, "wrong": 0}

    def check(ids, got):
        if max_error(want[tuple(ids)], got) >= TOL:
            totals["wrong"] += 1
        totals["answered"] += 1

    async def caller(rng):
        picks = [rng.choice(seqs) for _ in range(rng.randint(1, 3))]
        with anyio.move_on_after(rng.random() * 0.3 if rng.random() < 0.7 else 60) as scope:
            await anyio.sleep(rng.random() * 0.05)
            if len(picks) == 1:
                check(picks[0], await lm.next_token_logprobs(picks[0]))
            else:
                for ids, got in zip(picks, await lm.batch_next_token_logprobs(picks)):
                    check(ids, got)
        totals["cancelled"] += scope.cancelled_caught

    async def storm(seed):
        rng = random.Random(seed)
        lm.clear_cache()
        async with anyio.create_task_group() as tg:
            for _ in range(300):
                tg.start_soon(caller, random.Random(rng.random()))

    async def main():
        with anyio.fail_after(240):
            for seed in range(4):
                await storm(seed)

    anyio.run(main, backend=backend)
    assert totals["wrong"] == 0
    assert totals["cancelled"] > 100 and totals["answered"] > 100
    assert set(threading.enumerate()) - threads_before <= set(worker_threads())
    ids = stems[0] + [5]
    assert matches_reference(lm.model, ids, lm.next_token_logprobs_sync(ids))
    print(f"\n[storms {backend}] 4 x 300 callers: {totals}")


# -- Ctrl-C ------------------------------------------------------------------------------------------
SIGINT_PROGRAM = """
import faulthandler
import signal
import sys

import anyio
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from genlm_anyio import AsyncTransformer

faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for the stacks of a hang
# A program run in a terminal gets Ctrl-C. This one inherits the test process's
# SIGINT, which is ignored where a shell without job control started the tests in
# the background (POSIX shells ignore SIGINT and SIGQUIT for such commands, and an
# ignored or blocked signal survives exec): undo that, as a terminal would have it.
inherited = signal.getsignal(signal.SIGINT), signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
path, library = sys.argv[1], sys.argv[2]
lm = AsyncTransformer(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path))


async def particle(i):
    ids = [100 + i, 2, 3]
    while True:
        logprobs = await lm.next_token_logprobs(ids)
        ids = ids + [int(logprobs.argmax())] if len(ids) < 60 else [100 + i, 2, 3]
        if i == 0 and len(ids) == 6:
            print("ready", inherited, flush=True)


async def main():
    async with anyio.create_task_group() as tg:
        for i in range(16):
            tg.start_soon(particle, i)


anyio.run(main, backend=library)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_stops_a_busy_program_promptly(tmp_path, backend):
    """SIGINT to a program whose 16 tasks keep the model busy: it exits with
    KeyboardInterrupt, once the running batch ends (the worker neither keeps it
    alive nor runs inside torch while the process tears torch down)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import genlm_anyio

    script = tmp_path / "busy.py"
    script.write_text(SIGINT_PROGRAM)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(os.path.dirname(os.path.dirname(genlm_anyio.__file__))), os.environ.get("PYTHONPATH", "")]
        ),
    )
    # As a context manager, Popen closes its pipes however the test ends.
    with subprocess.Popen(
        [sys.executable, str(script), str(assets.smollm2_dir()), backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            ready = proc.stdout.readline().strip()
            assert ready.startswith("ready"), proc.stderr.read()
            time.sleep(0.5)  # mid-batch, with requests queued
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            try:
                _, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGUSR1)  # every thread's stack, to stderr
                time.sleep(2)
                proc.kill()
                _, stderr = proc.communicate()
                pytest.fail(f"still running 30 s after SIGINT; its threads:\n{stderr[-8000:]}")
            print(
                f"\n[ctrl-c {backend}] exited {time.monotonic() - sent:.2f} s after SIGINT, code {proc.returncode}"
                f" (SIGINT handler and blocked, as inherited: {ready.removeprefix('ready ')})"
            )
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # Killed by SIGINT (asyncio re-raises it) or exit status 1 (trio's exception
    # group); not -6: a worker inside torch during finalization aborted the process.
    assert proc.returncode in (1, -signal.SIGINT), stderr[-2000:]
    assert "KeyboardInterrupt" in stderr and "terminate called" not in stderr
