"""``genlm-anyio-demo MODEL``: the seed example's autobatched SIS, under asyncio and trio.

Ten particles extend "Montreal is" token by token, each with its own
``await llm.next_token_logprobs(...)``; the library batches their requests and
reuses each particle's cached prefix.
"""

from __future__ import annotations

import argparse
import math
import time

import anyio
import torch

from .backends import AsyncLM
from .loading import load_model_by_name


async def sis(
    llm: AsyncLM, prompt: list[int], particles: int, max_tokens: int, max_token_bytes: int
) -> list[tuple[list[int], float]]:
    """Sequential importance sampling with a token-length mask; returns (tokens, log weight) per particle."""
    eos = llm.tokenizer.eos_token_id
    allowed = torch.tensor([i == eos or len(t) <= max_token_bytes for i, t in enumerate(llm.byte_vocab)]).float().log()
    only_eos = torch.full((llm.vocab_size,), -math.inf)
    only_eos[eos] = 0.0
    states: list[tuple[list[int], float, bool]] = [([], 0.0, True) for _ in range(particles)]

    async def extend(i: int) -> None:
        context, weight, _ = states[i]
        logps = await llm.next_token_logprobs(prompt + context)
        masked = logps + (only_eos if len(context) >= max_tokens else allowed)
        log_z = masked.logsumexp(dim=-1)
        token = int(torch.multinomial((masked - log_z).exp(), 1))
        done = token == eos
        states[i] = (context if done else context + [token], weight + float(log_z), not done)

    while any(active for _, _, active in states):
        async with anyio.create_task_group() as tg:
            for i, (_, _, active) in enumerate(states):
                if active:
                    tg.start_soon(extend, i)
    return [(context, weight) for context, weight, _ in states]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--particles", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=10)
    args = parser.parse_args()
    with load_model_by_name(args.model, backend=args.backend) as llm:
        prompt = llm.tokenizer.encode("Montreal is")
        for library in ("asyncio", "trio"):
            start = time.perf_counter()
            results = anyio.run(sis, llm, prompt, args.particles, args.max_tokens, 10, backend=library)
            elapsed = time.perf_counter() - start
            weights = torch.tensor([w for _, w in results])
            probs = (weights - weights.logsumexp(0)).exp()
            print(f"\n== {library}: {args.particles} particles in {elapsed:.2f} s")
            for (context, _), p in sorted(zip(results, probs.tolist()), key=lambda x: -x[1]):
                print(f"  {llm.tokenizer.decode(context)!r} (probability: {p:.4f})")


if __name__ == "__main__":
    main()
