"""genlm-backend's leftovers, on thin subclasses of genlm-anyio's classes.

genlm-backend 0.3.1 has names that mean nothing in genlm-anyio but that its
clients pass or call: the batching timer's ``timeout``, MLX's ``cache_opts``,
``set_lora``/``clear_lora`` (which 0.3.1 already made errors),
``reset_async_queries()``, and the trie's ``shutdown()``/``cleanup()``/``_task``.
genlm-anyio's own classes carry none of them. With the switch on (see
:mod:`genlm_anyio.compat`), each ``genlm.backend`` name of a class below gives
this module's subclass, and ``load_model_by_name`` builds them, so programs
written for genlm-backend find every name they use; everything else is the
genlm-anyio class's, unchanged.
"""

from __future__ import annotations

from typing import Any, cast

import anyio

from ..backends import base, hf, mlx, mock
from ..backends.vllm import model as vllm_model
from ..checks import check_number
from ..loading import LOADERS, load_with
from ..trie import async_trie

__all__ = [
    "AsyncLM",
    "AsyncMlxLM",
    "AsyncTokenCharacterTrie",
    "AsyncTransformer",
    "AsyncVirtualLM",
    "MockAsyncLM",
    "load_model_by_name",
]


class AsyncLM(base.AsyncLM):
    """:class:`genlm_anyio.AsyncLM` with genlm-backend's ``set_lora``/``clear_lora``."""

    def set_lora(self, lora_path: str | None = None, lora_name: str = "lora_1") -> None:
        """Not supported, as in genlm-backend 0.3.1: adapters are chosen per request."""
        raise RuntimeError(
            "set_lora() is gone (genlm-backend 0.3.1 removed it too): there is no active adapter to set. "
            "Register the adapter once with add_new_lora(path, name) and pass lora_name=name to each request."
        )

    def clear_lora(self) -> None:
        """Not supported, as in genlm-backend 0.3.1: ``lora_name=None`` is the base model."""
        raise RuntimeError(
            "clear_lora() is gone (genlm-backend 0.3.1 removed it too): "
            "a request without lora_name (lora_name=None) runs on the base model."
        )

    def reset_async_queries(self) -> None:
        """genlm-backend's "clear any pending queries" after an interrupted inference:
        nothing to do, since a cancelled caller's request is already dropped (and one
        still wanted by another caller runs for that caller)."""


def _timeout(value: Any) -> float:
    """genlm-backend's batching timer, kept as ``timeout``: genlm-anyio has no timer."""
    return check_number("timeout", value, minimum=0)


class AsyncTransformer(hf.AsyncTransformer, AsyncLM):
    """:class:`genlm_anyio.AsyncTransformer` taking genlm-backend's positional
    ``(hf_model, hf_tokenizer, batch_size, timeout)``; ``timeout`` is kept as
    ``self.timeout`` and changes nothing."""

    def __init__(self, hf_model: Any, hf_tokenizer: Any, batch_size: int = 128, timeout: float = 0.02, **kwargs: Any):
        self.timeout = _timeout(timeout)
        super().__init__(hf_model, hf_tokenizer, batch_size, **kwargs)


class AsyncMlxLM(mlx.AsyncMlxLM, AsyncLM):
    """:class:`genlm_anyio.AsyncMlxLM` taking genlm-backend's positional
    ``(mlx_lm_model, tokenizer, timeout, prefill_step_size, cache_size, cache_opts)``;
    ``timeout`` is kept as ``self.timeout``, and ``cache_opts`` accepts
    ``move_to_cpu``, which changes nothing (results are in host memory)."""

    def __init__(
        self,
        mlx_lm_model: Any,
        tokenizer: Any,
        timeout: float = 0.0,
        prefill_step_size: int = 2048,
        cache_size: int = 256,
        cache_opts: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.timeout = _timeout(timeout)
        unknown = set(cache_opts or {}) - {"move_to_cpu"}
        if unknown:
            raise ValueError(f"cache_opts has unknown option(s) {sorted(unknown)}; only move_to_cpu is accepted")
        super().__init__(mlx_lm_model, tokenizer, prefill_step_size, cache_size, **kwargs)


class AsyncVirtualLM(vllm_model.AsyncVirtualLM, AsyncLM):
    """:class:`genlm_anyio.AsyncVirtualLM` with genlm-backend's leftovers."""


class MockAsyncLM(mock.MockAsyncLM, AsyncLM):
    """:class:`genlm_anyio.MockAsyncLM` with genlm-backend's leftovers."""


class AsyncTokenCharacterTrie(async_trie.AsyncTokenCharacterTrie):
    """:class:`genlm_anyio.trie.AsyncTokenCharacterTrie` with genlm-backend's
    ``shutdown()``/``cleanup()``, which stop the worker without closing the trie (a
    later request starts a new worker), and ``_task``, the running worker or None."""

    @property
    def _task(self) -> Any:
        return self._batcher

    def shutdown(self) -> None:
        """Stop the worker; requests still pending fail. A later request starts a new one."""
        self._stop_worker(None)

    async def cleanup(self) -> None:
        """:meth:`shutdown`, without blocking the event loop."""
        await anyio.to_thread.run_sync(self.shutdown)


_LOADERS = {
    **LOADERS,
    "hf": AsyncTransformer.from_name,
    "vllm": AsyncVirtualLM.from_name,
    "mlx": AsyncMlxLM.from_name,
    "mock": MockAsyncLM.from_name,
}


def load_model_by_name(name: str, backend: str | None = None, llm_opts: dict[str, Any] | None = None) -> AsyncLM:
    """:func:`genlm_anyio.load_model_by_name`, building this module's classes."""
    return cast(AsyncLM, load_with(_LOADERS, name, backend, llm_opts))  # every loader here builds one
