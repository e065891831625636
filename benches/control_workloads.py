"""genlm-control programs used as benchmark workloads, served in a process of its own.

    python -m genlm_anyio.compat benches/control_workloads.py MODEL   # on genlm-anyio
    python benches/control_workloads.py MODEL                         # on genlm-backend

Plain, the programs run on genlm-backend (its module file is checked to be
genlm-backend's own); through the compat switch, on genlm-anyio. The process
loads the model once (``genlm.backend.load_model_by_name``) and answers
``common.Worker`` requests: ``run(workload, particles, max_tokens, seed,
prompt_tokens, batch_size)`` runs one SMC call (re-seeding first) and returns
its wall time. It uses only genlm-control's and genlm-bytes' public API (and the
``AsyncLM`` request methods those libraries call), so the same file measures
both. WORKLOAD is one of:

- ``direct``: ``direct_token_sampler(PromptedLLM).smc(...)`` (getting started);
- ``regex``: a ``BoolFSA`` regex with ``AWRS`` (the README's regex example);
- ``json``: a ``JsonSchema`` with ``AWRS`` on a chat prompt (the README's JSON example);
- ``bytes``: the byte-level LM, ``ByteLLM`` (genlm-bytes' beam) with ``direct_token_sampler``.

``prompt_tokens`` > 0 puts a few-shot prompt of about that many tokens before
``direct`` and ``json`` (``benches/prompts.py``), computed first with
``cache_kv`` on both libraries and not timed (genlm-control does not cache a
prompt itself; genlm-backend would otherwise compute it again in every batch).
``batch_size`` sets genlm-backend's (and genlm-anyio's) ``batch_size``.

Each answer: the start-up time (in the first answer: importing genlm-control,
genlm-bytes and the backend, and loading the model), the wall times
(``build_s`` for building the sampler, ``seconds`` for the SMC call), the time
with at least one LM request outstanding (``lm_busy_s``), the counts that show
the work done (LM requests, contexts asked for, tokens generated, steps, forward
passes and tokens computed), resident memory, and the posterior's size.
``profile=True`` prints a cProfile summary of the event-loop thread to the
process's log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import cProfile
import io
import json
import pstats
import random
import sys
import time
from collections.abc import Awaitable
from typing import Any, Callable

import numpy as np
import prompts
import torch
from common import RssPeak, genlm_backend_module, serve
from workers import PassCounter, counters

WORKLOADS = ("direct", "regex", "json", "bytes")


class LMMeter:
    """Counts the LM requests a program makes and the wall time during which any is outstanding.

    Wraps, on one model instance, the two request methods genlm-control and
    genlm-bytes call (``next_token_logprobs``, ``batch_next_token_logprobs``).
    Overlapping requests count their shared wall time once; a request made from
    inside a measured one (genlm-backend's batch method calls its single one) is
    not counted again.
    """

    _inside: contextvars.ContextVar[bool] = contextvars.ContextVar("inside_lm_request", default=False)

    def __init__(self, model: Any):
        self.reset()
        self._outstanding = 0
        self._since = 0.0
        model.next_token_logprobs = self._wrap(model.next_token_logprobs, lambda args: 1)
        model.batch_next_token_logprobs = self._wrap(model.batch_next_token_logprobs, lambda args: len(args[0]))

    def reset(self) -> None:
        self.requests = 0
        self.contexts = 0
        self.busy_s = 0.0

    def _wrap(self, method: Callable[..., Awaitable[Any]], n_contexts: Callable[[tuple], int]):
        async def measured(*args: Any, **kwargs: Any) -> Any:
            if self._inside.get():
                return await method(*args, **kwargs)
            inside = self._inside.set(True)
            self.requests += 1
            self.contexts += n_contexts(args)
            if self._outstanding == 0:
                self._since = time.perf_counter()
            self._outstanding += 1
            try:
                return await method(*args, **kwargs)
            finally:
                self._inside.reset(inside)
                self._outstanding -= 1
                if self._outstanding == 0:
                    self.busy_s += time.perf_counter() - self._since

        return measured


BOOK_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "pages": {"type": "integer", "minimum": 1, "maximum": 2000},
        "genre": {"type": "string", "enum": ["fiction", "non-fiction", "mystery"]},
    },
}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["Alice", "Bob", "Charlie"]},
        "age": {"type": "integer", "minimum": 20, "maximum": 80},
    },
}
REGEX = r" SMC is (🔥🔥|😍😍|🤌🤌) with LMs"
DIRECT_QUESTION = "What is Montreal known for?"


def few_shot_prompt(workload: str, tokenizer: Any, prompt_tokens: int) -> list[int]:
    """The few-shot prompt of about ``prompt_tokens`` tokens that ``workload`` runs behind."""
    if workload == "direct":
        return prompts.few_shot_text(tokenizer, prompt_tokens, DIRECT_QUESTION)
    if workload == "json":
        return prompts.few_shot_json_chat(tokenizer, prompt_tokens, BOOK_SCHEMA)
    raise ValueError(f"a few-shot prompt is defined for direct and json, not {workload!r}")


def build(workload: str, lm: Any, prompt_tokens: int = 0) -> tuple[Any, dict[str, Any], list[int]]:
    """The token sampler of ``workload`` on the loaded model ``lm``, its SMC keyword
    arguments and its prompt's token ids (none for ``bytes``), behind a few-shot
    prompt of about ``prompt_tokens`` tokens (``direct`` and ``json``)."""
    from genlm.control import AWRS, BoolFSA, JsonSchema, PromptedLLM, direct_token_sampler

    if workload == "bytes":
        from genlm.bytes import BeamParams
        from genlm.control import ByteLLM

        eos = lm.byte_vocab[lm.tokenizer.eos_token_id].byte_string
        byte_llm = ByteLLM(lm, BeamParams(K=5, eos_byte_strings=[eos], heal=True))
        byte_llm.set_prompt_from_str("Montreal is")
        if prompt_tokens:
            raise ValueError("a few-shot prompt is defined for direct and json, not bytes")
        return direct_token_sampler(byte_llm), {"ess_threshold": 0.5}, []
    if workload == "direct":
        llm = PromptedLLM(lm, temperature=0.5, eos_byte_strings=[b"."])
        llm.set_prompt_from_str("Montreal is")
        if prompt_tokens:
            llm.prompt_ids = few_shot_prompt(workload, lm.tokenizer, prompt_tokens)
        return direct_token_sampler(llm), {"ess_threshold": 0.0}, llm.prompt_ids
    if workload == "regex":
        llm = PromptedLLM(lm)
        if prompt_tokens:
            raise ValueError("a few-shot prompt is defined for direct and json, not regex")
        llm.set_prompt_from_str("Here is my honest opinion:")
        fsa = BoolFSA.from_regex(REGEX)
        return AWRS(llm, fsa.coerce(llm, f=b"".join)), {"ess_threshold": 0.5}, llm.prompt_ids
    if workload == "json":
        llm = PromptedLLM(lm)
        if prompt_tokens:
            llm.prompt_ids = few_shot_prompt(workload, lm.tokenizer, prompt_tokens)
            return AWRS(llm, JsonSchema(BOOK_SCHEMA).coerce(llm, f=b"".join)), {"ess_threshold": 0.5}, llm.prompt_ids
        llm.prompt_ids = lm.tokenizer.apply_chat_template(
            conversation=[
                {
                    "role": "system",
                    "content": "You need to generate a JSON object that matches the schema below. "
                    "Only generate the JSON object on a single line with no other text.",
                },
                {"role": "user", "content": json.dumps(PERSON_SCHEMA)},
                {"role": "assistant", "content": '{"name": "Alice", "age": 30}'},
                {"role": "user", "content": json.dumps(BOOK_SCHEMA)},
            ],
            tokenize=True,
            add_generation_prompt=True,
            return_dict=False,  # transformers 5 returns a BatchEncoding by default
        )
        return AWRS(llm, JsonSchema(BOOK_SCHEMA).coerce(llm, f=b"".join)), {"ess_threshold": 0.5}, llm.prompt_ids
    raise ValueError(f"workload must be one of {WORKLOADS}, not {workload!r}")


async def run(
    workload: str,
    lm: Any,
    meter: LMMeter,
    particles: int,
    max_tokens: int,
    seed: int,
    prompt_tokens: int,
    profile: bool,
) -> dict[str, Any]:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    sampler, smc_kwargs, prompt_ids = build(workload, lm, prompt_tokens)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    if prompt_tokens:
        lm.cache_kv(prompt_ids)
    prefill_s = time.perf_counter() - start
    meter.reset()
    stats = getattr(lm, "compute_stats", None)
    before = counters(stats)
    profiler = cProfile.Profile() if profile else None
    with RssPeak() as memory, PassCounter(lm.model) as counter:
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        sequences = await sampler.smc(n_particles=particles, max_tokens=max_tokens, **smc_kwargs)
        if profiler:
            profiler.disable()
        seconds = time.perf_counter() - start
    posterior = sequences.decoded_posterior
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
        print(f"-- cProfile of {workload}, event-loop thread, top functions by own time", file=sys.stderr)
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip()), file=sys.stderr)
    await sampler.cleanup()
    result = {
        "workload": workload,
        "build_s": build_s,
        "prefill_s": prefill_s,
        "prompt_tokens": len(prompt_ids),
        "seconds": seconds,
        "lm_busy_s": meter.busy_s,
        "lm_requests": meter.requests,
        "lm_contexts": meter.contexts,
        "tokens_generated": sum(len(c) for c in sequences.contexts),
        "steps": max((len(c) for c in sequences.contexts), default=0),
        "forward_passes": counter.passes,
        "tokens_computed": counter.tokens,
        "particles": len(sequences.contexts),
        "distinct_completions": len(posterior),
        "top": max(posterior, key=posterior.get) if posterior else None,
        **memory.metrics,
    }
    if stats is not None:  # genlm-anyio counts what it computed itself
        after = counters(stats)
        if "tokens_computed" in after:
            result["tokens_computed"] = after["tokens_computed"] - before["tokens_computed"]
    return result


def start(model: str) -> dict[str, Callable[..., dict[str, Any]]]:
    """Import the programs' libraries, load the model, and return the ``run`` operation."""
    # Imports count with the load: genlm-backend imports transformers on import,
    # genlm-anyio when it loads the model.
    started = time.perf_counter()
    import genlm.bytes
    import genlm.control  # noqa: F401
    from genlm.backend import load_model_by_name

    lm = load_model_by_name(model, backend="hf")
    load_s = time.perf_counter() - started
    backend = type(lm).__module__
    if not backend.startswith("genlm_anyio"):
        genlm_backend_module("genlm.backend.llm.hf")
    default_batch_size = lm.batch_size
    meter = LMMeter(lm)
    first = {"load_s": load_s, "backend": backend}

    def run_op(
        workload: str,
        particles: int,
        max_tokens: int,
        seed: int = 0,
        prompt_tokens: int = 0,
        batch_size: int | None = None,
        profile: bool = False,
    ) -> dict[str, Any]:
        if workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, not {workload!r}")
        lm.batch_size = batch_size or default_batch_size
        lm.clear_cache()
        result = asyncio.run(run(workload, lm, meter, particles, max_tokens, seed, prompt_tokens, profile))
        result.update(first)
        return result

    return {"run": run_op}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a local Hugging Face model folder (or a hub id where the hub is reachable)")
    args = parser.parse_args(argv)
    serve(lambda: start(args.model))


if __name__ == "__main__":
    main(sys.argv[1:])
