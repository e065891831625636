"""genlm-backend's ``llm`` package: the language models and ``load_model_by_name``.

The implementations are in :mod:`genlm_anyio.backends`; this path exists so that
code written for ``genlm.backend.llm`` ports by changing the import.
"""

from ..backends import AsyncLM, AsyncMlxLM, AsyncTransformer, AsyncVirtualLM, MockAsyncLM
from ..backends.missing import AsyncSGLTransformer
from ..loading import load_model_by_name

__all__ = [
    "AsyncLM",
    "AsyncMlxLM",
    "AsyncSGLTransformer",
    "AsyncTransformer",
    "AsyncVirtualLM",
    "MockAsyncLM",
    "load_model_by_name",
]
