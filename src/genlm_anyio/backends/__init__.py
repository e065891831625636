"""Language-model backends: each is an :class:`AsyncLM`."""

from .base import AsyncLM
from .hf import AsyncTransformer
from .mock import MockAsyncLM
from .vllm import AsyncVirtualLM

__all__ = ["AsyncLM", "AsyncTransformer", "AsyncVirtualLM", "MockAsyncLM"]
