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

from ..checks import check_int, positive_int
from ..kv_cache import PrefixKVCache
from .base import Adapter, AsyncLM, Query, Request, RequestFailed, TokenIds
from .shared_prefix import common_length


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
class PassRow:
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
    :meth:`_delete_adapter`; the others are called with the lock held. A backend
    over a model object that other engines may share sets ``self._lock`` to
    :func:`model_lock` of it.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        kv_shape: tuple[int, int, int],
        kv_dtype: torch.dtype,
        kv_device: torch.device,
        *,
        max_batch_size: int,
        kv_cache_bytes: int,
        logprob_cache_size: int,
        logprob_cache_bytes: int,
        max_forward_tokens: int,
    ):
        check_int("logprob_cache_size", logprob_cache_size, minimum=0)
        check_int("logprob_cache_bytes", logprob_cache_bytes, minimum=0)
        self.max_forward_tokens = positive_int("max_forward_tokens", max_forward_tokens)
        """Most new tokens (and padded positions) one forward pass computes; a batch's
        requests are admitted by their uncached tokens up to the same number."""
        super().__init__(tokenizer, vocab_size, max_batch_size=max_batch_size, max_batch_tokens=max_forward_tokens)
        self.kv_cache = PrefixKVCache(kv_shape, kv_dtype, kv_device, kv_cache_bytes)
        self._logprob_cache: OrderedDict[Query, torch.Tensor] = OrderedDict()
        self._logprob_cache_size = logprob_cache_size
        self._logprob_cache_budget = logprob_cache_bytes
        self._logprob_cache_bytes = 0
        self._lock = threading.Lock()  # the model, the caches: one user at a time
        self.compute_stats = ComputeStats()

    @abc.abstractmethod
    def _forward_pass(
        self, rows: list[PassRow], past: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lock held) Run ``row.new`` of every row after its cached past (the KV
        slots ``past[b]``, gathered with :meth:`PrefixKVCache.gather`), each row
        under its query's adapter.

        Returns the next-token log-probabilities, float32 ``(len(rows), vocab_size)``
        on the CPU, and the keys and values of the computed tokens, each
        ``(tokens, layers, kv_heads, head_dim)``: every row's tokens in order.
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
        return self._logprob_cache_bytes

    def _remember(self, query: Query, logprobs: torch.Tensor) -> torch.Tensor:
        """Cache a copy of ``logprobs`` (a row of its batch's tensor), and return
        it: a compact copy, so that the cache never keeps a whole batch alive."""
        if not self._logprob_cache_size or not self._logprob_cache_budget:
            return logprobs
        row = logprobs.clone()
        if query in self._logprob_cache:
            self._logprob_cache_bytes -= self._logprob_cache.pop(query).nbytes
        self._logprob_cache[query] = row
        self._logprob_cache_bytes += row.nbytes
        while (
            len(self._logprob_cache) > self._logprob_cache_size
            or self._logprob_cache_bytes > self._logprob_cache_budget
        ):
            self._logprob_cache_bytes -= self._logprob_cache.popitem(last=False)[1].nbytes
        return row

    # -- adapters -----------------------------------------------------------------
    def _delete_adapter(self, adapter: Adapter) -> None:
        """(lock held) Delete ``adapter``'s weights from the model."""
        raise NotImplementedError(f"{type(self).__name__} does not support LoRA adapters")

    def _drop_adapter(self, adapter: Adapter) -> None:
        """(lock held) Delete ``adapter``'s weights and every cached result of it,
        KV included (its subtree: first tokens shifted by its serial, see :meth:`_path`)."""
        self._delete_adapter(adapter)
        for query in [q for q in self._logprob_cache if q.adapter is adapter]:
            self._logprob_cache_bytes -= self._logprob_cache.pop(query).nbytes
        shift = adapter.serial * self.vocab_size
        self.kv_cache.forget(range(shift, shift + self.vocab_size))

    def _unload_adapter(self, adapter: Adapter) -> None:
        with self._lock:
            self._drop_adapter(adapter)

    def clear_cache(self) -> None:
        """Drop the KV cache and the output cache."""
        with self._lock:
            self.kv_cache.clear()
            self._logprob_cache.clear()
            self._logprob_cache_bytes = 0

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
                hit = self._logprob_cache.get(query)
                if hit is not None:
                    self._logprob_cache.move_to_end(query)
                    self.compute_stats.logprob_cache_hits += 1
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
            common = common_length(a, b)
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
                rows = [self._row(query) for query in todo]
                if first:  # what the requests found cached (not their own earlier chunks)
                    self.kv_cache.stats.prefix_tokens_reused += sum(row.start for row in rows)
                    first = False
                plan = self._plan(rows, unchunked)
                results, kept = self._forward(plan)
                out.update(results)
                for node in held:
                    self.kv_cache.pin(node, -1)
                held = []
                for row in plan:
                    if row.final:
                        continue
                    if not kept:
                        unchunked.add(row.query)
                        continue
                    node, _ = self.kv_cache.match(row.path, row.end)
                    self.kv_cache.pin(node, +1)
                    held.append(node)
                todo = [query for query in todo if query not in out]
        finally:
            for node in held:
                self.kv_cache.pin(node, -1)
        return out

    def _row(self, query: Query) -> PassRow:
        """``query``'s row after its longest cached prefix, to its end."""
        path = self._path(query)
        # The last token is always run: its logits are the answer.
        node, start = self.kv_cache.match(path, len(path) - 1)
        return PassRow(query, path, node, start, len(path))

    def _plan(self, rows: list[PassRow], whole: set[Query]) -> list[PassRow]:
        """The rows of the next forward pass: at most ``max_forward_tokens`` new
        tokens, and as many padded positions (rows times the longest row). The
        shortest rows go first; the first one that does not fit whole is cut to
        fill the pass (its first chunk; later passes continue it), unless it is
        in ``whole`` (a row alone in a pass runs whole)."""
        cap = self.max_forward_tokens
        plan: list[PassRow] = []
        tokens = width = 0
        for row in sorted(rows, key=lambda r: len(r.new)):
            count = len(plan) + 1
            room = min(cap - tokens, cap // count) if count * width <= cap else 0
            if len(row.new) <= room or (not plan and row.query in whole):
                plan.append(row)
                tokens, width = tokens + len(row.new), max(width, len(row.new))
                continue
            if room > 0 and row.query not in whole:
                row.end = row.start + room
                plan.append(row)
            break
        return plan

    def _forward(self, rows: list[PassRow]) -> tuple[dict[Query, torch.Tensor], bool]:
        """One forward pass of ``rows``, keeping the keys and values of the tokens
        no cached node holds yet: the results of the rows that end their query,
        and whether the keys and values were kept."""
        cache = self.kv_cache
        for row in rows:
            cache.pin(row.node, +1)
        try:
            logprobs, keys, values = self._forward_pass(rows, [cache.slots(row.node) for row in rows])
            computed = sum(len(row.new) for row in rows)
            self.compute_stats.forward_passes += 1
            self.compute_stats.tokens_computed += computed
            self.compute_stats.largest_forward_tokens = max(self.compute_stats.largest_forward_tokens, computed)
            try:
                # A token stored meanwhile (a fully cached request's last one) keeps its slot.
                cache.store([(row.node, list(row.path[row.start : row.end])) for row in rows], keys, values)
                kept = True
            except MemoryError:
                kept = False  # the budget cannot hold this pass's tokens: computed, not kept
        finally:
            for row in rows:
                cache.pin(row.node, -1)
        results = {row.query: self._remember(row.query, lp) for row, lp in zip(rows, logprobs) if row.final}
        return results, kept

    def cache_kv(self, prompt_tokens: Sequence[int], lora_name: str | None = None) -> None:
        """Compute and cache the keys and values of ``prompt_tokens`` (and its
        next-token distribution), under adapter ``lora_name``."""
        self.next_token_logprobs_sync(prompt_tokens, lora_name=lora_name)
