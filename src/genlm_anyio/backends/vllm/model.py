"""The vLLM backend: the same API as the transformers backend, on vLLM's engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..base import Adapter, AsyncLM, SampleRequest, TokenIds
from .engine import Request, VLLMEngine


class AsyncVirtualLM(AsyncLM):
    """A vLLM engine behind the genlm API, with autobatching.

    Concurrent requests (log-probabilities and sampling runs alike) go to the
    engine together, as one scheduling round of its continuous batching. A
    request that extends an earlier one by a few tokens resumes it in the engine
    and computes only those tokens; vLLM's prefix cache (on by default) shares
    whole KV blocks between the others. Every log-probability vector covers the
    whole vocabulary, in float32, computed from the raw logits.
    ``sample``/``batch_sample`` use vLLM's own decode loop. ``engine.stats``
    counts what the engine computed. LoRA adapters (:meth:`add_new_lora`, on an
    engine started with ``enable_lora``) go with each request as vLLM's
    ``LoRARequest``; requests under different adapters batch together and never
    share a session.

    Args:
        engine: a :class:`~genlm_anyio.backends.vllm.engine.VLLMEngine`, or a
            vLLM ``LLMEngine`` built with ``max_logprobs=-1`` and
            ``logprobs_mode="raw_logprobs"`` (and, for log-probabilities without
            vLLM's sort over the vocabulary, ``logits_processors`` holding
            :class:`~genlm_anyio.backends.vllm.capture.FullLogprobs`, or
            :class:`~genlm_anyio.backends.vllm.capture.FullLogprobsV2` on vLLM's
            V2 model runner, and where the workers run in other processes,
            ``worker_extension_cls`` set to ``capture.EXTENSION``;
            ``from_name`` adds both).
        max_batch_size: most requests handed to the engine at once; at most the
            engine's request slots (``max_num_seqs``), since each request of a
            batch holds one until the batch ends.
        max_batch_tokens: most prompt tokens handed to the engine at once.
    """

    def __init__(self, engine: Any, *, max_batch_size: int = 256, max_batch_tokens: int | None = None):
        self.engine = engine if isinstance(engine, VLLMEngine) else VLLMEngine(engine)
        super().__init__(
            self.engine.get_tokenizer(),
            self.engine.vocab_size,
            max_batch_size=min(max_batch_size, self.engine.max_requests),
            max_batch_tokens=max_batch_tokens,
        )

    @classmethod
    def from_name(
        cls,
        model_name: str,
        engine_opts: dict[str, Any] | None = None,
        *,
        multiprocess: bool | None = None,
        **opts: Any,
    ) -> AsyncVirtualLM:
        """Start a vLLM engine for ``model_name`` (a hub id or a local folder).

        ``engine_opts`` are ``vllm.EngineArgs`` fields (``tensor_parallel_size``,
        ``dtype``, ``gpu_memory_utilization``, ``max_model_len``, ``enable_lora``,
        ``max_lora_rank``, ...); prefix caching is on unless they turn it off.
        ``multiprocess`` runs vLLM's engine core in a process of its own (True)
        or in this one (False); by default, ``VLLM_ENABLE_V1_MULTIPROCESSING``
        where it is set, else this process for an engine with one worker (its
        log-probability rows then never leave this process) and a process of
        its own for several. ``opts`` go to the constructor.
        """
        if engine_opts is not None and not isinstance(engine_opts, dict):
            raise TypeError(f"engine_opts must be a dict or None, not {type(engine_opts).__name__}")
        if multiprocess is not None and not isinstance(multiprocess, bool):
            raise TypeError(f"multiprocess must be a bool or None, not {type(multiprocess).__name__}")
        return cls(VLLMEngine.from_options(model_name, dict(engine_opts or {}), multiprocess=multiprocess), **opts)

    def _ids(self, token_ids: Any, name: str = "token_ids") -> TokenIds:
        ids = super()._ids(token_ids, name)
        if len(ids) >= self.engine.max_model_len:
            raise ValueError(
                f"{name} holds {len(ids)} tokens; the engine's max_model_len ({self.engine.max_model_len}) "
                "leaves room for fewer"
            )
        return ids

    @property
    def underlying_model(self) -> Any:
        """The engine's torch model, for advanced use (in-process engines only; RuntimeError otherwise)."""
        return self.engine.model()

    def _batch(self, batch: Sequence[Request]) -> list[Any]:
        # Log-probability requests and sampling runs go to the engine together.
        return self.engine.run(batch)

    _batch_logprobs = _batch

    def _load_adapter(self, adapter: Adapter, replaced: Adapter | None) -> None:
        if replaced is not None:
            self.engine.remove_lora(replaced)
        self.engine.add_lora(adapter)

    def _unload_adapter(self, adapter: Adapter) -> None:
        self.engine.remove_lora(adapter)

    async def _sample(self, request: SampleRequest) -> list[int]:
        if len(request) > self.engine.max_model_len:
            raise ValueError(
                f"prompt ({len(request.prompt)} tokens) plus max_tokens ({request.max_tokens}) "
                f"exceeds the engine's max_model_len ({self.engine.max_model_len})"
            )
        return list(self._result(await self._batcher.submit(request)))

    def clear_cache(self) -> None:
        """Drop vLLM's prefix cache."""
        self.engine.reset_prefix_cache()

    def _release(self) -> None:
        self.engine.shutdown()
