"""Language-model backends: each is an :class:`AsyncLM`.

The names below load on first use (PEP 562), so that importing one backend's
module imports neither the others nor :mod:`genlm_anyio.loading`, which imports
them all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .base import AsyncLM as AsyncLM
    from .hf import AsyncTransformer as AsyncTransformer
    from .mlx import AsyncMlxLM as AsyncMlxLM
    from .mock import MockAsyncLM as MockAsyncLM
    from .replicas import ReplicatedLM as ReplicatedLM
    from .vllm import AsyncVirtualLM as AsyncVirtualLM

# Public name -> the module that defines it.
_EXPORTS = {
    "AsyncLM": ".base",
    "AsyncMlxLM": ".mlx",
    "AsyncTransformer": ".hf",
    "AsyncVirtualLM": ".vllm",
    "MockAsyncLM": ".mock",
    "ReplicatedLM": ".replicas",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
