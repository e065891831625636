"""genlm-control programs used as benchmark workloads.

    PYTHONPATH=scripts python benches/control_workloads.py MODEL WORKLOAD:N:T [WORKLOAD:N:T ...] [--seed S] [--profile]
    python -m genlm_anyio.compat benches/control_workloads.py MODEL WORKLOAD:N:T ...

Plain, the program runs on genlm-backend; through the compat switch, on
genlm-anyio. It loads the model once (``genlm.backend.load_model_by_name``)
and runs each WORKLOAD with N particles and at most T tokens (bytes for
``bytes``), in order, in one event loop, re-seeding before each. It uses only
genlm-control's and genlm-bytes' public API (and the ``AsyncLM`` request
methods those libraries call), so the same file measures both. WORKLOAD is one of:

- ``direct``: ``direct_token_sampler(PromptedLLM).smc(...)`` (getting started);
- ``regex``: a ``BoolFSA`` regex with ``AWRS`` (the README's regex example);
- ``json``: a ``JsonSchema`` with ``AWRS`` on a chat prompt (the README's JSON example);
- ``bytes``: the byte-level LM, ``ByteLLM`` (genlm-bytes' beam) with ``direct_token_sampler``.

Prints one JSON object a line: first the start-up time (importing
genlm-control, genlm-bytes and the backend, and loading the model), then per run the
wall times (``build_s`` for building the sampler, ``run_s`` for the SMC call),
the time with at least one LM request outstanding (``lm_busy_s``), the counts
that show the work done (LM requests, contexts asked for, tokens generated)
and the posterior's size. ``--profile`` also prints a cProfile summary of the
event-loop thread per run.
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
import torch

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


def build(workload: str, lm: Any) -> tuple[Any, dict[str, Any]]:
    """The token sampler of ``workload`` on the loaded model ``lm`` and its SMC keyword arguments."""
    from genlm.control import AWRS, BoolFSA, JsonSchema, PromptedLLM, direct_token_sampler

    if workload == "bytes":
        from genlm.bytes import BeamParams
        from genlm.control import ByteLLM

        eos = lm.byte_vocab[lm.tokenizer.eos_token_id].byte_string
        byte_llm = ByteLLM(lm, BeamParams(K=5, eos_byte_strings=[eos], heal=True))
        byte_llm.set_prompt_from_str("Montreal is")
        return direct_token_sampler(byte_llm), {"ess_threshold": 0.5}
    if workload == "direct":
        llm = PromptedLLM(lm, temperature=0.5, eos_byte_strings=[b"."])
        llm.set_prompt_from_str("Montreal is")
        return direct_token_sampler(llm), {"ess_threshold": 0.0}
    if workload == "regex":
        llm = PromptedLLM(lm)
        llm.set_prompt_from_str("Here is my honest opinion:")
        fsa = BoolFSA.from_regex(REGEX)
        return AWRS(llm, fsa.coerce(llm, f=b"".join)), {"ess_threshold": 0.5}
    if workload == "json":
        llm = PromptedLLM(lm)
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
        return AWRS(llm, JsonSchema(BOOK_SCHEMA).coerce(llm, f=b"".join)), {"ess_threshold": 0.5}
    raise ValueError(f"workload must be one of {WORKLOADS}, not {workload!r}")


async def run(
    workload: str, lm: Any, meter: LMMeter, particles: int, max_tokens: int, seed: int, profile: bool
) -> dict[str, Any]:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    sampler, smc_kwargs = build(workload, lm)
    build_s = time.perf_counter() - start
    meter.reset()
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    sequences = await sampler.smc(n_particles=particles, max_tokens=max_tokens, **smc_kwargs)
    if profiler:
        profiler.disable()
    run_s = time.perf_counter() - start
    posterior = sequences.decoded_posterior
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
        print(f"-- cProfile of {workload}, event-loop thread, top functions by own time")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))
    await sampler.cleanup()
    return {
        "workload": workload,
        "backend": type(lm).__module__.split(".")[0],
        "build_s": build_s,
        "run_s": run_s,
        "lm_busy_s": meter.busy_s,
        "lm_requests": meter.requests,
        "lm_contexts": meter.contexts,
        "tokens_generated": sum(len(c) for c in sequences.contexts),
        "particles": len(sequences.contexts),
        "distinct_completions": len(posterior),
        "top": max(posterior, key=posterior.get) if posterior else None,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a local Hugging Face model folder (or a hub id where the hub is reachable)")
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="WORKLOAD:N:T",
        help=f"a workload ({', '.join(WORKLOADS)}) with its particles and max tokens",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print a cProfile summary of the event-loop thread")
    args = parser.parse_args(argv)
    runs = []
    for spec in args.runs:
        workload, _, rest = spec.partition(":")
        if workload not in WORKLOADS or rest.count(":") != 1:
            parser.error(f"a run is WORKLOAD:N:T with WORKLOAD one of {WORKLOADS}, not {spec!r}")
        runs.append((workload, *map(int, rest.split(":"))))

    # Imports count with the load: genlm-backend imports transformers on import,
    # genlm-anyio when it loads the model.
    start = time.perf_counter()
    import genlm.bytes
    import genlm.control  # noqa: F401
    from genlm.backend import load_model_by_name

    lm = load_model_by_name(args.model, backend="hf")
    print(json.dumps({"load_s": time.perf_counter() - start}), flush=True)
    meter = LMMeter(lm)

    async def run_all() -> None:
        for workload, particles, max_tokens in runs:
            result = await run(workload, lm, meter, particles, max_tokens, args.seed, args.profile)
            print(json.dumps(result), flush=True)

    asyncio.run(run_all())


if __name__ == "__main__":
    main(sys.argv[1:])
