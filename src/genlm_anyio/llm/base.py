"""genlm-backend's ``llm.base`` module: the :class:`AsyncLM` interface and :class:`MockAsyncLM`."""

from ..backends.base import AsyncLM
from ..backends.mock import MockAsyncLM

__all__ = ["AsyncLM", "MockAsyncLM"]
