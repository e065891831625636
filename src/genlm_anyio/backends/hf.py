"""The Hugging Face transformers backend, with a prefix KV cache per token."""
from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..kv_cache import PrefixKVCache
from .base import AsyncLM, TokenIds


@dataclass
class ComputeStats:
    """What the model computed, for tests and tuning."""

    forward_passes: int = 0
    tokens_computed: int = 0
    """Token positions run through the model (padding excluded)."""
    logprob_cache_hits: int = 0
    """Requests answered from the output cache without a forward pass."""


@dataclass
class _Job:
    """One sequence of a forward pass: cached prefix ``node`` (of length ``start``) and the tokens after it."""

    ids: TokenIds
    node: Any
    start: int


def _layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def _seed(kv: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Put the gathered past, ``(layers, batch, heads, length, dim)``, into an empty DynamicCache."""
    for layer in range(keys.shape[0]):
        if hasattr(kv, "layers"):
            # Create the layer with an empty update, then hand it the past as is:
            # the model's own update concatenates it with the new tokens, the one
            # copy that is needed (a plain update would copy it once more).
            kv.update(keys[layer, :, :, :0], values[layer, :, :, :0], layer)
            kv.layers[layer].keys, kv.layers[layer].values = keys[layer], values[layer]
        else:
            kv.update(keys[layer], values[layer], layer)


class AsyncTransformer(AsyncLM):
    """A transformers causal LM with autobatching and a shared prefix KV cache.

    Extending a cached sequence by one token computes one token; identical
    concurrent requests are computed once; finished results are kept in a
    bounded LRU cache.

    Args:
        hf_model: a ``transformers`` causal language model (in eval mode).
        hf_tokenizer: its tokenizer.
        kv_cache_bytes: the byte budget of the KV cache (default 1 GiB).
        logprob_cache_size: how many results the output cache keeps (0 disables it).
        max_batch_size: most sequences in one batch.
        max_batch_tokens: most new tokens in one forward pass (longer batches are split).
    """

    def __init__(
        self,
        hf_model: Any,
        hf_tokenizer: Any,
        *,
        kv_cache_bytes: int = 1 << 30,
        logprob_cache_size: int = 256,
        max_batch_size: int = 128,
        max_batch_tokens: int = 4096,
    ):
        if logprob_cache_size < 0:
            raise ValueError(f"logprob_cache_size must be >= 0, not {logprob_cache_size}")
        self.model = hf_model.eval()
        config = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
        vocab_size = hf_model.get_output_embeddings().weight.shape[0]
        super().__init__(hf_tokenizer, vocab_size, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens)
        self.device = next(hf_model.parameters()).device
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.kv_cache = PrefixKVCache(
            (config.num_hidden_layers, heads, head_dim), next(hf_model.parameters()).dtype, self.device, kv_cache_bytes
        )
        self._max_forward_tokens = max_batch_tokens
        self._outputs: OrderedDict[TokenIds, torch.Tensor] = OrderedDict()
        self._outputs_size = logprob_cache_size
        self._lock = threading.Lock()  # the model, the caches: one user at a time
        # transformers 5.2x renamed `past_key_values` to `cache`.
        self._cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
        self.stats = ComputeStats()

    @classmethod
    def from_name(cls, model_id: str, hf_opts: dict[str, Any] | None = None, **opts: Any) -> "AsyncTransformer":
        """Load ``model_id`` (a hub id, a local folder, or a ``.gguf`` file) with transformers.

        ``hf_opts`` go to ``from_pretrained`` (``device_map``, ``dtype``, ...); by
        default the model goes to CUDA when it is available.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf_opts = dict(hf_opts or {})
        if "device_map" not in hf_opts and torch.cuda.is_available():
            hf_opts["device_map"] = "cuda"
        path, tok_opts = model_id, {}
        if str(model_id).endswith(".gguf"):
            gguf = Path(model_id)
            path, tok_opts = str(gguf.parent), {"gguf_file": gguf.name}
            hf_opts.setdefault("gguf_file", gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(path, **tok_opts)
        model = AutoModelForCausalLM.from_pretrained(path, **hf_opts)
        return cls(model, tokenizer, **opts)

    # -- the output cache ---------------------------------------------------------
    def _remember(self, ids: TokenIds, logprobs: torch.Tensor) -> None:
        if self._outputs_size:
            self._outputs[ids] = logprobs
            while len(self._outputs) > self._outputs_size:
                self._outputs.popitem(last=False)

    def clear_cache(self) -> None:
        """Drop the KV cache and the output cache."""
        with self._lock:
            self.kv_cache.clear()
            self._outputs.clear()

    def _release(self) -> None:
        self.clear_cache()

    # -- batches --------------------------------------------------------------------
    def _batch_logprobs(self, batch: list[TokenIds]) -> list[torch.Tensor]:
        with self._lock, torch.inference_mode():
            results: dict[TokenIds, torch.Tensor] = {}
            todo = []
            for ids in batch:
                hit = self._outputs.get(ids)
                if hit is not None:
                    self._outputs.move_to_end(ids)
                    self.stats.logprob_cache_hits += 1
                    results[ids] = hit
                else:
                    todo.append(ids)
            for ids in self._shared_prefixes(todo):
                # Prefixes that several requests extend are computed first, once.
                results.update(self._run([ids]))
            results.update(self._run([ids for ids in todo if ids not in results]))
            return [results[ids] for ids in batch]

    def _shared_prefixes(self, todo: list[TokenIds]) -> list[TokenIds]:
        """The longest uncached prefixes that two or more requests share."""
        if len(todo) < 2:
            return []
        starts = {ids: self.kv_cache.match(ids, len(ids) - 1)[1] for ids in todo}
        ordered = sorted(todo)
        shared: set[TokenIds] = set()
        for a, b in zip(ordered, ordered[1:]):
            common = 0
            for x, y in zip(a, b):
                if x != y:
                    break
                common += 1
            if common > max(starts[a], starts[b]):
                shared.add(a[:common])
        # Keep only the deepest of nested shared prefixes' chains: each is computed
        # once and the shorter ones come with it.
        return sorted(p for p in shared if not any(q != p and q[: len(p)] == p for q in shared))

    def _run(self, seqs: list[TokenIds]) -> dict[TokenIds, torch.Tensor]:
        """Forward passes for ``seqs`` (split by ``max_batch_tokens``), storing their KV."""
        out: dict[TokenIds, torch.Tensor] = {}
        jobs = []
        for ids in seqs:
            # The last token is always run: its logits are the answer.
            node, start = self.kv_cache.match(ids, len(ids) - 1)
            self.kv_cache.stats.prefix_tokens_reused += start
            jobs.append(_Job(ids, node, start))
        chunk: list[_Job] = []
        tokens = 0
        for job in jobs:
            new = len(job.ids) - job.start
            if chunk and tokens + new > self._max_forward_tokens:
                out.update(self._forward(chunk))
                chunk, tokens = [], 0
            chunk.append(job)
            tokens += new
        if chunk:
            out.update(self._forward(chunk))
        return out

    def _forward(self, jobs: list[_Job]) -> dict[TokenIds, torch.Tensor]:
        from transformers import DynamicCache

        cache = self.kv_cache
        for job in jobs:
            cache.pin(job.node, +1)
        try:
            past = [cache.slots(job.node) for job in jobs]
            news = [job.ids[job.start :] for job in jobs]
            width = max(len(n) for n in news)
            batch = len(jobs)
            past_len = max(len(p) for p in past)

            input_ids = torch.zeros((batch, width), dtype=torch.long)
            position_ids = torch.zeros((batch, width), dtype=torch.long)
            mask = torch.zeros((batch, past_len + width), dtype=torch.long)
            for b, (p, n) in enumerate(zip(past, news)):
                input_ids[b, : len(n)] = torch.tensor(n)
                position_ids[b, : len(n)] = torch.arange(len(p), len(p) + len(n))
                mask[b, : len(p)] = 1
                mask[b, past_len : past_len + len(n)] = 1
            kv = DynamicCache()
            if past_len:
                keys, values = cache.gather(past)
                _seed(kv, keys, values)
            last = torch.tensor([len(n) - 1 for n in news])
            outputs = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=position_ids.to(self.device),
                use_cache=True,
                **{self._cache_arg: kv},
                logits_to_keep=torch.unique(last).to(self.device),
            )
            self.stats.forward_passes += 1
            self.stats.tokens_computed += sum(len(n) for n in news)

            # Logits were kept for the distinct last positions only: pick each row's.
            kept = torch.unique(last)
            column = torch.searchsorted(kept, last)
            logits = outputs.logits[torch.arange(batch), column.to(outputs.logits.device)]
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()

            self._store(jobs, news, past_len, kv)
        finally:
            for job in jobs:
                cache.pin(job.node, -1)
        result = {}
        for job, lp in zip(jobs, logprobs):
            self._remember(job.ids, lp)
            result[job.ids] = lp
        return result

    def _store(self, jobs: list[_Job], news: list[TokenIds], past_len: int, kv: Any) -> None:
        """Keep the keys and values of the tokens no cached node holds yet."""
        cache = self.kv_cache
        width = max(len(n) for n in news)
        rows = [b * width + j for b, new in enumerate(news) for j in range(len(new))]
        index = torch.tensor(rows, device=self.device)
        # Per layer (batch, heads, width, dim) -> (batch * width, layers, heads, dim), rows kept.
        flat = (-1, cache.heads, cache.head_dim)
        keys = torch.stack(
            [_layer_kv(kv, layer)[0][:, :, past_len:].transpose(1, 2).reshape(flat).index_select(0, index) for layer in range(cache.layers)],
            dim=1,
        )
        values = torch.stack(
            [_layer_kv(kv, layer)[1][:, :, past_len:].transpose(1, 2).reshape(flat).index_select(0, index) for layer in range(cache.layers)],
            dim=1,
        )
        try:
            # A token stored meanwhile (a fully cached request's last one) keeps its slot.
            cache.store([(job.node, list(new)) for job, new in zip(jobs, news)], keys, values)
        except MemoryError:
            pass  # the budget cannot hold this batch's tokens: computed, not kept

    # -- uncached ---------------------------------------------------------------------
    def next_token_logprobs_uncached(self, token_ids: Sequence[int]) -> torch.Tensor:
        """One plain forward pass of ``token_ids`` alone, with no cache: the reference."""
        ids = self._ids(token_ids)
        with self._lock, torch.inference_mode():
            logits = self.model(torch.tensor([ids], device=self.device), use_cache=False).logits[0, -1]
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    def cache_kv(self, prompt_tokens: Sequence[int]) -> None:
        """Compute and cache the keys and values of ``prompt_tokens`` (and its next-token distribution)."""
        self.next_token_logprobs_sync(prompt_tokens)
