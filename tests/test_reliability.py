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
from conftest import assets

from genlm_anyio import AsyncTransformer, ClosedError

TOL = 1e-4
BACKENDS = ["asyncio", "trio"]


@pytest.fixture(scope="module")
def hf_parts():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_dir()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


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

    def __call__(self, *args, **kwargs):
        self.started.set()
        self.go.wait()
        if self.fault is not None:
            raise self.fault
        return self.model(*args, **kwargs)


def matches_uncached(lm, ids, got) -> bool:
    return (lm.next_token_logprobs_uncached(ids) - got).abs().max().item() < TOL


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
                    tg.start_soon(lambda: _put(got, "joined", anyio.to_thread.run_sync(lm.batch_next_token_logprobs_sync, [ids])))
                await anyio.sleep(0.05)
                gate.go.set()
            with anyio.fail_after(30):
                got["next"] = await lm.next_token_logprobs(other)

        anyio.run(main, backend=backend)
        assert torch.equal(got["first"], got["joined"][0])
        lm.model = model
        assert matches_uncached(lm, ids, got["first"]) and matches_uncached(lm, other, got["next"])


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
