"""The seed SIS workload: genlm-anyio's AsyncTransformer beside genlm-backend's.

N particles each extend the same prompt by T tokens (EOS masked out, so every
particle runs all T steps), each step one ``await next_token_logprobs`` per
particle. SmolLM2-135M-Instruct, fp32, CPU, both libraries in this process.

    PYTHONPATH=. python benches/bench_sis.py [--sizes 10x10,32x32,64x64] [--anchor-max 32x32]
        [--repeats 3] [--mlx 32x32]

genlm-backend runs at its defaults (``batch_size=20``: several forward passes
per step when N > 20) and, where N > 20, at ``batch_size=N``; its module file is
checked to be genlm-backend's own. Every system gets the same warm-up, the runs
alternate, and each figure is the best and the median of ``--repeats``.
``--mlx`` also runs the given sizes on genlm-anyio's MLX backend (mlx-lm on
mlx's CPU device), beside its transformers backend. Writes
``benches/results/sis.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

import torch
from common import MIN_REPEATS, Report, Run, alternate, best_median, genlm_backend_module, ratio

from tools import assets


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


def contender(llm, prompt: list[int], eos: int, n: int, steps: int, batch_size: int | None = None) -> Callable[[], Run]:
    """One timed SIS run of ``llm`` at ``n`` x ``steps`` (under ``batch_size``, if
    given, restored after), with the forward passes it took where ``llm`` counts them."""

    def go() -> Run:
        saved = llm.batch_size if batch_size is not None else None
        if batch_size is not None:
            llm.batch_size = batch_size
        stats = getattr(llm, "compute_stats", None)
        before = getattr(stats, "forward_passes", None)
        try:
            seconds = timed(llm, prompt, n, steps, eos)
        finally:
            if saved is not None:
                llm.batch_size = saved
        return Run(seconds, {"forward_passes": None if before is None else stats.forward_passes - before})

    return go


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10x10,32x32,64x64")
    parser.add_argument("--anchor-max", default="32x32", help="largest size also run on genlm-backend (it is slow)")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help="alternated runs of each; best and median")
    parser.add_argument(
        "--mlx", default="", help="sizes also run on the MLX backend (needs mlx and mlx-lm), e.g. 32x32"
    )
    args = parser.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    mlx_sizes = [tuple(int(x) for x in s.split("x")) for s in args.mlx.split(",") if s]
    anchor_max = tuple(int(x) for x in args.anchor_max.split("x"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genlm_anyio import AsyncTransformer

    anchor_hf = genlm_backend_module("genlm.backend.llm.hf")
    path = assets.smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ours = AsyncTransformer(model, tokenizer)
    anchor = anchor_hf.AsyncTransformer(model, tokenizer)
    default_batch = anchor.batch_size
    prompt = tokenizer.encode("Montreal is")
    eos = tokenizer.eos_token_id

    report = Report("sis", "Seed SIS workload, transformers backend")
    table = report.table(
        'Seed SIS workload, SmolLM2-135M fp32, CPU: N particles x T tokens after "Montreal is" '
        "(wall time, best / median)",
        [
            "N x T",
            "genlm-anyio",
            f"genlm-backend, batch_size={default_batch} (its default)",
            "genlm-backend, batch_size=N",
            "speed-up (defaults)",
            "speed-up (batch_size=N)",
            "forward passes (genlm-anyio)",
        ],
        notes=[
            f"Sizes run: {args.sizes}; genlm-backend up to N x T = {args.anchor_max}. Both libraries share the "
            f"model in one process, get the same warm-up (one run at 4 x 4 each) and {args.repeats} alternated "
            "runs per size; speed-up = genlm-backend's best / genlm-anyio's best.",
        ],
    )

    alternate(
        {"genlm-anyio": contender(ours, prompt, eos, 4, 4), "genlm-backend": contender(anchor, prompt, eos, 4, 4)},
        warmup=0,
    )
    for n, steps in sizes:
        runs = {"genlm-anyio": contender(ours, prompt, eos, n, steps)}
        if n * steps <= anchor_max[0] * anchor_max[1]:
            runs["genlm-backend"] = contender(anchor, prompt, eos, n, steps)
            if n > default_batch:
                runs["genlm-backend-n"] = contender(anchor, prompt, eos, n, steps, batch_size=n)
        results = alternate(runs, repeats=args.repeats, warmup=0)
        for name, samples in results.items():
            report.measure(f"{n}x{steps}/{name}", samples)
        mine = results["genlm-anyio"]
        theirs, theirs_n = results.get("genlm-backend"), results.get("genlm-backend-n")
        table.add(
            f"{n} x {steps}",
            best_median(mine),
            best_median(theirs) if theirs else "not run",
            best_median(theirs_n) if theirs_n else ("as its defaults" if theirs else "not run"),
            ratio(theirs.best if theirs else None, mine.best),
            ratio(theirs_n.best if theirs_n else None, mine.best),
            mine.best_run.metrics["forward_passes"],
        )
    if mlx_sizes:
        compare_mlx(report, ours, str(path), prompt, eos, mlx_sizes, args.repeats)
    report.write()


def compare_mlx(
    report: Report, transformers_lm, path: str, prompt: list[int], eos: int, sizes: list[tuple[int, ...]], repeats: int
) -> None:
    """The same SIS on the MLX backend, beside the transformers backend (both genlm-anyio), alternated."""
    from genlm_anyio import AsyncMlxLM

    mlx_lm = AsyncMlxLM.from_name(path)
    table = report.table(
        "The same SIS on genlm-anyio's MLX backend (mlx on the CPU) and its transformers backend (best / median)",
        ["N x T", "MLX", "transformers", "MLX time / transformers time"],
        notes=[f"Sizes run: {','.join(f'{n}x{t}' for n, t in sizes)}; the same warm-up, {repeats} alternated runs."],
    )
    warm = {"mlx": contender(mlx_lm, prompt, eos, 4, 4), "transformers": contender(transformers_lm, prompt, eos, 4, 4)}
    alternate(warm, warmup=0)
    for n, steps in sizes:
        runs = {
            "mlx": contender(mlx_lm, prompt, eos, n, steps),
            "transformers": contender(transformers_lm, prompt, eos, n, steps),
        }
        results = alternate(runs, repeats=repeats, warmup=0)
        for name, samples in results.items():
            report.measure(f"mlx/{n}x{steps}/{name}", samples)
        mlx, hf = results["mlx"], results["transformers"]
        table.add(f"{n} x {steps}", best_median(mlx), best_median(hf), ratio(mlx.best, hf.best))
    mlx_lm.close()


if __name__ == "__main__":
    main()
