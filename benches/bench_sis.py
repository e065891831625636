"""The seed SIS workload: genlm-anyio's AsyncTransformer beside genlm-backend's.

N particles each extend the same prompt by T tokens (EOS masked out, so every
particle runs all T steps), each step one ``await next_token_logprobs`` per
particle. SmolLM2-135M-Instruct, fp32, CPU, both libraries in this process.

    PYTHONPATH=scripts python benches/bench_sis.py [--sizes 10x10,32x32,64x64] [--anchor-max 64x64] [--mlx 32x32]

``--mlx`` also runs the given sizes on genlm-anyio's MLX backend (mlx-lm on
mlx's CPU device), beside its transformers backend.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import assets
import torch
from common import Table


async def sis(llm, prompt: list[int], n: int, steps: int, eos: int) -> int:
    generator = torch.Generator().manual_seed(0)
    contexts = [[] for _ in range(n)]

    async def extend(context: list[int]) -> None:
        logps = await llm.next_token_logprobs(prompt + context)
        logps = logps.clone()
        logps[eos] = -float("inf")
        context.append(int(torch.multinomial(logps.softmax(-1), 1, generator=generator)))

    for _ in range(steps):
        await asyncio.gather(*[extend(c) for c in contexts])
    return n * steps


def timed(llm, prompt, n, steps, eos) -> float:
    llm.clear_cache()
    start = time.perf_counter()
    asyncio.run(sis(llm, prompt, n, steps, eos))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10x10,32x32,64x64")
    parser.add_argument("--anchor-max", default="64x64", help="largest size also run on genlm-backend (it is slow)")
    parser.add_argument(
        "--mlx", default="", help="sizes also run on the MLX backend (needs mlx and mlx-lm), e.g. 32x32"
    )
    args = parser.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    mlx_sizes = [tuple(int(x) for x in s.split("x")) for s in args.mlx.split(",") if s]
    anchor_max = tuple(int(x) for x in args.anchor_max.split("x"))

    from genlm.backend.llm import AsyncTransformer as AnchorTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genlm_anyio import AsyncTransformer

    path = assets.smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ours = AsyncTransformer(model, tokenizer)
    anchor = AnchorTransformer(model, tokenizer)
    prompt = tokenizer.encode("Montreal is")
    eos = tokenizer.eos_token_id
    targets = {(32, 32): 3.0, (64, 64): 15.0}

    table = Table("Seed SIS workload, SmolLM2-135M fp32, CPU (N particles x T tokens)", "genlm-backend")
    timed(ours, prompt, 4, 4, eos)  # warm-up
    for n, steps in sizes:
        mine = timed(ours, prompt, n, steps, eos)
        theirs = timed(anchor, prompt, n, steps, eos) if n * steps <= anchor_max[0] * anchor_max[1] else None
        table.add(f"N={n} x {steps}", mine, theirs, targets.get((n, steps)))
        print(f"    N={n} x {steps}: {n * steps / mine:.0f} tokens/s; {ours.stats}", flush=True)
    table.print()
    print(f"\n(genlm-backend runs once per size up to N x T = {args.anchor_max}; best of one)")
    if mlx_sizes:
        compare_mlx(ours, str(path), prompt, eos, mlx_sizes)


def compare_mlx(transformers_lm, path: str, prompt: list[int], eos: int, sizes: list[tuple[int, ...]]) -> None:
    """The same SIS on the MLX backend, beside the transformers backend (both genlm-anyio)."""
    from genlm_anyio import AsyncMlxLM

    mlx_lm = AsyncMlxLM.from_name(path)
    table = Table(
        "The same SIS on genlm-anyio's MLX backend (first column) and its transformers backend", "transformers"
    )
    timed(mlx_lm, prompt, 4, 4, eos)  # warm-up
    for n, steps in sizes:
        theirs = timed(transformers_lm, prompt, n, steps, eos)
        mine = timed(mlx_lm, prompt, n, steps, eos)
        table.add(f"N={n} x {steps}", mine, theirs)
        print(f"    MLX N={n} x {steps}: {n * steps / mine:.0f} tokens/s; {mlx_lm.stats}", flush=True)
    table.print()
    mlx_lm.close()


if __name__ == "__main__":
    main()
