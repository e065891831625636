"""Streaming-input sessions: log-probability requests that stay in the engine.

After its one step, a log-probability request stays in the engine, idle, with
its KV blocks (vLLM's resumable requests). A later request that extends its
tokens resumes it with just the new tokens, so extending a sequence by one
token computes one token. vLLM's prefix cache alone only shares whole KV
blocks (128 tokens on CPU), so without sessions every step would recompute
each sequence's partial last block.
"""

from __future__ import annotations

from typing import Any

from ..base import Adapter, Query

TokenIds = tuple[int, ...]

MAX_RESUME_TOKENS = 64
"""A request resumes a session that holds all but at most this many of its tokens."""


class Sessions:
    """The idle sessions of the last batch, by the tokens (and adapter) they
    hold, and the engine request that opened each live session."""

    def __init__(self) -> None:
        self.idle: dict[Query, str] = {}
        self._opened: dict[str, Any] = {}  # session -> the EngineCoreRequest that opened it

    def __len__(self) -> int:
        return len(self.idle)

    def opened(self, rid: str, core_request: Any) -> None:
        """Record the request that opened session ``rid``."""
        self._opened[rid] = core_request

    def opening_request(self, rid: str) -> Any:
        """The ``EngineCoreRequest`` that opened session ``rid``."""
        return self._opened[rid]

    def take_idle(self) -> dict[Query, str]:
        """The idle sessions, which now belong to the caller (a batch that runs)."""
        idle, self.idle = self.idle, {}
        return idle

    def of_adapter(self, adapter: Adapter) -> list[str]:
        """Take out the idle sessions under ``adapter``, returning their ids."""
        rids = [rid for query, rid in self.idle.items() if query.adapter is adapter]
        self.idle = {q: rid for q, rid in self.idle.items() if q.adapter is not adapter}
        return rids

    def ended(self, rids: list[str]) -> None:
        """Forget sessions the engine no longer holds."""
        for rid in rids:
            self._opened.pop(rid, None)

    @staticmethod
    def claim(query: Query, idle: dict[Query, str]) -> tuple[str, TokenIds] | None:
        """The idle session (under the same adapter) whose tokens ``query`` extends
        the least (taken out of ``idle``), with the tokens ``query`` adds to it."""
        ids = query.ids
        for extra in range(1, min(len(ids), MAX_RESUME_TOKENS + 1)):
            rid = idle.pop(Query(ids[:-extra], query.adapter), None)
            if rid is not None:
                return rid, ids[-extra:]
        return None
