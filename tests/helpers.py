"""Helpers the tests share: engine options, tokenizers and llama.cpp's cases from
the asset cache, and the concurrent-caller runs every language-model backend's
tests use. (Fixtures are in conftest.py.)"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel

from tools import assets

# The vLLM engines of the tests that check processes (an engine core in its own
# process, tensor parallelism, replicas) rather than the model's graph run eagerly:
# torch.compile costs about 100 s per engine start on a 2-core CPU, eager about 12 s.
# tests/test_vllm.py's engine keeps vLLM's defaults (compiled), as users run it.
VLLM_EAGER_OPTS = {"dtype": "float32", "block_size": 32, "seed": 0, "enforce_eager": True}


class UserWorkerExtension:
    """A worker extension of a user's own (``engine_opts={"worker_extension_cls": ...}``):
    vLLM takes one, so genlm-anyio's rows then come from ``logprobs=-1``."""

    def user_extension_answer(self) -> int:
        return 42


@contextlib.contextmanager
def vllm_start_warns(engine_opts: dict[str, Any]) -> Iterator[None]:
    """Check what starting a vLLM engine with ``engine_opts`` on this CPU warns: on
    the ATen kernel paths where torch's inductor fails (``ATEN_CPU_CAPABILITY=default``,
    or ``avx2`` with tensor parallelism; docs/vllm.md), that it runs without
    torch.compile; elsewhere, not that. Other warnings meet the usual filters."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    parallel = engine_opts.get("tensor_parallel_size", 1) > 1
    compiled = not engine_opts.get("enforce_eager", False)
    expected = (capability == "default" and (compiled or parallel)) or (capability == "avx2" and parallel)
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=".*without torch.compile", category=RuntimeWarning)
        yield
    said = any(issubclass(w.category, RuntimeWarning) and "without torch.compile" in str(w.message) for w in caught)
    assert said == expected, f"ATEN_CPU_CAPABILITY={capability}, {engine_opts}: warned {said}, expected {expected}"


# Families whose tokenizer adds a SentencePiece dummy-prefix space at the start of a text.
DUMMY_PREFIX = {"llama-spm", "phi-3", "gemma-4"}


@functools.cache
def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.tokenizer_dir(name))


@functools.cache
def vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test strings for ``ggml-vocab-{name}.gguf`` with their reference ids."""
    base = assets.vocab_dir() / f"ggml-vocab-{name}.gguf"
    inputs = base.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = base.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    if inputs and inputs[-1] == "":
        inputs.pop()
    ids = [[int(t) for t in line.split()] for line in outputs[: len(inputs)]]
    assert len(ids) == len(inputs), f"{name}: {len(inputs)} strings, {len(ids)} id lines"
    return list(zip(inputs, ids))


async def ask_all_at_once(lm, seqs, order, limit: float) -> dict:
    """Caller ``i`` asks for ``seqs[order[i]]``, every caller at once, all within
    ``limit`` seconds: each caller's answer."""
    got = {}

    async def ask(caller, k):
        got[caller] = await lm.next_token_logprobs(seqs[k])

    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            for caller, k in enumerate(order):
                tg.start_soon(ask, caller, k)
    return got


async def ask_concurrently(lm, seqs, limit: float = 600) -> list:
    """Each sequence of ``seqs`` from its own task, as particles ask, all within
    ``limit`` seconds: the answers, in the order of ``seqs``."""
    got = await ask_all_at_once(lm, seqs, range(len(seqs)), limit)
    return [got[i] for i in range(len(seqs))]


async def answers_or_errors(lm, seqs, error: type[Exception], limit: float | None = None) -> list:
    """Ask for every sequence of ``seqs`` at once, all within ``limit`` seconds
    (None: no limit): for each, its log-probabilities or the ``error`` it raised."""
    outcomes: list = [None] * len(seqs)

    async def ask(i):
        try:
            outcomes[i] = await lm.next_token_logprobs(seqs[i])
        except error as exc:
            outcomes[i] = exc

    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            for i in range(len(seqs)):
                tg.start_soon(ask, i)
    return outcomes


class Outcomes(list):
    """How each call passed to :meth:`ask` ended: None, or the exception it raised."""

    async def ask(self, coro) -> None:
        try:
            await coro
            self.append(None)
        except Exception as exc:
            self.append(exc)


def child_processes(named: str = "") -> dict[int, Any]:
    """This process's living descendants (pid -> ``psutil.Process``) whose name or
    command line holds ``named``, but Python's multiprocessing resource tracker,
    which the first spawned process starts and which lives as long as this process."""
    import psutil  # a dependency of vLLM's, which the tests that start engine processes need

    found = {}
    for p in psutil.Process().children(recursive=True):
        try:
            text = p.name() + " " + " ".join(p.cmdline())
            if "resource_tracker" not in text and named in text:
                found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass  # a short-lived helper that ended meanwhile
    return found


async def good_beside_bad(lm, good_ids, bad_ids):
    """Ask for ``good_ids`` and ``bad_ids`` concurrently: (the good result, the
    exception the bad request raised, or None)."""
    outcome = {"bad": None}

    async def good():
        outcome["good"] = await lm.next_token_logprobs(good_ids)

    async def wrong():
        try:
            await lm.next_token_logprobs(bad_ids)
        except (ValueError, TypeError) as exc:
            outcome["bad"] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(good)
        tg.start_soon(wrong)
    return outcome["good"], outcome["bad"]


async def ask_after_cancelled_callers(lm, ids):
    """Cancel one caller at once and one while its request is pending, then ask
    for ``ids + [79]``: the answer of a model the cancellations left usable."""
    with anyio.move_on_after(0):
        await lm.next_token_logprobs(ids + [77])
    async with anyio.create_task_group() as tg:
        tg.start_soon(lm.next_token_logprobs, ids + [78])
        await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    return await lm.next_token_logprobs(ids + [79])
