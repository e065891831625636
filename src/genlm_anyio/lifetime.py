"""The lifetime protocol shared by every genlm-anyio object that owns a worker thread."""

from __future__ import annotations

import abc
from typing import TypeVar

import anyio

_Self = TypeVar("_Self", bound="Closeable")


class Closeable(abc.ABC):
    """``close()`` / ``await aclose()``, ``with`` and ``async with``.

    Models (:class:`~genlm_anyio.AsyncLM` and its backends) and the async trie
    share it: ``close(timeout)`` stops the object's worker, fails the requests
    still waiting with :class:`~genlm_anyio.batching.ClosedError` and frees what
    the object holds; later requests raise ``ClosedError``. Closing twice is a
    no-op. ``aclose`` does the same without blocking the event loop, and leaving
    a ``with`` / ``async with`` block closes the object.
    """

    @abc.abstractmethod
    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the worker and free the object's resources; a running batch may
        finish for at most ``timeout`` seconds (``None``: no limit)."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""

    async def aclose(self, timeout: float | None = 60.0) -> None:  # noqa: ASYNC109 - close()'s own timeout
        """:meth:`close`, in a worker thread, so the event loop keeps running meanwhile."""
        await anyio.to_thread.run_sync(self.close, timeout)

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self: _Self) -> _Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
