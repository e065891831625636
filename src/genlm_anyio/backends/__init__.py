"""Language-model backends: each is an :class:`AsyncLM`."""
from .base import AsyncLM
from .hf import AsyncTransformer
from .mock import MockAsyncLM

__all__ = ["AsyncLM", "AsyncTransformer", "MockAsyncLM"]
