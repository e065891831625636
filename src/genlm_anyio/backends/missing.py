"""genlm-backend's SGLang model class, which genlm-anyio does not have yet.

The name exists so that code importing it (as genlm-control does, lazily) keeps
importing; making a model raises NotImplementedError that says so, as
genlm-backend's own stand-ins do where their engine is not installed.
"""

from __future__ import annotations

from typing import Any, NoReturn


class _MissingBackend:
    engine = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._refuse()

    @classmethod
    def from_name(cls, *args: Any, **kwargs: Any) -> NoReturn:
        """Refuse: genlm-anyio has no backend for this engine yet."""
        cls._refuse()

    @classmethod
    def _refuse(cls) -> NoReturn:
        raise NotImplementedError(
            f"{cls.__name__} ({cls.engine}) is not available in genlm-anyio yet; "
            "use AsyncTransformer (backend='hf'), AsyncVirtualLM (backend='vllm') or AsyncMlxLM (backend='mlx')"
        )


class AsyncSGLTransformer(_MissingBackend):
    """genlm-backend's SGLang model: not in genlm-anyio yet."""

    engine = "SGLang"
