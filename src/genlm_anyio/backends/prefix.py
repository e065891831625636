"""What the backends that run the model in this process share: a prefix KV cache
per token (:mod:`genlm_anyio.kv_cache`), a bounded output cache, and the planning
of each batch into forward passes. A backend supplies one forward pass."""

from __future__ import annotations

import abc
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..kv_cache import PrefixKVCache
from .base import Adapter, AsyncLM, Query, RequestFailed, TokenIds


@dataclass
class ComputeStats:
    """What the model computed, for tests and tuning."""

    forward_passes: int = 0
    tokens_computed: int = 0
    """Token positions run through the model (padding excluded)."""
    logprob_cache_hits: int = 0
    """Requests answered from the output cache without a forward pass."""


@dataclass
class Job:
    """One sequence of a forward pass: cached prefix ``node`` (of length ``start``) and the tokens after it.

    ``path`` is the sequence as the KV trie knows it (see :meth:`PrefixCachedLM._path`).
    """

    query: Query
    path: TokenIds
    node: Any
    start: int

    @property
    def new(self) -> TokenIds:
        """The token ids this pass computes."""
        return self.query.ids[self.start :]


def positive_int(name: str, value: Any) -> int:
    """``value``, if it is an int >= 1 (a bool is not); otherwise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, not {value!r}")
    return value


class PrefixCachedLM(AsyncLM):
    """An :class:`AsyncLM` whose model runs here, sharing keys and values of common
    prefixes across requests: extending a cached sequence by one token computes one
    token. Prefixes that several requests of a batch share are computed first, once.
    Finished results are kept in a bounded LRU cache. Cached keys, values and
    results are never shared across LoRA adapters.

    A backend implements :meth:`_forward_pass`; it is called with the lock held.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        kv_shape: tuple[int, int, int],
        kv_dtype: torch.dtype,
        kv_device: torch.device,
        *,
        timeout: float,
        max_batch_size: int,
        kv_cache_bytes: int,
        logprob_cache_size: int,
        logprob_cache_bytes: int,
        max_batch_tokens: int,
    ):
        # genlm-backend's batching timer: kept as ``self.timeout``; there is no timer here.
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"timeout must be a number >= 0, not {timeout!r}")
        self.timeout = float(timeout)
        if logprob_cache_size < 0:
            raise ValueError(f"logprob_cache_size must be >= 0, not {logprob_cache_size}")
        if logprob_cache_bytes < 0:
            raise ValueError(f"logprob_cache_bytes must be >= 0, not {logprob_cache_bytes}")
        super().__init__(tokenizer, vocab_size, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens)
        self.kv_cache = PrefixKVCache(kv_shape, kv_dtype, kv_device, kv_cache_bytes)
        self._max_forward_tokens = max_batch_tokens
        self._outputs: OrderedDict[Query, torch.Tensor] = OrderedDict()
        self._outputs_size = logprob_cache_size
        self._outputs_budget = logprob_cache_bytes
        self._outputs_bytes = 0
        self._lock = threading.Lock()  # the model, the caches: one user at a time
        self.stats = ComputeStats()

    @abc.abstractmethod
    def _forward_pass(self, jobs: list[Job], past: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lock held) Run ``job.new`` of every job after its cached past (the KV
        slots ``past[b]``, gathered with :meth:`PrefixKVCache.gather`), each row
        under its query's adapter.

        Returns the next-token log-probabilities, float32 ``(len(jobs), vocab_size)``
        on the CPU, and the keys and values of the computed tokens, each
        ``(tokens, layers, kv_heads, head_dim)``: the rows of every job in order.
        """

    # -- the output cache ---------------------------------------------------------
    @property
    def output_cache_bytes(self) -> int:
        """Bytes the output cache holds now (each entry a compact float32 row)."""
        return self._outputs_bytes

    def _remember(self, query: Query, logprobs: torch.Tensor) -> torch.Tensor:
        """Cache a copy of ``logprobs`` (a row of its batch's tensor), and return
        it: a compact copy, so that the cache never keeps a whole batch alive."""
        if not self._outputs_size or not self._outputs_budget:
            return logprobs
        row = logprobs.clone()
        if query in self._outputs:
            self._outputs_bytes -= self._outputs.pop(query).nbytes
        self._outputs[query] = row
        self._outputs_bytes += row.nbytes
        while len(self._outputs) > self._outputs_size or self._outputs_bytes > self._outputs_budget:
            self._outputs_bytes -= self._outputs.popitem(last=False)[1].nbytes
        return row

    def _forget(self, adapter: Adapter) -> None:
        """(lock held) Drop every cached result of ``adapter``, KV included (its
        subtree: first tokens shifted by its serial, see :meth:`_path`)."""
        for query in [q for q in self._outputs if q.adapter is adapter]:
            self._outputs_bytes -= self._outputs.pop(query).nbytes
        shift = adapter.serial * self.vocab_size
        self.kv_cache.forget(range(shift, shift + self.vocab_size))

    def clear_cache(self) -> None:
        """Drop the KV cache and the output cache."""
        with self._lock:
            self.kv_cache.clear()
            self._outputs.clear()
            self._outputs_bytes = 0

    def clear_kv_cache(self) -> None:
        """Drop the KV cache only (cached results stay)."""
        with self._lock:
            self.kv_cache.clear()

    def _release(self) -> None:
        self.clear_cache()

    def _path(self, query: Query) -> TokenIds:
        """The sequence as the KV trie stores it: under an adapter, the first token
        is shifted out of the vocabulary's range by a multiple of its serial, so that
        each adapter registration has its own subtree (its own root)."""
        if query.adapter is None:
            return query.ids
        return (query.ids[0] + query.adapter.serial * self.vocab_size, *query.ids[1:])

    # -- batches --------------------------------------------------------------------
    def _batch_logprobs(self, batch: list[Query]) -> list[torch.Tensor | RequestFailed]:
        with self._lock, torch.inference_mode():
            results: dict[Query, torch.Tensor | RequestFailed] = {}
            todo = []
            for query in batch:
                if not self._registered(query.adapter):
                    results[query] = RequestFailed.adapter_removed(query.adapter)  # type: ignore[arg-type]
                    continue
                hit = self._outputs.get(query)
                if hit is not None:
                    self._outputs.move_to_end(query)
                    self.stats.logprob_cache_hits += 1
                    results[query] = hit
                else:
                    todo.append(query)
            for query in self._shared_prefixes(todo):
                # Prefixes that several requests extend are computed first, once.
                results.update(self._run([query]))
            results.update(self._run([query for query in todo if query not in results]))
            return [results[query] for query in batch]

    def _shared_prefixes(self, todo: list[Query]) -> list[Query]:
        """The longest uncached prefixes that two or more requests (under one adapter) share."""
        if len(todo) < 2:
            return []
        paths = {self._path(q): q for q in todo}
        starts = {path: self.kv_cache.match(path, len(path) - 1)[1] for path in paths}
        ordered = sorted(paths)
        shared: dict[TokenIds, Query] = {}
        for a, b in zip(ordered, ordered[1:]):
            common = 0
            for x, y in zip(a, b):
                if x != y:
                    break
                common += 1
            if common > max(starts[a], starts[b]):
                # Equal first path tokens mean one adapter: a's ids and adapter name the prefix.
                shared[a[:common]] = Query(paths[a].ids[:common], paths[a].adapter)
        # Keep only the deepest of nested shared prefixes' chains: each is computed
        # once and the shorter ones come with it.
        return [q for p, q in sorted(shared.items()) if not any(o != p and o[: len(p)] == p for o in shared)]

    def _run(self, queries: list[Query]) -> dict[Query, torch.Tensor]:
        """Forward passes for ``queries`` (split by ``max_batch_tokens``), storing their KV."""
        out: dict[Query, torch.Tensor] = {}
        jobs = []
        for query in queries:
            path = self._path(query)
            # The last token is always run: its logits are the answer.
            node, start = self.kv_cache.match(path, len(path) - 1)
            self.kv_cache.stats.prefix_tokens_reused += start
            jobs.append(Job(query, path, node, start))
        chunk: list[Job] = []
        tokens = 0
        for job in jobs:
            new = len(job.path) - job.start
            if chunk and tokens + new > self._max_forward_tokens:
                out.update(self._forward(chunk))
                chunk, tokens = [], 0
            chunk.append(job)
            tokens += new
        if chunk:
            out.update(self._forward(chunk))
        return out

    def _forward(self, jobs: list[Job]) -> dict[Query, torch.Tensor]:
        """One forward pass of ``jobs``, keeping the keys and values of the tokens
        no cached node holds yet."""
        cache = self.kv_cache
        for job in jobs:
            cache.pin(job.node, +1)
        try:
            logprobs, keys, values = self._forward_pass(jobs, [cache.slots(job.node) for job in jobs])
            self.stats.forward_passes += 1
            self.stats.tokens_computed += sum(len(job.new) for job in jobs)
            try:
                # A token stored meanwhile (a fully cached request's last one) keeps its slot.
                cache.store([(job.node, list(job.path[job.start :])) for job in jobs], keys, values)
            except MemoryError:
                pass  # the budget cannot hold this batch's tokens: computed, not kept
        finally:
            for job in jobs:
                cache.pin(job.node, -1)
        return {job.query: self._remember(job.query, lp) for job, lp in zip(jobs, logprobs)}

    def cache_kv(self, prompt_tokens: Sequence[int], lora_name: str | None = None) -> None:
        """Compute and cache the keys and values of ``prompt_tokens`` (and its
        next-token distribution), under adapter ``lora_name``."""
        self.next_token_logprobs_sync(prompt_tokens, lora_name=lora_name)
