"""Loading a model by name, with the backend picked for the machine: the one place
that maps a backend's name to its class."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any, Callable

import torch

from .backends.base import AsyncLM
from .backends.hf import AsyncTransformer
from .backends.missing import AsyncSGLTransformer
from .backends.mlx import AsyncMlxLM
from .backends.mock import MockAsyncLM
from .backends.vllm import AsyncVirtualLM
from .backends.vllm.replicas import start_replicas

Loaders = Mapping[str, Callable[..., AsyncLM]]
"""Each backend's name -> the ``from_name`` of the class it loads."""

LOADERS: Loaders = {
    "hf": AsyncTransformer.from_name,
    "vllm": AsyncVirtualLM.from_name,
    "mock": MockAsyncLM.from_name,
    "mlx": AsyncMlxLM.from_name,
    "sgl": AsyncSGLTransformer.from_name,
}
BACKENDS = tuple(LOADERS)


def default_backend() -> str:
    """``"vllm"`` where CUDA and vLLM are both available, else ``"hf"``."""
    if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "hf"


def _loader(loaders: Loaders, backend: str) -> Callable[..., AsyncLM]:
    loader = loaders.get(backend) if isinstance(backend, str) else None
    if loader is None:
        raise ValueError(f"Invalid backend: {backend!r}; the backends are {', '.join(loaders)}")
    return loader


def load_model_by_name(name: str, backend: str | None = None, llm_opts: dict[str, Any] | None = None) -> AsyncLM:
    """Load ``name`` (a hub id, a local model folder, or a ``.gguf`` file) as an :class:`AsyncLM`.

    ``backend`` is ``"hf"`` (transformers), ``"vllm"``, ``"mlx"`` (mlx-lm) or
    ``"mock"``; by default vLLM when CUDA and vLLM are available, else
    transformers. ``"sgl"`` (SGLang) raises NotImplementedError for now; any
    other name raises ValueError. ``llm_opts`` go to the backend's ``from_name``.
    """
    return load_with(LOADERS, name, backend, llm_opts)


def load_with(loaders: Loaders, name: str, backend: str | None, llm_opts: dict[str, Any] | None) -> AsyncLM:
    """:func:`load_model_by_name` through ``loaders`` (genlm_anyio.compat loads its
    own subclasses)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, not {name!r}")
    load = _loader(loaders, backend or default_backend())
    return load(name, **dict(llm_opts or {}))


def load_replicas(name: str, count: int, backend: str, replica_opts: dict[str, Any]) -> list[AsyncLM]:
    """``count`` models of ``name`` on ``backend``, for
    :meth:`~genlm_anyio.ReplicatedLM.from_name`: vLLM multiprocess engines, each on
    its own share of this process's cores (see
    :func:`~genlm_anyio.backends.vllm.replicas.start_replicas`), or models loaded
    here by :func:`load_model_by_name` with ``replica_opts`` as their ``llm_opts``.
    On a failure, the models loaded so far are closed."""
    if backend == "vllm":
        return list(start_replicas(name, count, replica_opts))
    load = _loader(LOADERS, backend)
    started: list[AsyncLM] = []
    try:
        for _ in range(count):
            started.append(load(name, **replica_opts))
    except BaseException:
        for lm in started:
            lm.close()
        raise
    return started
