"""Soak: minutes of SMC-like work on SmolLM2-135M, watching memory for leaks.

A population of particles extends prompts token by token, every step one
concurrent ``await next_token_logprobs`` per particle. Every few steps the
population is resampled by weight (particles duplicated and dropped), new
particles start from fresh prompts, finished ones retire, and a share of the
requests are cancelled at random points. The KV cache has a small budget, so
it evicts all the time.

Every ``--every`` seconds it prints resident memory (RSS) and the KV cache's
bytes in use; at the end, the slopes of both after the warm-up (a least-squares
line, MiB per minute) and the counts of steps, requests and cancellations.

    PYTHONPATH=. python benches/soak.py [--minutes 10] [--backend asyncio|trio] [--particles 48]
"""

from __future__ import annotations

import argparse
import os
import random
import time

import anyio
import torch

from genlm_anyio import AsyncTransformer
from tools import assets

WORDS = "river stone market winter lantern harbor orchard signal meadow engine copper valley".split()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return 60 * sum((t - mx) * (v - my) for t, v in points) / var if var else float("nan")


async def soak(lm: AsyncTransformer, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    tok = lm.tokenizer
    kv_bytes_per_token = lm.kv_cache.keys[0].numel() * lm.kv_cache.keys.element_size() * 2

    def new_particle() -> tuple[list[int], float]:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        return tok.encode(f"The {text} is"), 0.0

    particles = [new_particle() for _ in range(args.particles)]
    counts = {"steps": 0, "requests": 0, "cancelled": 0, "resamples": 0, "new": 0}
    samples: list[tuple[float, float, float]] = []
    start = last = time.monotonic()
    end = start + 60 * args.minutes
    print(f"{'s':>6} {'RSS MiB':>8} {'KV MiB':>7} {'pool MiB':>8} {'steps':>6} {'requests':>9} {'cancelled':>9}")

    async def extend(i: int, out: list) -> None:
        ids, weight = particles[i]
        # A share of the requests is cancelled at a random point, as an SMC
        # program does with particles it drops mid-step.
        cancel = rng.random() < args.cancel
        with anyio.move_on_after(rng.random() * 0.05 if cancel else 600) as scope:
            logprobs = await lm.next_token_logprobs(ids)
            token = int(torch.multinomial(logprobs.softmax(-1), 1))
            out[i] = (ids + [token], weight + float(logprobs[token]))
        counts["cancelled"] += scope.cancelled_caught

    while time.monotonic() < end:
        out: list = [None] * len(particles)
        async with anyio.create_task_group() as tg:
            for i in range(len(particles)):
                tg.start_soon(extend, i, out)
        counts["steps"] += 1
        counts["requests"] += len(particles)
        # Cancelled particles are dropped; finished ones retire; new ones arrive.
        alive = [p for p in out if p is not None and len(p[0]) < args.max_tokens]
        while len(alive) < args.particles:
            alive.append(new_particle())
            counts["new"] += 1
        if counts["steps"] % args.resample_every == 0:
            top = max(w for _, w in alive)
            weights = [pow(2.718281828, (w - top) / 8) for _, w in alive]
            alive = [(list(ids), 0.0) for ids, _ in rng.choices(alive, weights, k=args.particles)]
            counts["resamples"] += 1
        particles = alive
        now = time.monotonic()
        if now - last >= args.every or now >= end:
            last = now
            kv = lm.kv_cache.stats.in_use * kv_bytes_per_token / 2**20
            pool = 2 * lm.kv_cache.keys.numel() * lm.kv_cache.keys.element_size() / 2**20
            samples.append((now - start, rss_mib(), kv))
            print(
                f"{now - start:6.0f} {samples[-1][1]:8.1f} {kv:7.1f} {pool:8.1f} {counts['steps']:6} "
                f"{counts['requests']:9} {counts['cancelled']:9}",
                flush=True,
            )

    warm = [s for s in samples if s[0] >= args.warmup_fraction * samples[-1][0]]
    print(
        f"\nafter warm-up ({args.warmup_fraction:.0%} of the run, {len(warm)} samples): "
        f"RSS slope {slope([(t, r) for t, r, _ in warm]):+.2f} MiB/min, "
        f"KV slope {slope([(t, k) for t, _, k in warm]):+.2f} MiB/min; "
        f"RSS {min(r for _, r, _ in warm):.1f}-{max(r for _, r, _ in warm):.1f} MiB"
    )
    print(
        f"{counts['steps']} steps, {counts['requests']} requests, {counts['cancelled']} cancelled, "
        f"{counts['resamples']} resamplings, {counts['new']} new particles; "
        f"{lm.compute_stats.tokens_computed} tokens computed, {lm.kv_cache.stats.tokens_evicted} evicted, "
        f"worker alive: {lm._batcher._thread is not None and lm._batcher._thread.is_alive()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--particles", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=48, help="a particle retires at this length")
    parser.add_argument("--resample-every", type=int, default=4)
    parser.add_argument("--cancel", type=float, default=0.05, help="share of requests cancelled")
    parser.add_argument("--kv-mib", type=int, default=48, help="the KV cache budget")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with AsyncTransformer(model, AutoTokenizer.from_pretrained(path), kv_cache_bytes=args.kv_mib << 20) as lm:
        print(f"soak: {args.minutes} min, {args.particles} particles, {args.backend}, KV budget {args.kv_mib} MiB")
        anyio.run(soak, lm, args, backend=args.backend)


if __name__ == "__main__":
    main()
