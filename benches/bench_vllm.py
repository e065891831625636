"""The seed SIS workload on the vLLM backend, beside vLLM's own ``LLM.generate``.

N particles each extend the same prompt by T tokens (EOS masked out), one
``await next_token_logprobs`` per particle per step, through AsyncVirtualLM.
The floor is vLLM's ``LLM.generate`` of N sequences of T tokens after the same
prompt, in a process of its own (``benches/workers.py vllm``) on the same model,
with its engine core in that process; beside the multiprocess configuration
also with its engine core in a process of its own, as that configuration's has
(on a CPU this costs vLLM itself: its worker runs in a third process, see
docs/vllm.md). Each engine configuration runs in turn:

- ``in-process``: the engine core in this process; rows from genlm-anyio's logits
  processor (V1 model runner on CPU, V2 on a GPU with Triton), nothing sorted,
  nothing crossing a process;
- ``multiprocess``: the engine core in a process of its own; rows through
  genlm-anyio's worker extension (one ``collective_rpc`` per step, float32 values
  in id order), and on the same engine through vLLM's ``logprobs=-1`` (a sort of
  the vocabulary, then ids and values over its socket), the path an engine
  without genlm-anyio's extension takes.

SIS and ``LLM.generate`` (each native engine) alternate, best (and median) of ``--repeat`` (at least
3) after one warm-up each. Also prints the bytes that cross a process per row and
per engine step in each configuration (vLLM's own encoder, on this model's
vocabulary). ``--check`` first runs the end-to-end checks that benches/gpu.sh
needs on a GPU: the capture found, no row crossing a process, and captured rows
equal to ``logprobs=-1``'s within 1e-6.

    PYTHONPATH=. python benches/bench_vllm.py [--sizes 32x32,64x64] [--engines in-process,multiprocess]
        [--model random:llama-1b --tokenizer DIR] [--engine '{"gpu_memory_utilization": 0.4}'] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from bench_sis import timed
from common import MIN_REPEATS, Report, VLLMGenerate, alternate, fmt, ratio

from tools import assets

# The multiprocess engine first: an in-process engine fixes vLLM's settings for the rest of the process.
ENGINES = ("multiprocess", "in-process")


def model_folder(model: str, tokenizer: str | None, dtype: str) -> str:
    """A folder vLLM loads: ``model`` itself, or for ``random:SHAPE`` a random-weight
    Llama of that shape over ``tokenizer``, saved once to a temporary folder."""
    if not model.startswith("random:"):
        return model
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer or str(assets.smollm2_dir()))
    folder = tempfile.mkdtemp(prefix="bench-vllm-model-")
    assets.random_llama(model.split(":", 1)[1], tok, dtype=getattr(torch, dtype)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def bytes_per_row(vocab_size: int) -> dict[str, int]:
    """Bytes one log-probability row adds to what crosses vLLM's socket, by vLLM's
    own encoder: in an engine output through ``logprobs=-1`` (V + 1 ids and
    values), and in the utility output that answers genlm-anyio's worker
    extension (V float32 values in id order)."""
    import numpy as np
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, UtilityOutput
    from vllm.v1.outputs import LogprobsLists
    from vllm.v1.serial_utils import MsgpackEncoder, UtilityResult

    encoder = MsgpackEncoder()

    def size(obj: Any) -> int:
        return sum(memoryview(part).nbytes for part in encoder.encode(obj))

    def output(logprobs: Any = None) -> Any:
        return EngineCoreOutputs(outputs=[EngineCoreOutput("genlm-0", [0], new_logprobs=logprobs)])

    n = vocab_size + 1
    ranked = LogprobsLists(np.zeros((1, n), np.int32), np.zeros((1, n), np.float32), np.zeros(1, np.int32))

    def rows(data: bytes) -> Any:  # one worker's answer, as RowsExtension gives it
        return EngineCoreOutputs(utility_output=UtilityOutput(0, result=UtilityResult([data])))

    return {
        "logprobs=-1": size(output(ranked)) - size(output()),
        "worker rows": size(rows(bytes(4 * vocab_size))) - size(rows(b"")),
    }


def check(llm: Any) -> dict[str, Any]:
    """The end-to-end checks of an in-process engine: its capturing processor
    found, its engine core in this process, and captured rows equal to vLLM's own
    ``logprobs=-1`` rows (the same engine asked for them) within 1e-6 over the
    tokens of p > 1e-6."""
    from genlm_anyio.backends.base import Query
    from genlm_anyio.backends.vllm.engine import VLLMEngine
    from genlm_anyio.backends.vllm.rows import CapturedRows, RankedRows

    engine = llm.engine
    source = type(engine.rows).__name__
    capture = type(engine.rows.capture).__name__ if isinstance(engine.rows, CapturedRows) else None
    core = type(engine._core).__name__
    assert capture is not None, f"no capturing logits processor found: rows come from {source}"
    assert core == "InprocClient", f"the engine core is a {core}: rows would cross a process"
    ranked = VLLMEngine(engine._engine)
    ranked.rows = RankedRows(engine.vocab_size)  # the logprobs=-1 path, on the same engine
    p = llm.tokenizer.encode("Montreal is a city in")
    queries = [Query(tuple(p + extra)) for extra in ([], [28], [28, 9], [42])]
    head, everywhere = 0.0, 0.0
    try:
        for grow in ([], [7]):
            queries = [Query(q.ids + tuple(grow)) for q in queries]
            for got, want in zip(engine.run(queries), ranked.run(queries)):
                diff = (got - want).abs()
                head = max(head, diff[want.exp() > 1e-6].max().item())
                everywhere = max(everywhere, diff.max().item())
    finally:
        ranked.close_sessions()
        engine.close_sessions()
    # Over p > 1e-6 (|log p| < 13.8, where float32's spacing is under 1e-6), 1e-6;
    # further down the tail one float32 step is up to 4e-6 (|log p| up to 32).
    assert head <= 1e-6 and everywhere <= 1e-5, f"captured rows differ from logprobs=-1 by {head}, {everywhere}"
    return {"capture": capture, "engine_core": core, "max_abs_diff_p_above_1e-6": head, "max_abs_diff": everywhere}


def paths(llm: Any) -> dict[str, Any]:
    """The row sources to run SIS with on ``llm``'s engine: its own, and where its
    workers run elsewhere, ``logprobs=-1`` too (what an engine without genlm-anyio's
    worker extension takes)."""
    from genlm_anyio.backends.vllm.rows import RankedRows, WorkerRows

    own = llm.engine.rows
    if isinstance(own, WorkerRows):
        return {"worker rows": own, "logprobs=-1": RankedRows(llm.vocab_size)}
    return {type(own).__name__: own}


def contenders(llm: Any, natives: dict[str, VLLMGenerate], n: int, steps: int) -> dict[str, Any]:
    """SIS through ``llm`` (once per row source of :func:`paths`) and
    ``LLM.generate`` in each of ``natives``' processes (by engine configuration),
    at ``n`` x ``steps``, after the same prompt."""
    prompt = llm.tokenizer.encode("Montreal is")
    eos = llm.tokenizer.eos_token_id

    def sis(source: Any) -> Any:
        def go() -> float:
            saved, llm.engine.rows = llm.engine.rows, source
            try:
                return timed(llm, prompt, n, steps, eos)  # which starts with no session open
            finally:
                llm.engine.rows = saved

        return go

    return {
        **{f"sis, {path}": sis(source) for path, source in paths(llm).items()},
        **{f"generate, {name}": partial(native.generate, prompt, n, steps) for name, native in natives.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="32x32,64x64", help="N particles x T tokens, comma-separated")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"of {', '.join(ENGINES)}")
    parser.add_argument("--repeat", type=int, default=MIN_REPEATS, help="timed runs of each, alternated")
    parser.add_argument("--model", default=None, help="a model folder or random:SHAPE (default: SmolLM2-135M)")
    parser.add_argument("--tokenizer", default=None, help="the tokenizer folder of a random:SHAPE model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--block-size", type=int, default=32, help="vLLM's KV block size (its CPU default is 128)")
    parser.add_argument("--engine", default="{}", help="more vllm engine options, as JSON (both sides)")
    parser.add_argument("--check", action="store_true", help="run the in-process engine's end-to-end checks first")
    parser.add_argument("--out", default=None, help="the results file (default benches/results/vllm.json)")
    args = parser.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    engines = args.engines.split(",")
    if set(engines) - set(ENGINES):
        parser.error(f"--engines takes {', '.join(ENGINES)}")

    from genlm_anyio import AsyncVirtualLM

    model = model_folder(args.model or str(assets.smollm2_dir()), args.tokenizer, args.dtype)
    engine_opts = {"dtype": args.dtype, "seed": 0, "block_size": args.block_size, **json.loads(args.engine)}
    report = Report("vllm", f"Seed SIS workload on vLLM beside LLM.generate ({args.model or 'SmolLM2-135M'})")
    table = report.table(
        "SIS through AsyncVirtualLM / vLLM's LLM.generate in its own process, same model and sizes "
        f"(best of {args.repeat}, alternated)",
        [
            "engine",
            "N x T",
            "SIS best",
            "SIS median",
            "LLM.generate best, engine core in process",
            "SIS / that",
            "LLM.generate best, same engine configuration",
            "SIS / that",
            "bytes / row",
        ],
        notes=[
            "bytes / row: what crosses a process per log-probability row (0: rows stay in this process)",
            "LLM.generate runs in a process of its own, with its engine core in that process and, beside the "
            "multiprocess configuration, also in a process of its own (the same engine configuration as the SIS "
            "row's); each run is checked to have run on the engine core it is labelled with",
        ],
    )
    if args.out:
        report.path = Path(args.out)
    with report.written(), ExitStack() as stack:
        # The natives start together (each in its own process) and stay up for every engine.
        natives = {"in-process": VLLMGenerate(model, **engine_opts)}
        if "multiprocess" in engines:
            natives["multiprocess"] = VLLMGenerate(model, multiprocess=True, **engine_opts)
        for native in natives.values():
            stack.enter_context(native)
        for name in engines:
            start = time.perf_counter()
            llm = AsyncVirtualLM.from_name(model, engine_opts=engine_opts, multiprocess=name == "multiprocess")
            print(f"  {name} engine start: {time.perf_counter() - start:.1f} s", flush=True)
            try:
                if args.check and name == "in-process":
                    checks = check(llm)
                    print(f"  checks: {checks}", flush=True)
                    table.notes.append(f"End-to-end checks of the {name} engine (passed): {checks}")
                by_path = bytes_per_row(llm.vocab_size)
                crossing = {
                    "CapturedRows": 0,
                    "worker rows": by_path["worker rows"],
                    "logprobs=-1": by_path["logprobs=-1"],
                }
                print(f"  {name}: bytes per row by path {by_path}", flush=True)
                own_natives = {k: v for k, v in natives.items() if k in ("in-process", name)}
                for n, steps in sizes:
                    samples = alternate(contenders(llm, own_natives, n, steps), repeats=args.repeat)
                    gens = {
                        k: report.measure(
                            f"{name}/{n}x{steps}/generate" + ("" if k == "in-process" else f" {k}"),
                            samples[f"generate, {k}"],
                        )
                        for k in own_natives
                    }
                    inproc, same = gens["in-process"], gens[name]
                    for path in paths(llm):
                        key = "sis" if path in ("CapturedRows", "worker rows") else f"sis {path}"
                        sis = report.measure(f"{name}/{n}x{steps}/{key}", samples[f"sis, {path}"])
                        row_bytes = crossing[path]
                        label = name if path == "CapturedRows" else f"{name}, {path}"
                        table.add(
                            label,
                            f"{n} x {steps}",
                            fmt(sis.best),
                            fmt(sis.median),
                            fmt(inproc.best),
                            ratio(sis.best, inproc.best),
                            fmt(same.best),
                            ratio(sis.best, same.best),
                            row_bytes,
                        )
                        print(
                            f"    {label} N={n} x {steps}: SIS {sis.best:.2f} s, LLM.generate {inproc.best:.2f} s "
                            f"(engine core in process), {same.best:.2f} s (same engine configuration): "
                            f"SIS / generate = {sis.best / inproc.best:.2f}x, {sis.best / same.best:.2f}x; "
                            f"per step {row_bytes * n / 1e6:.1f} MB cross",
                            flush=True,
                        )
            finally:
                llm.close()


if __name__ == "__main__":
    main()
