"""Realistic workloads: long shared prompts and many particles, each system in a process of its own.

    PYTHONPATH=. python benches/bench_workloads.py [--grid 16x16,2048x64,...] [--tokens 8]
        [--control json:8:12,direct:16:12] [--control-prompt 1500] [--repeats 3] [--systems ...]
        [--anchor-max 64] [--max-kv-gb 8] [--vllm-engine '{"block_size": 32}']
        [--model DIR | --model random:llama-1b --tokenizer DIR] [--device cuda] [--dtype bfloat16]

SIS: the seed example's program (``examples/seed_example.py``: one ``await
next_token_logprobs`` per particle per step) on genlm-anyio's
``AsyncTransformer``, with prompts of PROMPT tokens (``benches/prompts.py``:
random words, so that particles stay distinct) and N particles x T tokens (EOS
masked until the last step), for each ``PROMPTxN`` of ``--grid``. Beside it,
each in its own process (``benches/workers.py``): genlm-backend's
``AsyncTransformer`` running the same program at its defaults (``batch_size=20``)
and at ``batch_size=N``; a hand-written batched loop in plain transformers that
prefills the prompt once and expands its cache to N rows; vLLM's
``LLM.generate`` with prefix caching (its floor: sampling only).

Control: genlm-control's JSON-with-AWRS and direct SMC programs
(``benches/control_workloads.py``) behind a few-shot prompt of
``--control-prompt`` tokens, on genlm-anyio (through the compat switch) and
genlm-backend (defaults and ``batch_size=N``), beside the loop and vLLM
generating the same N x T tokens after the same prompt.

Every prompt is computed first, untimed, on every system. Runs alternate
between the systems (A B C ... A B C ...), after the same warm-up; each figure
is the best and the median of ``--repeats``. Per run: ms per step (the run's
wall time / T), forward passes and tokens computed per step, peak resident
memory above the run's start (the worker's own, see ``common.RssPeak``), distinct particles.
Writes ``benches/results/workloads.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from typing import Any

from common import (
    HERE,
    Report,
    Run,
    Samples,
    VLLMGenerate,
    Worker,
    WorkerFailed,
    alternate,
    ratio,
    reference_env,
)

# Estimated at 10-15 minutes on an idle 2-core CPU with SmolLM2 (vLLM's engine start
# included); genlm-backend runs up to --anchor-max particles.
DEFAULT_GRID = "16x16,16x64,16x256,512x64,2048x16,2048x64"
DEFAULT_TOKENS = 8
DEFAULT_CONTROL = "json:8:12,direct:16:12"
SYSTEMS = ("genlm-anyio", "genlm-backend", "genlm-backend-n", "hf-loop", "vllm")
LABELS = {
    "genlm-anyio": "genlm-anyio",
    "genlm-backend": "genlm-backend, batch_size={default}",
    "genlm-backend-n": "genlm-backend, batch_size=N",
    "hf-loop": "hand-written HF loop",
    "vllm": "vLLM LLM.generate",
}
BACKEND_BATCH_SIZE = 20  # genlm-backend's AsyncTransformer default
WARMUP = (16, 4, 2)  # prompt tokens, particles, tokens: one run per system before any timing


def parse_sizes(text: str, parts: int) -> list[tuple[int, ...]]:
    sizes = [tuple(int(x) for x in s.split("x")) for s in text.split(",") if s]
    if any(len(s) != parts for s in sizes):
        raise SystemExit(f"sizes are {'x'.join(['K'] * parts)}, comma-separated, not {text!r}")
    return sizes


def kv_bytes_per_token(args: argparse.Namespace) -> int:
    """Bytes of keys and values one token holds in the model (all layers)."""
    import torch
    from transformers import AutoConfig, LlamaConfig

    if args.model.startswith("random:"):
        from tools import assets

        config = LlamaConfig(**assets.LLAMA_SHAPES[args.model.removeprefix("random:")])
    else:
        config = AutoConfig.from_pretrained(args.model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    item = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * item


class Systems:
    """The worker processes, started once and kept for the whole run."""

    def __init__(self, args: argparse.Namespace, stack: ExitStack):
        self.args, self.stack = args, stack
        self.workers: dict[str, Worker] = {}
        self.warm: set[str] = set()
        model = ["--device", args.device, "--dtype", args.dtype]
        if args.tokenizer:
            model += ["--tokenizer", args.tokenizer]
        self.model_args = [args.model, *model]

    def worker(self, system: str, wait: bool = True) -> Worker:
        if system not in self.workers:
            script = str(HERE / "workers.py")
            if system == "vllm":
                engine = json.loads(self.args.vllm_engine)
                engine.setdefault("dtype", self.args.dtype)
                if self.args.model.startswith("random:"):
                    engine.setdefault("max_model_len", 2 * max(self.args.prompt_max, 4096))
                w: Worker = VLLMGenerate(self.args.model, **engine)
            elif system.startswith("control:"):
                backend = system.removeprefix("control:")
                program = str(HERE / "control_workloads.py")
                argv = [sys.executable, program, self.args.model]
                if backend == "genlm-anyio":
                    argv[1:1] = ["-m", "genlm_anyio.compat"]
                w = Worker(system, argv, reference_env())
            else:
                env = reference_env() if system == "genlm-backend" else None
                w = Worker(system, [sys.executable, script, system, *self.model_args], env)
            self.workers[system] = self.stack.enter_context(w)
        if wait:
            self.workers[system].wait()
        return self.workers[system]

    def start(self, systems: list[str]) -> None:
        """Start the workers of ``systems`` together, and wait until all are ready."""
        for system in systems:
            self.worker(system, wait=False)
        for system in systems:
            self.workers[system].wait()

    def warm_up(self, system: str, tokenizer: Any) -> None:
        """One untimed run of ``system`` at the :data:`WARMUP` size, once per process."""
        import prompts

        if system in self.warm:
            return
        worker = self.worker(system)
        prompt_len, particles, tokens = WARMUP
        if system.startswith("control:"):
            worker.run("run", workload="direct", particles=particles, max_tokens=tokens)
        else:
            op = "generate" if system in ("hf-loop", "vllm") else "sis"
            worker.run(op, prompt=prompts.text_prompt(tokenizer, prompt_len), particles=particles, tokens=tokens)
        self.warm.add(system)

    def close(self, system: str) -> None:
        if system in self.workers:
            self.workers.pop(system).close()


def sis_contenders(
    systems: Systems,
    wanted: list[str],
    prompt: list[int],
    n: int,
    t: int,
    kv_limit: float,
    kv_token: int,
    anchor_max: int,
) -> tuple[dict[str, Callable[[], Run]], dict[str, str]]:
    """The runs of one SIS size, and why any system was left out."""
    runs: dict[str, Callable[[], Run]] = {}
    skipped: dict[str, str] = {}
    for system in wanted:
        rows = {"genlm-backend": min(n, BACKEND_BATCH_SIZE), "hf-loop": n, "genlm-backend-n": n}.get(system)
        if system == "genlm-backend-n" and n <= BACKEND_BATCH_SIZE:
            skipped[system] = f"N <= {BACKEND_BATCH_SIZE}: the same as its defaults"
            continue
        if system.startswith("genlm-backend") and n > anchor_max:
            skipped[system] = f"N > --anchor-max {anchor_max} (it is slow)"
            continue
        if rows is not None and rows * (len(prompt) + t) * kv_token > kv_limit:
            skipped[system] = "its per-row copies of the prompt's keys and values would exceed --max-kv-gb"
            continue
        if system in ("hf-loop", "vllm"):
            worker = systems.worker(system)
            runs[system] = partial(worker.run, "generate", prompt=prompt, particles=n, tokens=t)
        else:
            worker = systems.worker("genlm-backend" if system == "genlm-backend-n" else system)
            batch = n if system == "genlm-backend-n" else None
            runs[system] = partial(worker.run, "sis", prompt=prompt, particles=n, tokens=t, batch_size=batch)
    return runs, skipped


def per_step(samples: Samples, key: str, steps: int) -> str:
    value = samples.best_run.metrics.get(key)
    return "-" if value is None else f"{value / steps:.2f}"


def memory(samples: Samples) -> str:
    """The highest peak above the start over the runs, in MB: the CUDA allocator's where the model is on CUDA."""

    def above(m: dict[str, Any]) -> float:
        if "peak_cuda_mb" in m:
            return m["peak_cuda_mb"] - m["base_cuda_mb"]
        return m["peak_rss_mb"] - m["base_rss_mb"]

    return f"{max(above(r.metrics) for r in samples.runs):.0f}"


def add_rows(table: Any, lead: list[str], results: dict[str, Samples], skipped: dict[str, str], steps: int) -> None:
    """One row per system of one size; ``steps`` divides each run's time unless the run counted its own."""
    ours = results.get("genlm-anyio")
    for system in SYSTEMS:
        label = LABELS[system].format(default=BACKEND_BATCH_SIZE)
        if system in skipped:
            table.add(*lead, label, f"left out: {skipped[system]}", "", "", "", "", "")
            continue
        if system not in results:
            continue
        s = results[system]
        own = max(1, s.best_run.metrics.get("steps") or steps)  # a genlm-control run: its longest particle
        per_ms = f"{s.best / own * 1e3:.1f} / {s.median / own * 1e3:.1f}"
        distinct = s.best_run.metrics.get("distinct", s.best_run.metrics.get("distinct_completions", "-"))
        table.add(
            *lead,
            label,
            per_ms,
            per_step(s, "forward_passes", own),
            per_step(s, "tokens_computed", own),
            memory(s),
            distinct,
            ratio(s.best, ours.best if ours else None),
        )


def run_sis(args: argparse.Namespace, systems: Systems, report: Report, tokenizer: Any) -> dict[tuple[int, int], dict]:
    import prompts

    kv_token = kv_bytes_per_token(args)
    grid = parse_sizes(args.grid, 2)
    t = args.tokens
    table = report.table(
        f"SIS, {args.model_name}, {args.device}: N particles x {t} tokens after a prompt"
        " (ms per step: best / median of the alternated runs)",
        [
            "prompt tokens",
            "N",
            "system",
            "ms per step",
            "forward passes per step",
            "tokens computed per step",
            "peak MB above start",
            "distinct particles",
            "time / genlm-anyio's",
        ],
        notes=[
            f"Grid run: {args.grid}, T = {t} tokens, genlm-backend up to N = {args.anchor_max}; "
            f"{args.repeats} alternated runs of each system per size, after one warm-up run of each "
            f"({WARMUP[1]} x {WARMUP[2]} after {WARMUP[0]} tokens). vLLM: {args.vllm_engine}.",
            "A step is one token per particle (the seed program's last step, the EOS distribution, runs in the "
            "timed part too). Forward passes and tokens computed are per step: genlm-anyio's from its llm.compute_stats, "
            "genlm-backend's and the loop's from a hook on the model; vLLM's are not counted.",
        ],
    )
    wanted = [s for s in SYSTEMS if s in args.systems]
    processes = list(dict.fromkeys("genlm-backend" if s == "genlm-backend-n" else s for s in wanted))
    systems.start(processes)
    for system in processes:
        systems.warm_up(system, tokenizer)
    found: dict[tuple[int, int], dict] = {}
    for prompt_len, n in grid:
        prompt = prompts.text_prompt(tokenizer, prompt_len)
        runs, skipped = sis_contenders(systems, wanted, prompt, n, t, args.max_kv_gb * 2**30, kv_token, args.anchor_max)
        print(f"  SIS: prompt {prompt_len} tokens, {n} x {t}: {', '.join(runs)}", file=sys.stderr, flush=True)
        try:
            results = alternate(runs, repeats=args.repeats, warmup=0)
        except WorkerFailed as exc:
            print(f"  SIS {prompt_len}x{n} failed: {exc}", file=sys.stderr, flush=True)
            table.add(str(prompt_len), str(n), "(all)", f"failed: {str(exc).splitlines()[0]}", *[""] * 5)
            continue
        for system, samples in results.items():
            report.measure(f"sis/{prompt_len}/{n}/{system}", samples)
        add_rows(table, [str(prompt_len), str(n)], results, skipped, t)
        found[(prompt_len, n)] = results
    return found


def run_control(args: argparse.Namespace, systems: Systems, report: Report, tokenizer: Any) -> None:
    from control_workloads import few_shot_prompt

    table = report.table(
        f"genlm-control programs behind a few-shot prompt of about {args.control_prompt} tokens, "
        f"{args.model_name}, {args.device} (ms per step: best / median)",
        [
            "workload",
            "N x T",
            "system",
            "ms per step",
            "forward passes per step",
            "tokens computed per step",
            "peak MB above start",
            "distinct completions",
            "time / genlm-anyio's",
        ],
        notes=[
            f"Workloads run: {args.control}; {args.repeats} alternated runs each, after one warm-up run of each "
            "system. A step is one token of the longest particle; the loop and vLLM generate the same N x T "
            "tokens after the same prompt (their floor: sampling without the program's constraints).",
        ],
    )
    specs = [(w, int(n), int(t)) for w, n, t in (s.split(":") for s in args.control.split(",") if s)]
    control_systems = [s for s in SYSTEMS if s in args.systems]
    backends = [f"control:{b}" for b in ("genlm-anyio", "genlm-backend") if b in control_systems]
    processes = backends + [s for s in ("hf-loop", "vllm") if s in control_systems]
    systems.start(processes)
    for system in processes:
        systems.warm_up(system, tokenizer)
    for workload, n, t in specs:
        prompt = few_shot_prompt(workload, tokenizer, args.control_prompt)
        runs: dict[str, Callable[[], Run]] = {}
        skipped: dict[str, str] = {}
        for system in control_systems:
            if system in ("hf-loop", "vllm"):
                worker = systems.worker(system)
                runs[system] = partial(worker.run, "generate", prompt=prompt, particles=n, tokens=t)
                continue
            if system == "genlm-backend-n" and n <= BACKEND_BATCH_SIZE:
                skipped[system] = f"N <= {BACKEND_BATCH_SIZE}: the same as its defaults"
                continue
            backend = "genlm-backend" if system == "genlm-backend-n" else system
            batch = n if system == "genlm-backend-n" else None
            worker = systems.worker(f"control:{backend}")
            runs[system] = partial(
                worker.run,
                "run",
                workload=workload,
                particles=n,
                max_tokens=t,
                prompt_tokens=args.control_prompt,
                batch_size=batch,
            )
        print(f"  control: {workload} {n} x {t}: {', '.join(runs)}", file=sys.stderr, flush=True)
        results = alternate(runs, repeats=args.repeats, warmup=0)
        for system, samples in results.items():
            report.measure(f"control/{workload}/{system}", samples)
        add_rows(table, [workload, f"{n} x {t} ({len(prompt)}-token prompt)"], results, skipped, t)


def targets(report: Report, found: dict[tuple[int, int], dict], steps: int) -> None:
    """Issue 15's targets at 2,048 prompt tokens and 64 particles, where both sizes ran."""
    long, short = found.get((2048, 64)), found.get((16, 64))
    if not long:
        return
    table = report.table("Targets at 2,048 prompt tokens and 64 particles (best times)", ["target", "measured", "met"])
    ours = long.get("genlm-anyio")
    if ours is None:
        return
    checks = []
    if short and "genlm-anyio" in short:
        checks.append(("within 1.7x of the 16-token prompt's time", ours.best / short["genlm-anyio"].best, 1.7))
    if "hf-loop" in long:
        checks.append(("at most 0.67x the hand-written loop's time", ours.best / long["hf-loop"].best, 0.67))
    if "vllm" in long:
        checks.append(("ahead of vLLM's LLM.generate (time ratio below 1)", ours.best / long["vllm"].best, 1.0))
    passes = ours.best_run.metrics.get("forward_passes")
    for what, value, bound in checks:
        table.add(what, f"{value:.2f}x", "met" if value <= bound else "missed")
    if passes is not None:
        table.add("1 forward pass per step", f"{passes / steps:.2f}", "met" if passes <= steps else "missed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default=DEFAULT_GRID, help="PROMPTxN sizes of the SIS runs")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens per particle (T)")
    parser.add_argument("--control", default=DEFAULT_CONTROL, help="WORKLOAD:N:T of the genlm-control runs")
    parser.add_argument("--control-prompt", type=int, default=1500, help="few-shot prompt tokens of those runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="from " + ", ".join(SYSTEMS))
    parser.add_argument("--model", default=None, help="a model folder or random:SHAPE (default: SmolLM2-135M)")
    parser.add_argument("--tokenizer", default=None, help="the tokenizer folder of a random:SHAPE model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--anchor-max", type=int, default=64, help="most particles run on genlm-backend")
    parser.add_argument("--max-kv-gb", type=float, default=8.0, help="leave out a system whose copies exceed this")
    parser.add_argument("--vllm-engine", default='{"block_size": 32}', help="vllm.LLM keyword arguments (JSON)")
    parser.add_argument("--out", default=None, help="the results file (default: benches/results/workloads.json)")
    args = parser.parse_args()
    args.systems = args.systems.split(",")
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    from pathlib import Path

    from transformers import AutoTokenizer

    from tools import assets

    if args.model is None:
        args.model = str(assets.smollm2_dir())
    args.model_name = (
        args.model.removeprefix("random:") + " (random weights)"
        if args.model.startswith("random:")
        else Path(args.model).name
    )
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    args.prompt_max = max([p for p, _ in parse_sizes(args.grid, 2)] + [args.control_prompt])
    report = Report(
        "workloads",
        "Workloads: long shared prompts and many particles",
        Path(args.out) if args.out else None,
    )
    with report.written(), ExitStack() as stack:
        systems = Systems(args, stack)
        found = run_sis(args, systems, report, tokenizer) if args.grid else {}
        for system in ("genlm-anyio", "genlm-backend"):
            systems.close(system)  # the control programs run in processes of their own
        if args.control:
            run_control(args, systems, report, tokenizer)
        targets(report, found, args.tokens)
    print(f"\n(grid run: SIS {args.grid or 'none'} x {args.tokens} tokens; control {args.control or 'none'})")


if __name__ == "__main__":
    main()
