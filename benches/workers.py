"""One system per process, serving the workload benchmarks (see ``common.Worker``).

    python benches/workers.py SYSTEM MODEL [--device cpu] [--dtype float32] [--tokenizer DIR] [--engine JSON]

SYSTEM is one of:

- ``genlm-anyio``: ``AsyncTransformer`` running the seed example's SIS program
  (``examples/seed_example.py``'s ``Particle`` and ``autobatched_sis``);
- ``genlm-backend``: genlm-backend's ``AsyncTransformer`` running the same
  program (its module file checked to be genlm-backend's own);
- ``hf-loop``: a hand-written batched loop in plain transformers: the prompt
  prefilled once, its cache expanded to N rows, N tokens sampled per step;
- ``vllm``: vLLM's ``LLM.generate`` with prefix caching (``--engine``: JSON of
  ``vllm.LLM`` keyword arguments).

MODEL is a model folder, or ``random:SHAPE`` (a random-weight Llama of
``tools/assets.py``'s ``LLAMA_SHAPES`` over the tokenizer of ``--tokenizer``).

Each run gets a prompt (token ids), N particles and T tokens. The prompt is
computed first and not timed (``prefill_s``): ``cache_kv`` on the two libraries,
the prefill on the loop, one ``generate`` of the prompt on vLLM (its prefix
cache). The timed part is T steps of N tokens, EOS masked out, and one more
next-token distribution per particle (the seed program's final EOS step; vLLM's
``max_tokens`` is T + 1). The answer gives the seconds, the forward passes and
tokens computed (genlm-anyio: its ``llm.compute_stats``; genlm-backend and the loop: a
hook on the model), the distinct particles at the end, and resident memory
(``common.RssPeak``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from common import ROOT, RssPeak, genlm_backend_module, serve

SYSTEMS = ("genlm-anyio", "genlm-backend", "hf-loop", "vllm")
Ops = dict[str, Callable[..., dict[str, Any]]]


def load_hf(model: str, device: str, dtype_name: str, tokenizer_dir: str | None) -> tuple[Any, Any]:
    """The transformers model and tokenizer of ``model`` (a folder or ``random:SHAPE``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tools import assets

    dtype = getattr(torch, dtype_name)
    if model.startswith("random:"):
        if tokenizer_dir is None:
            raise SystemExit("a random:SHAPE model needs --tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        shape = model.removeprefix("random:")
        return assets.random_llama(shape, tokenizer, device, dtype, max_position_embeddings=8192), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model)
    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval(), tokenizer


def synchronize(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class PassCounter:
    """Forward passes of a torch model while the ``with`` block runs, and the token
    positions they computed (padding excluded where an attention mask says so)."""

    def __init__(self, model: Any):
        self.model = model
        self.passes = self.tokens = 0

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.passes += 1
        mask = kwargs.get("attention_mask")
        if ids is None:
            return
        if getattr(mask, "dim", lambda: 0)() == 2:
            self.tokens += int(mask[:, -ids.shape[-1] :].sum())
        else:
            self.tokens += ids.numel()

    def __enter__(self) -> PassCounter:
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def counters(stats: Any) -> dict[str, int]:
    """The integer counters of an ``llm.compute_stats`` object (genlm-anyio's ``ComputeStats``)."""
    if stats is None:
        return {}
    values = (
        {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
        if dataclasses.is_dataclass(stats)
        else vars(stats)
    )
    return {k: v for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool)}


def sis_ops(llm: Any, model: Any, default_batch_size: int | None) -> Ops:
    """The seed SIS program on ``llm`` (either library's ``AsyncTransformer``)."""
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    from seed_example import autobatched_sis

    eos = llm.tokenizer.eos_token_id
    vocab = len(llm.byte_vocab)

    def masks(tokens: int) -> Callable[[list[int]], torch.Tensor]:
        """EOS masked out for ``tokens`` steps, then EOS only (every particle runs all steps)."""
        no_eos = torch.zeros(vocab)
        no_eos[eos] = -float("inf")
        only_eos = torch.full((vocab,), -float("inf"))
        only_eos[eos] = 0.0
        return lambda context: only_eos if len(context) >= tokens else no_eos

    def sis(prompt: list[int], particles: int, tokens: int, seed: int = 0, batch_size: int | None = None) -> dict:
        if default_batch_size is not None:
            llm.batch_size = batch_size or default_batch_size
        llm.clear_cache()
        torch.manual_seed(seed)
        start = time.perf_counter()
        llm.cache_kv(prompt)
        prefill_s = time.perf_counter() - start
        stats = getattr(llm, "compute_stats", None)
        before = counters(stats)
        with RssPeak() as memory, PassCounter(model) as counter:
            start = time.perf_counter()
            done = asyncio.run(autobatched_sis(particles, llm, masks(tokens), prompt))
            seconds = time.perf_counter() - start
        result = {
            "seconds": seconds,
            "prefill_s": prefill_s,
            "forward_passes": counter.passes,
            "tokens_computed": counter.tokens,
            "distinct": len({tuple(p.context) for p in done}),
            **memory.metrics,
        }
        if stats is not None:  # genlm-anyio counts what it computed itself
            after = counters(stats)
            result["stats"] = {k: after[k] - before.get(k, 0) for k in after}
            result["tokens_computed"] = result["stats"].get("tokens_computed", counter.tokens)
        return result

    return {"sis": sis}


def hf_loop_ops(model: Any, tokenizer: Any) -> Ops:
    """The hand-written batched loop: prefill once, expand the cache to N rows, sample N tokens a step."""
    import torch

    eos = tokenizer.eos_token_id
    device = model.device

    @torch.no_grad()
    def generate(prompt: list[int], particles: int, tokens: int, seed: int = 0) -> dict:
        generator = torch.Generator(device).manual_seed(seed)
        start = time.perf_counter()
        out = model(torch.tensor([prompt], device=device), use_cache=True)
        synchronize(device)
        prefill_s = time.perf_counter() - start
        cache, first = out.past_key_values, out.logits[:, -1]
        del out
        sampled = []
        with RssPeak() as memory, PassCounter(model) as counter:
            start = time.perf_counter()
            cache.batch_repeat_interleave(particles)
            logits = first.expand(particles, -1)
            for step in range(tokens + 1):
                logprobs = logits.float().log_softmax(-1)
                if step == tokens:
                    break  # the distribution after the last token: the seed program's EOS step
                logprobs[:, eos] = -float("inf")
                chosen = torch.multinomial(logprobs.exp(), 1, generator=generator)
                sampled.append(chosen)
                logits = model(chosen, past_key_values=cache, use_cache=True).logits[:, -1]
            synchronize(device)
            seconds = time.perf_counter() - start
        rows = torch.cat(sampled, dim=1).tolist()
        return {
            "seconds": seconds,
            "prefill_s": prefill_s,
            "forward_passes": counter.passes,
            "tokens_computed": counter.tokens,
            "distinct": len({tuple(r) for r in rows}),
            **memory.metrics,
        }

    return {"generate": generate}


def vllm_ops(model: str, model_obj: Any, tokenizer: Any, engine: dict[str, Any]) -> Ops:
    """vLLM's ``LLM.generate`` with prefix caching (the model saved to a folder if it is random)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if model_obj is not None:  # a random model: vLLM loads folders
        folder = tempfile.mkdtemp(prefix="bench-vllm-model-")
        model_obj.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model = folder
    llm = LLM(model=model, enable_prefix_caching=True, **{"seed": 0, "dtype": "float32", **engine})

    def generate(prompt: list[int], particles: int, tokens: int, seed: int = 0) -> dict:
        llm.reset_prefix_cache()
        start = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(max_tokens=1), use_tqdm=False)
        prefill_s = time.perf_counter() - start
        params = SamplingParams(max_tokens=tokens + 1, ignore_eos=True, temperature=1.0)
        with RssPeak() as memory:
            start = time.perf_counter()
            outs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * particles, params, use_tqdm=False)
            seconds = time.perf_counter() - start
        rows = [tuple(o.outputs[0].token_ids) for o in outs]
        if any(len(r) != tokens + 1 for r in rows):
            raise RuntimeError(f"vLLM generated {sorted({len(r) for r in rows})} tokens, not {tokens + 1}")
        cached = [o.num_cached_tokens for o in outs if getattr(o, "num_cached_tokens", None) is not None]
        return {
            "seconds": seconds,
            "prefill_s": prefill_s,
            "forward_passes": None,
            "tokens_computed": None,
            "prompt_tokens_cached": min(cached) if cached else None,
            "distinct": len(set(rows)),
            "engine_core": type(llm.llm_engine.engine_core).__name__,
            **memory.metrics,
        }

    return {"generate": generate}


def start(args: argparse.Namespace) -> Ops:
    if args.system == "vllm":
        random_model = args.model.startswith("random:")
        model_obj, tokenizer = load_hf(args.model, "cpu", args.dtype, args.tokenizer) if random_model else (None, None)
        return vllm_ops(args.model, model_obj, tokenizer, json.loads(args.engine))
    model, tokenizer = load_hf(args.model, args.device, args.dtype, args.tokenizer)
    if args.system == "hf-loop":
        return hf_loop_ops(model, tokenizer)
    if args.system == "genlm-backend":
        hf = genlm_backend_module("genlm.backend.llm.hf")
        llm = hf.AsyncTransformer(model, tokenizer)
        return sis_ops(llm, model, default_batch_size=llm.batch_size)
    from genlm_anyio import AsyncTransformer

    return sis_ops(AsyncTransformer(model, tokenizer), model, default_batch_size=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("system", choices=SYSTEMS)
    parser.add_argument("model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokenizer", default=None, help="the tokenizer folder of a random:SHAPE model")
    parser.add_argument("--engine", default="{}", help="vllm.LLM keyword arguments, as JSON")
    args = parser.parse_args()
    if not args.model.startswith("random:") and not Path(args.model).exists():
        parser.error(f"no model folder {args.model}")
    serve(lambda: start(args))


if __name__ == "__main__":
    main()
