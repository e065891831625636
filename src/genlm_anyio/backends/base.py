"""The interface every language-model backend implements, and what they share:
the request pipeline (validate the request, resolve its adapter, batch it, drop
the rows whose adapter was removed meanwhile, then the backend's batch
function), LoRA adapter registration, sampling, and the context-manager
protocol."""

from __future__ import annotations

import abc
import itertools
import operator
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import anyio
import torch

from ..batching import Batcher, BatchStats
from ..checks import check_int, check_number
from ..lifetime import Closeable
from ..vocab import Token, decode_vocab, tokens_from_bytes

TokenIds = tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Adapter:
    """One registration of a LoRA adapter under a name.

    Equality and hashing are by identity: registering a name again makes a new
    :class:`Adapter`, so requests, cache entries and engine sessions of the old
    registration never meet those of the new one.
    """

    name: str
    path: str
    serial: int
    """Unique per model and registration, from 1 (0 is never an adapter)."""


@dataclass(frozen=True)
class Query:
    """A validated next-token log-probability request: the ids, under an adapter
    (``None``: the base model). The key the batching engine shares requests by."""

    ids: TokenIds
    adapter: Adapter | None = None

    def __len__(self) -> int:
        """The tokens of the request: its size for a batcher's token limit."""
        return len(self.ids)


@dataclass(frozen=True)
class RequestFailed:
    """A backend's answer for one request of a batch that cannot be computed
    (its adapter was removed after it was submitted): only that request's callers
    raise ``error_type(message)``, each their own exception."""

    error_type: type[Exception]
    message: str

    @classmethod
    def adapter_removed(cls, adapter: Adapter) -> RequestFailed:
        """The answer for a request whose adapter was removed or replaced after it was submitted."""
        return cls(ValueError, f"the LoRA adapter {adapter.name!r} was removed or replaced before this request ran")


def _unknown_adapter(name: str) -> str:
    return f"no LoRA adapter is registered as {name!r}; load it with add_new_lora(path, {name!r})"


_nonces = itertools.count()


@dataclass(frozen=True)
class SampleRequest:
    """A validated :meth:`AsyncLM.sample` call."""

    prompt: TokenIds
    max_tokens: int
    eos_token_ids: TokenIds
    temperature: float
    seed: int | None
    adapter: Adapter | None = None
    # Unseeded runs are independent draws: a fresh nonce keeps a batcher from merging them.
    nonce: int = field(default_factory=lambda: next(_nonces))

    def __len__(self) -> int:
        """The tokens this request may occupy: its size for a batcher's token limit."""
        return len(self.prompt) + self.max_tokens


Request = Union[Query, SampleRequest]
"""What a model's batcher takes: next-token requests, and (on backends whose
engine samples itself) sampling runs."""


def _as_ids(token_ids: Any, vocab_size: int, name: str = "token_ids") -> TokenIds:
    """``token_ids`` as a tuple of ints in ``[0, vocab_size)``, or a named error."""
    # The common case, a list or tuple of plain ints, checked at C speed: prompts
    # of thousands of tokens are validated on every request.
    if type(token_ids) in (list, tuple) and token_ids and set(map(type, token_ids)) == {int}:
        plain = tuple(token_ids)
        if min(plain) >= 0 and max(plain) < vocab_size:
            return plain
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.is_floating_point() or token_ids.is_complex():
            raise TypeError(
                f"{name} must be a 1-D integer tensor, not {token_ids.dtype} of shape {tuple(token_ids.shape)}"
            )
        token_ids = token_ids.tolist()
    elif isinstance(token_ids, (str, bytes)) or (
        not isinstance(token_ids, Sequence) and not hasattr(token_ids, "__array__")
    ):
        raise TypeError(f"{name} must be a sequence of token ids, not {type(token_ids).__name__}")
    ids: list[int] = []
    for i, t in enumerate(token_ids):
        if isinstance(t, bool):
            raise TypeError(f"{name}[{i}] must be an int, not bool")
        try:
            ids.append(operator.index(t))
        except TypeError:
            raise TypeError(f"{name}[{i}] must be an int, not {type(t).__name__} ({t!r})") from None
    if not ids:
        raise ValueError(f"{name} must not be empty")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{name} holds {bad}, outside the vocabulary [0, {vocab_size})")
    return tuple(ids)


class AsyncLM(Closeable):
    """A language model that answers next-token log-probability requests.

    Every async method works under asyncio and trio, from any number of
    concurrent tasks: concurrent requests are computed together in batches by one
    worker thread per model. Every ``*_sync`` method works from plain threads.
    Its lifetime is :class:`~genlm_anyio.lifetime.Closeable`'s: ``close()`` /
    ``await aclose()``, or a ``with`` / ``async with`` block.

    Attributes:
        tokenizer: the Hugging Face tokenizer.
        byte_vocab: the bytes of each token id, as :class:`Token` (``len == vocab_size``).
        str_vocab: a string form of each token.
        vocab_size: the length of every log-probability vector.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int | None = None,
        *,
        max_batch_size: int = 128,
        max_batch_tokens: int | None = None,
    ):
        self.tokenizer = tokenizer
        byte_vocab, self.str_vocab = decode_vocab(tokenizer)
        self.vocab_size = vocab_size or len(byte_vocab)
        if self.vocab_size > len(byte_vocab):
            # The model's output layer is padded beyond the tokenizer: ids with no token.
            pad = self.vocab_size - len(byte_vocab)
            byte_vocab = tokens_from_bytes([bytes(t) for t in byte_vocab] + [b""] * pad)
            self.str_vocab = self.str_vocab + [""] * pad
        self.byte_vocab: list[Token] = byte_vocab[: self.vocab_size]
        self.str_vocab = self.str_vocab[: self.vocab_size]
        self._adapters: dict[str, Adapter] = {}
        self._adapter_serials = itertools.count(1)
        self._adapters_lock = threading.Lock()  # registration is one change at a time
        self._released = False  # close() freed the backend's resources
        self._batcher: Batcher[Request, Any] = Batcher(
            self._run_batch,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            size=self._request_size,
            name=f"genlm-anyio-{type(self).__name__}",
        )

    # -- what a backend provides --------------------------------------------------
    @abc.abstractmethod
    def _batch_logprobs(self, batch: list[Query]) -> list[torch.Tensor | RequestFailed]:
        """Log-probabilities (float32, ``(vocab_size,)``) for distinct requests
        whose adapters are registered; runs in the worker thread.

        A request may still get a :class:`RequestFailed` (its own failure).
        """

    def _batch(self, batch: list[Request]) -> list[Any]:
        """The backend's batch function: a result for each of distinct requests
        whose adapters are registered (worker thread). Here every request is a
        :class:`Query`, for :meth:`_batch_logprobs`; a backend whose
        :meth:`_sample` submits :class:`SampleRequest` to the batcher overrides this."""
        queries = [r for r in batch if isinstance(r, Query)]
        if len(queries) != len(batch):
            raise TypeError(f"{type(self).__name__} samples one next-token request at a time; it runs no SampleRequest")
        return self._batch_logprobs(queries)

    def _request_size(self, request: Request) -> int:
        """The size of ``request`` for the batcher's ``max_batch_tokens``: its tokens."""
        return len(request)

    def _load_adapter(self, adapter: Adapter, replaced: Adapter | None) -> None:
        """Make ``adapter`` usable by requests, after unloading ``replaced`` (the
        earlier registration of its name, if any)."""
        raise NotImplementedError(f"{type(self).__name__} does not support LoRA adapters")

    def _unload_adapter(self, adapter: Adapter) -> None:
        """Free ``adapter``'s weights and every cached result computed with it."""
        raise NotImplementedError(f"{type(self).__name__} does not support LoRA adapters")

    def clear_cache(self) -> None:
        """Drop every cached computation (no-op where nothing is cached)."""

    def _release(self) -> None:
        """Free the backend's resources (the batcher is already closed)."""

    # -- LoRA adapters ----------------------------------------------------------------
    def add_new_lora(self, lora_path: str, lora_name: str = "lora_1") -> None:
        """Load the LoRA adapter at ``lora_path`` (a folder saved by peft, or a hub
        id) under ``lora_name``; requests select it with ``lora_name=``.

        Loading under a name already registered replaces that adapter: requests
        still pending under the old weights fail with ValueError, and its cached
        results are dropped.
        """
        if not isinstance(lora_name, str) or not lora_name:
            raise TypeError(f"lora_name must be a non-empty str, not {lora_name!r}")
        if not isinstance(lora_path, (str, bytes)) and not hasattr(lora_path, "__fspath__"):
            raise TypeError(f"lora_path must be a path, not {type(lora_path).__name__}")
        with self._adapters_lock:
            replaced = self._adapters.pop(lora_name, None)
            adapter = Adapter(lora_name, str(lora_path), next(self._adapter_serials))
            self._load_adapter(adapter, replaced)
            self._adapters[lora_name] = adapter

    def remove_lora(self, lora_name: str) -> None:
        """Unload the adapter registered as ``lora_name`` and drop its cached results;
        requests still pending under it fail with ValueError."""
        with self._adapters_lock:
            adapter = self._adapters.pop(self._adapter_name(lora_name), None)
            if adapter is None:
                raise ValueError(_unknown_adapter(lora_name))
            self._unload_adapter(adapter)

    @property
    def loras(self) -> dict[str, str]:
        """The registered adapters: name -> path."""
        return {name: a.path for name, a in self._adapters.items()}

    @staticmethod
    def _adapter_name(lora_name: Any) -> str:
        if not isinstance(lora_name, str):
            raise TypeError(f"lora_name must be a str or None, not {type(lora_name).__name__}")
        return lora_name

    def _adapter(self, lora_name: str | None) -> Adapter | None:
        """The registered adapter ``lora_name`` (None: the base model), or ValueError."""
        if lora_name is None:
            return None
        adapter = self._adapters.get(self._adapter_name(lora_name))
        if adapter is None:
            raise ValueError(_unknown_adapter(lora_name))
        return adapter

    def _registered(self, adapter: Adapter | None) -> bool:
        """Whether ``adapter`` (None: the base model) is still registered."""
        return adapter is None or self._adapters.get(adapter.name) is adapter

    # -- requests ---------------------------------------------------------------------
    def _run_batch(self, batch: list[Request]) -> list[Any]:
        """The batcher's compute: the backend's batch function over the requests
        whose adapter is still registered; the others (removed or replaced after
        they were submitted) fail alone. Adapters are neither loaded nor removed
        while a batch runs (registration waits for it), so every adapter a
        backend's batch function meets is registered from its start to its end."""
        with self._adapters_lock:
            removed = [None if self._registered(r.adapter) else r.adapter for r in batch]
            if not any(removed):
                return self._batch(batch)
            results = iter(self._batch([r for r, gone in zip(batch, removed) if gone is None]))
            return [next(results) if gone is None else RequestFailed.adapter_removed(gone) for gone in removed]

    def _ids(self, token_ids: Any, name: str = "token_ids") -> TokenIds:
        return _as_ids(token_ids, self.vocab_size, name)

    def _query(self, token_ids: Any, lora_name: str | None, name: str = "token_ids") -> Query:
        return Query(self._ids(token_ids, name), self._adapter(lora_name))

    @staticmethod
    def _result(out: Any) -> Any:
        if isinstance(out, RequestFailed):
            raise out.error_type(out.message)
        return out

    async def next_token_logprobs(self, token_ids: Sequence[int], lora_name: str | None = None) -> torch.Tensor:
        """Log-probabilities of the next token after ``token_ids``: float32 ``(vocab_size,)``.

        ``lora_name`` selects a LoRA adapter registered with :meth:`add_new_lora`
        (None: the base model); an unknown name raises ValueError.
        Each caller gets its own tensor: changing it in place touches neither the
        cache nor the callers that asked for the same ids.
        """
        return self._result(await self._batcher.submit(self._query(token_ids, lora_name))).clone()

    def next_token_logprobs_sync(self, token_ids: Sequence[int], lora_name: str | None = None) -> torch.Tensor:
        """:meth:`next_token_logprobs` from synchronous code."""
        return self._result(self._batcher.submit_sync([self._query(token_ids, lora_name)])[0]).clone()

    def _queries(self, token_ids_list: Sequence[Sequence[int]], lora_name: str | None = None) -> list[Query]:
        if isinstance(token_ids_list, (str, bytes)) or not isinstance(token_ids_list, Sequence):
            raise TypeError(f"token_ids_list must be a sequence of sequences, not {type(token_ids_list).__name__}")
        if not token_ids_list:
            raise ValueError("token_ids_list must not be empty")
        adapter = self._adapter(lora_name)
        return [Query(self._ids(ids, f"token_ids_list[{i}]"), adapter) for i, ids in enumerate(token_ids_list)]

    async def batch_next_token_logprobs(
        self, token_ids_list: Sequence[Sequence[int]], lora_name: str | None = None
    ) -> torch.Tensor:
        """:meth:`next_token_logprobs` of each sequence: float32 ``(len(token_ids_list), vocab_size)``."""
        return torch.stack(
            [self._result(r) for r in await self._batcher.submit_many(self._queries(token_ids_list, lora_name))]
        )

    def batch_next_token_logprobs_sync(
        self, token_ids_list: Sequence[Sequence[int]], lora_name: str | None = None
    ) -> torch.Tensor:
        """:meth:`batch_next_token_logprobs` from synchronous code."""
        return torch.stack(
            [self._result(r) for r in self._batcher.submit_sync(self._queries(token_ids_list, lora_name))]
        )

    @property
    def batch_stats(self) -> BatchStats:
        """Counters of the batching engine (requests, shared requests, batches)."""
        return self._batcher.stats

    # -- sampling ---------------------------------------------------------------------
    async def sample(
        self,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        eos_token_ids: Sequence[int],
        temperature: float = 1.0,
        seed: int | None = None,
        lora_name: str | None = None,
    ) -> list[int]:
        """Sample up to ``max_tokens`` tokens after the prompt, stopping at (and
        leaving out) any of ``eos_token_ids``. The same seed gives the same tokens.
        ``lora_name`` selects a registered LoRA adapter (None: the base model)."""
        prompt = self._ids(prompt_token_ids, "prompt_token_ids")
        check_int("max_tokens", max_tokens, minimum=0)
        temperature = check_number("temperature", temperature, minimum=0, inclusive=False)
        if seed is not None:
            check_int("seed", seed)
        eos = self._ids(list(eos_token_ids), "eos_token_ids") if eos_token_ids else ()
        adapter = self._adapter(lora_name)
        return await self._sample(SampleRequest(prompt, max_tokens, eos, temperature, seed, adapter))

    async def _sample(self, request: SampleRequest) -> list[int]:
        """Run a validated sampling request: one next-token request per step."""
        generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
        prompt = list(request.prompt)
        generated: list[int] = []
        for _ in range(request.max_tokens):
            query = Query(tuple(prompt + generated), request.adapter)
            logprobs = self._result(await self._batcher.submit(query))
            probs = torch.softmax(logprobs.float().cpu() / request.temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator).item())
            if token in request.eos_token_ids:
                break
            generated.append(token)
        return generated

    async def batch_sample(
        self,
        prompt_token_ids_list: Sequence[Sequence[int]],
        max_tokens: int,
        eos_token_ids: Sequence[int],
        temperature: float = 1.0,
        seed: int | None = None,
        lora_name: str | None = None,
    ) -> list[list[int]]:
        """:meth:`sample` for each prompt, concurrently (so their steps batch together).
        With a seed, prompt ``i`` uses ``seed + i``."""
        prompts = [q.ids for q in self._queries(prompt_token_ids_list, lora_name)]
        results: list[list[int]] = [[] for _ in prompts]

        async def one(i: int) -> None:
            results[i] = await self.sample(
                prompts[i], max_tokens, eos_token_ids, temperature, None if seed is None else seed + i, lora_name
            )

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(one, i)
        return results

    # -- lifetime ---------------------------------------------------------------------
    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the worker and free the model's caches; the object is unusable afterwards.

        A running batch may finish for at most ``timeout`` seconds (``None``: no
        limit). If it is still running then, its callers fail with
        :class:`~genlm_anyio.batching.ClosedError`, a warning says so, and the
        caches stay until a later ``close()`` finds the batch finished.
        """
        if self._released:
            return
        if self._batcher.close(timeout):
            self._released = True
            self._release()
        else:
            warnings.warn(
                f"{type(self).__name__}.close(): a batch was still computing after {timeout} s; its callers "
                "got ClosedError, and its caches are freed by a later close() once it has finished",
                RuntimeWarning,
                stacklevel=2,
            )

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._batcher.closed
