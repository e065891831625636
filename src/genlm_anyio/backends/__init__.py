"""Language-model backends: each is an :class:`AsyncLM`."""

from .base import AsyncLM
from .hf import AsyncTransformer
from .mlx import AsyncMlxLM
from .mock import MockAsyncLM
from .replicas import ReplicatedLM
from .vllm import AsyncVirtualLM

__all__ = ["AsyncLM", "AsyncMlxLM", "AsyncTransformer", "AsyncVirtualLM", "MockAsyncLM", "ReplicatedLM"]
