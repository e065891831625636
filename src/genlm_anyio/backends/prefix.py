"""What the backends that run the model in this process share: a prefix KV cache
per token (:mod:`genlm_anyio.kv_cache`), a bounded output cache, and the planning
of each batch into forward passes. A backend supplies one forward pass.

A request costs what it computes: the batcher admits requests by their uncached
tokens (an extension of a cached sequence by one token counts one), and a batch
becomes forward passes of at most ``max_forward_tokens`` new tokens each, the
shortest requests first. A request with more new tokens than a pass has room
for is computed in chunks (chunked prefill): each chunk's keys and values are
stored, and the next chunk continues from them in a later pass. Rows are
right-padded to the longest row of their pass, so a pass also holds at most
``max_forward_tokens`` padded positions (rows times the longest row): a long
chunk does not widen hundreds of one-token rows.
"""

from __future__ import annotations

import abc
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import check_int, check_number, positive_int
from ..kv_cache import PrefixKVCache
from .base import Adapter, AsyncLM, Query, Request, RequestFailed, TokenIds


@dataclass
class ComputeStats:
    """What the model computed, for tests and tuning."""

    forward_passes: int = 0
    tokens_computed: int = 0
    """Token positions run through the model (padding excluded)."""
    largest_forward_tokens: int = 0
    """The most tokens one forward pass computed (padding excluded)."""
    logprob_cache_hits: int = 0
    """Requests answered from the output cache without a forward pass."""


# id(model) -> its lock; an entry goes with its model (models need not be hashable: mlx's are dicts).
_MODEL_LOCKS: dict[int, threading.Lock] = {}
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.Lock:
    """The lock of ``model`` (a torch or mlx module), one per model object for as
    long as it lives: every engine over it holds it for a forward pass and while
    it changes the model (loads adapters into it, patches its modules), so that
    several engines over one model never meet inside it."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(id(model))
        if lock is None:
            lock = _MODEL_LOCKS[id(model)] = threading.Lock()
            weakref.finalize(model, _MODEL_LOCKS.pop, id(model), None).atexit = False
        return lock


@dataclass
class Job:
    """One row of a forward pass: cached prefix ``node`` (of length ``start``) and
    the tokens after it up to ``end`` (the whole query, or a chunk of it).

    ``path`` is the sequence as the KV trie knows it (see :meth:`PrefixCachedLM._path`).
    """

    query: Query
    path: TokenIds
    node: Any
    start: int
    end: int

    @property
    def new(self) -> TokenIds:
        """The token ids this pass computes."""
        return self.query.ids[self.start : self.end]

    @property
    def final(self) -> bool:
        """Whether this row ends the query (its logits are the answer), not a chunk before the end."""
        return self.end == len(self.path)


class PrefixCachedLM(AsyncLM):
    """An :class:`AsyncLM` whose model runs here, sharing keys and values of common
    prefixes across requests: extending a cached sequence by one token computes one
    token. Prefixes that several requests of a batch share are computed first, once.
    Finished results are kept in a bounded LRU cache. Cached keys, values and
    results are never shared across LoRA adapters.

    A backend implements :meth:`_forward_pass` and :meth:`_plain_pass`, and for
    LoRA adapters ``_load_adapter`` (which takes the lock) and
    :meth:`_delete_adapter`; the others are called with the lock held. A backend over a model object that other engines
    may share sets ``self._lock`` to :func:`model_lock` of it.
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
        max_forward_tokens: int,
    ):
        # genlm-backend's batching timer: kept as ``self.timeout``; there is no timer here.
        self.timeout = check_number("timeout", timeout, minimum=0)
        check_int("logprob_cache_size", logprob_cache_size, minimum=0)
        check_int("logprob_cache_bytes", logprob_cache_bytes, minimum=0)
        self.max_forward_tokens = positive_int("max_forward_tokens", max_forward_tokens)
        """Most new tokens (and padded positions) one forward pass computes; a batch's
        requests are admitted by their uncached tokens up to the same number."""
        super().__init__(tokenizer, vocab_size, max_batch_size=max_batch_size, max_batch_tokens=max_forward_tokens)
        self.kv_cache = PrefixKVCache(kv_shape, kv_dtype, kv_device, kv_cache_bytes)
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

    def _plain_pass(self, query: Query) -> torch.Tensor:
        """(lock held) One plain forward pass of ``query`` alone, with no cache:
        float32 ``(vocab_size,)`` log-probabilities on the CPU."""
        raise NotImplementedError(f"{type(self).__name__} has no plain forward pass")

    def next_token_logprobs_uncached(self, token_ids: Sequence[int], lora_name: str | None = None) -> torch.Tensor:
        """One plain forward pass of ``token_ids`` alone (under adapter ``lora_name``),
        with no cache: the reference the cached and batched results are checked against."""
        with self._lock, torch.inference_mode():
            # Adapters load and unload under this lock: the one resolved here stays until the pass ends.
            return self._plain_pass(self._query(token_ids, lora_name))

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

    # -- adapters -----------------------------------------------------------------
    def _delete_adapter(self, adapter: Adapter) -> None:
        """(lock held) Delete ``adapter``'s weights from the model."""
        raise NotImplementedError(f"{type(self).__name__} does not support LoRA adapters")

    def _drop_adapter(self, adapter: Adapter) -> None:
        """(lock held) Delete ``adapter``'s weights and every cached result of it,
        KV included (its subtree: first tokens shifted by its serial, see :meth:`_path`)."""
        self._delete_adapter(adapter)
        for query in [q for q in self._outputs if q.adapter is adapter]:
            self._outputs_bytes -= self._outputs.pop(query).nbytes
        shift = adapter.serial * self.vocab_size
        self.kv_cache.forget(range(shift, shift + self.vocab_size))

    def _unload_adapter(self, adapter: Adapter) -> None:
        with self._lock:
            self._drop_adapter(adapter)

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
    def _request_size(self, request: Request) -> int:
        """The tokens ``request`` computes: those after its longest cached prefix
        (at least its last one), read from the KV trie without touching it."""
        if not isinstance(request, Query):
            return super()._request_size(request)
        path = self._path(request)
        return len(path) - self.kv_cache.cached_length(path, len(path) - 1)

    def _batch_logprobs(self, batch: list[Query]) -> list[torch.Tensor | RequestFailed]:
        with self._lock, torch.inference_mode():
            results: dict[Query, torch.Tensor | RequestFailed] = {}
            todo = []
            for query in batch:
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
        """Forward passes for ``queries`` (planned by :meth:`_plan`), storing their KV."""
        out: dict[Query, torch.Tensor] = {}
        todo = list(queries)
        unchunked: set[Query] = set()  # their chunks' KV could not be kept: run whole
        held: list[Any] = []  # the ends of chunks computed so far, pinned until their next pass
        first = True
        try:
            while todo:
                # Matched before every pass: a pass may store what the next one reuses.
                jobs = [self._job(query) for query in todo]
                if first:  # what the requests found cached (not their own earlier chunks)
                    self.kv_cache.stats.prefix_tokens_reused += sum(job.start for job in jobs)
                    first = False
                plan = self._plan(jobs, unchunked)
                results, kept = self._forward(plan)
                out.update(results)
                for node in held:
                    self.kv_cache.pin(node, -1)
                held = []
                for job in plan:
                    if job.final:
                        continue
                    if not kept:
                        unchunked.add(job.query)
                        continue
                    node, _ = self.kv_cache.match(job.path, job.end)
                    self.kv_cache.pin(node, +1)
                    held.append(node)
                todo = [query for query in todo if query not in out]
        finally:
            for node in held:
                self.kv_cache.pin(node, -1)
        return out

    def _job(self, query: Query) -> Job:
        """``query``'s row after its longest cached prefix, to its end."""
        path = self._path(query)
        # The last token is always run: its logits are the answer.
        node, start = self.kv_cache.match(path, len(path) - 1)
        return Job(query, path, node, start, len(path))

    def _plan(self, jobs: list[Job], whole: set[Query]) -> list[Job]:
        """The rows of the next forward pass: at most ``max_forward_tokens`` new
        tokens, and as many padded positions (rows times the longest row). The
        shortest jobs go first; the first one that does not fit whole is cut to
        fill the pass (its first chunk; later passes continue it), unless it is
        in ``whole`` (a job alone in a pass runs whole)."""
        cap = self.max_forward_tokens
        plan: list[Job] = []
        tokens = width = 0
        for job in sorted(jobs, key=lambda j: len(j.new)):
            rows = len(plan) + 1
            room = min(cap - tokens, cap // rows) if rows * width <= cap else 0
            if len(job.new) <= room or (not plan and job.query in whole):
                plan.append(job)
                tokens, width = tokens + len(job.new), max(width, len(job.new))
                continue
            if room > 0 and job.query not in whole:
                job.end = job.start + room
                plan.append(job)
            break
        return plan

    def _forward(self, jobs: list[Job]) -> tuple[dict[Query, torch.Tensor], bool]:
        """One forward pass of ``jobs``, keeping the keys and values of the tokens
        no cached node holds yet: the results of the jobs that end their query,
        and whether the keys and values were kept."""
        cache = self.kv_cache
        for job in jobs:
            cache.pin(job.node, +1)
        try:
            logprobs, keys, values = self._forward_pass(jobs, [cache.slots(job.node) for job in jobs])
            computed = sum(len(job.new) for job in jobs)
            self.stats.forward_passes += 1
            self.stats.tokens_computed += computed
            self.stats.largest_forward_tokens = max(self.stats.largest_forward_tokens, computed)
            try:
                # A token stored meanwhile (a fully cached request's last one) keeps its slot.
                cache.store([(job.node, list(job.path[job.start : job.end])) for job in jobs], keys, values)
                kept = True
            except MemoryError:
                kept = False  # the budget cannot hold this pass's tokens: computed, not kept
        finally:
            for job in jobs:
                cache.pin(job.node, -1)
        results = {job.query: self._remember(job.query, lp) for job, lp in zip(jobs, logprobs) if job.final}
        return results, kept

    def cache_kv(self, prompt_tokens: Sequence[int], lora_name: str | None = None) -> None:
        """Compute and cache the keys and values of ``prompt_tokens`` (and its
        next-token distribution), under adapter ``lora_name``."""
        self.next_token_logprobs_sync(prompt_tokens, lora_name=lora_name)

    def reset_async_queries(self) -> None:
        """genlm-backend's "clear any pending queries" after an interrupted inference:
        nothing to do here, since a cancelled caller's request is already dropped
        (and one still wanted by another caller runs for that caller)."""
