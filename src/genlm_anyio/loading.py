"""Loading a model by name, with the backend picked for the machine."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from .backends import AsyncLM, AsyncMlxLM, AsyncTransformer, AsyncVirtualLM, MockAsyncLM
from .backends.unavailable import AsyncSGLTransformer

BACKENDS = ("hf", "vllm", "mock", "mlx", "sgl")


def default_backend() -> str:
    """``"vllm"`` where CUDA and vLLM are both available, else ``"hf"``."""
    if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "hf"


def load_model_by_name(name: str, backend: str | None = None, llm_opts: dict[str, Any] | None = None) -> AsyncLM:
    """Load ``name`` (a hub id, a local model folder, or a ``.gguf`` file) as an :class:`AsyncLM`.

    ``backend`` is ``"hf"`` (transformers), ``"vllm"``, ``"mlx"`` (mlx-lm) or
    ``"mock"``; by default vLLM when CUDA and vLLM are available, else
    transformers. ``"sgl"`` (SGLang) raises NotImplementedError for now; any
    other name raises ValueError. ``llm_opts`` go to the backend's ``from_name``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, not {name!r}")
    backend = backend or default_backend()
    opts = dict(llm_opts or {})
    if backend == "hf":
        return AsyncTransformer.from_name(name, **opts)
    if backend == "mock":
        return MockAsyncLM.from_name(name, **opts)
    if backend == "vllm":
        return AsyncVirtualLM.from_name(name, **opts)
    if backend == "mlx":
        return AsyncMlxLM.from_name(name, **opts)
    if backend == "sgl":
        return AsyncSGLTransformer.from_name(name, **opts)
    raise ValueError(f"Invalid backend: {backend!r}; the backends are {', '.join(BACKENDS)}")
