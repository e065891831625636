"""Data parallelism: one :class:`AsyncLM` over several replicas of a model.

Each request goes to the replica that already holds the longest prefix of its
tokens, so a sequence that grows one token per step (a particle of SMC) stays
where its engine session and prefix cache are. Requests with no such replica,
or whose replica is busier than another by more than ``max_imbalance``
requests, go to the least busy replica.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checks import check_int, positive_int
from ..loading import load_replicas
from .base import Adapter, AsyncLM, Query, RequestFailed, SampleRequest, TokenIds


@dataclass
class ReplicaStats:
    """How :class:`ReplicatedLM` routed its requests."""

    requests: list[int] = field(default_factory=list)
    """Requests (distinct log-probability requests and sampling runs) routed to each replica."""
    affinity_hits: int = 0
    """Requests routed to the replica holding the longest recorded prefix of their tokens."""
    balanced: int = 0
    """Requests routed to the least busy replica (no recorded prefix, or its replica was too busy)."""


class _PrefixRecord:
    """Which replica last received each token sequence, by a hash chained over
    its ids; the oldest entries go beyond ``capacity``. A hash collision can only
    send a request to a replica without its prefix: results stay correct."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._owner: dict[int, int] = {}

    @staticmethod
    def _chain(ids: TokenIds, adapter: Adapter | None) -> list[int]:
        h = hash(("genlm-anyio-prefix", None if adapter is None else adapter.serial))
        chain = []
        for t in ids:
            h = hash((h, t))
            chain.append(h)
        return chain

    def key(self, ids: TokenIds, adapter: Adapter | None) -> int:
        """The record key of ``ids`` (the last hash of its chain)."""
        return self._chain(ids, adapter)[-1]

    def longest(self, ids: TokenIds, adapter: Adapter | None) -> tuple[int | None, list[int]]:
        """The replica of the longest recorded sequence that ``ids`` starts with (or
        None), and ``ids``' hash chain."""
        chain = self._chain(ids, adapter)
        for h in reversed(chain):
            owner = self._owner.get(h)
            if owner is not None:
                return owner, chain
        return None, chain

    def record(self, key: int, replica: int) -> None:
        """Record that ``replica`` holds the sequence whose chain ends in ``key``."""
        self._owner.pop(key, None)  # re-inserted last: the most recent entry
        self._owner[key] = replica
        while len(self._owner) > self.capacity:
            del self._owner[next(iter(self._owner))]

    def clear(self) -> None:
        self._owner.clear()


class ReplicatedLM(AsyncLM):
    """One language model over several replicas (data parallelism).

    The replicas are language models of the same model and vocabulary (for
    example vLLM engines, each on its own GPU or CPU cores: see :meth:`from_name`,
    or transformers models); each computes its share of every batch, all at
    once. A request goes to the replica that already holds the longest prefix of
    its tokens (with vLLM: the idle session it extends, and its prefix cache),
    unless that replica has ``max_imbalance`` more requests in flight than the
    least busy one; requests without such a prefix go to the least busy
    replica. ``routing_stats`` counts the routing.

    The replicas belong to this model: :meth:`close` closes them all. A replica
    that fails fails only the requests routed to it. LoRA adapters registered
    here are loaded into every replica.

    Args:
        replicas: the models (at least one), with equal vocabularies.
        max_imbalance: how many more requests in flight than the least busy
            replica a replica may have and still take a request by prefix.
        record_size: how many sequences the routing record remembers.
        max_batch_size: most requests routed at once (over all replicas).
    """

    def __init__(
        self,
        replicas: Sequence[AsyncLM],
        *,
        max_imbalance: int = 4,
        record_size: int = 1 << 20,
        max_batch_size: int = 1024,
    ):
        if isinstance(replicas, AsyncLM) or not isinstance(replicas, Sequence):
            raise TypeError(f"replicas must be a sequence of AsyncLM, not {type(replicas).__name__}")
        if not replicas:
            raise ValueError("replicas must not be empty")
        for i, r in enumerate(replicas):
            if not isinstance(r, AsyncLM):
                raise TypeError(f"replicas[{i}] must be an AsyncLM, not {type(r).__name__}")
        sizes = {r.vocab_size for r in replicas}
        if len(sizes) != 1:
            raise ValueError(f"replicas must share one vocabulary; their vocab sizes are {sorted(sizes)}")
        check_int("max_imbalance", max_imbalance, minimum=0)
        positive_int("record_size", record_size)
        self.replicas: list[AsyncLM] = list(replicas)
        self.max_imbalance = max_imbalance
        self.routing_stats = ReplicaStats(requests=[0] * len(self.replicas))
        self._record = _PrefixRecord(record_size)
        self._in_flight = [0] * len(self.replicas)
        self._route_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="genlm-anyio-replica")
        super().__init__(replicas[0].tokenizer, replicas[0].vocab_size, max_batch_size=max_batch_size)

    @classmethod
    def from_name(
        cls,
        model_name: str,
        replicas: int = 2,
        backend: str = "vllm",
        *,
        replica_opts: dict[str, Any] | None = None,
        **opts: Any,
    ) -> ReplicatedLM:
        """Start ``replicas`` replicas of ``model_name`` and route over them.

        ``backend="vllm"``: each replica is a vLLM multiprocess engine (its engine
        core in a process of its own), on vLLM's CPU platform for now
        (NotImplementedError elsewhere). The cores this process may use are
        split between the replicas, one contiguous range each (and within a
        replica between its tensor-parallel workers), unless
        ``VLLM_CPU_OMP_THREADS_BIND`` is set. ``replica_opts`` go to
        :meth:`AsyncVirtualLM.from_name` (``engine_opts``, ``max_batch_size``).
        Other backends (``"hf"``, ``"mock"``) load each replica with
        :func:`~genlm_anyio.load_model_by_name` and ``replica_opts`` as its
        ``llm_opts``, in this process (both through
        :func:`~genlm_anyio.loading.load_replicas`, where backend names are
        dispatched). ``opts`` go to the constructor.
        """
        positive_int("replicas", replicas)
        if replica_opts is not None and not isinstance(replica_opts, dict):
            raise TypeError(f"replica_opts must be a dict or None, not {type(replica_opts).__name__}")
        started = load_replicas(model_name, replicas, backend, dict(replica_opts or {}))
        try:
            return cls(started, **opts)
        except BaseException:
            for lm in started:
                lm.close()
            raise

    # -- routing ----------------------------------------------------------------------
    def _route(self, ids: TokenIds, adapter: Adapter | None) -> int:
        """Pick the replica for ``ids``, record it there, and count it in flight."""
        with self._route_lock:
            owner, chain = self._record.longest(ids, adapter)
            load = self._in_flight
            least = min(range(len(load)), key=lambda i: (load[i], self.routing_stats.requests[i]))
            if owner is not None and load[owner] - load[least] <= self.max_imbalance:
                chosen = owner
                self.routing_stats.affinity_hits += 1
            else:
                chosen = least
                self.routing_stats.balanced += 1
            self._record.record(chain[-1], chosen)
            load[chosen] += 1
            self.routing_stats.requests[chosen] += 1
            return chosen

    def _finish(self, replica: int) -> None:
        with self._route_lock:
            self._in_flight[replica] -= 1

    def replica_of(self, token_ids: Sequence[int], lora_name: str | None = None) -> int | None:
        """The replica holding the longest recorded prefix of ``token_ids`` (None if none), without routing."""
        query = self._query(token_ids, lora_name)
        with self._route_lock:
            return self._record.longest(query.ids, query.adapter)[0]

    # -- what a backend provides --------------------------------------------------------
    def _batch_logprobs(self, batch: list[Query]) -> list[torch.Tensor | RequestFailed]:
        results: dict[int, torch.Tensor | RequestFailed] = {}
        groups: dict[tuple[int, Adapter | None], list[int]] = {}
        for i, query in enumerate(batch):
            replica = self._route(query.ids, query.adapter)
            groups.setdefault((replica, query.adapter), []).append(i)

        def run(replica: int, adapter: Adapter | None, rows: list[int]) -> None:
            try:
                name = None if adapter is None else adapter.name
                out = self.replicas[replica].batch_next_token_logprobs_sync([batch[i].ids for i in rows], name)
                for i, row in zip(rows, out):
                    results[i] = row
            except Exception as exc:  # only this replica's requests fail
                failed = _failure(exc, f"replica {replica} failed: {exc}")
                for i in rows:
                    results[i] = failed
            finally:
                for _ in rows:
                    self._finish(replica)

        # Every replica computes its share at once.
        futures = [self._pool.submit(run, replica, adapter, rows) for (replica, adapter), rows in groups.items()]
        for future in futures:
            future.result()
        return [results[i] for i in range(len(batch))]

    async def _sample(self, request: SampleRequest) -> list[int]:
        replica = self._route(request.prompt, request.adapter)
        try:
            tokens = await self.replicas[replica].sample(
                request.prompt,
                request.max_tokens,
                request.eos_token_ids,
                request.temperature,
                request.seed,
                None if request.adapter is None else request.adapter.name,
            )
        finally:
            self._finish(replica)
        if tokens:  # the replica now holds the prompt and its sample
            key = self._record.key(request.prompt + tuple(tokens), request.adapter)
            with self._route_lock:
                self._record.record(key, replica)
        return tokens

    def _load_adapter(self, adapter: Adapter, replaced: Adapter | None) -> None:
        for r in self.replicas:
            r.add_new_lora(adapter.path, adapter.name)

    def _unload_adapter(self, adapter: Adapter) -> None:
        for r in self.replicas:
            r.remove_lora(adapter.name)

    def clear_cache(self) -> None:
        """Drop every replica's caches and the routing record."""
        for r in self.replicas:
            r.clear_cache()
        with self._route_lock:
            self._record.clear()

    def _release(self) -> None:
        errors = []
        for r in self.replicas:
            try:
                r.close()
            except Exception as exc:  # close the others all the same
                errors.append(exc)
        self._pool.shutdown(wait=False)
        if errors:
            raise errors[0]


def _failure(exc: Exception, message: str) -> RequestFailed:
    """``exc`` as the answer of each request it failed: its own type where that
    type is built from a message alone, RuntimeError otherwise."""
    try:
        type(exc)(message)
    except Exception:
        return RequestFailed(RuntimeError, f"{message} ({type(exc).__name__})")
    return RequestFailed(type(exc), message)
