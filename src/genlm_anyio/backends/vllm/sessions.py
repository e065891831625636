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

MAX_PASSED_OVER = 8
"""An idle session ends once this many batches in a row have not resumed it.

Particles that run at their own pace (each awaiting its own call, as in the
seed example) do not all fall into one batch: a particle's next request can
come a few batches after its last, and its session has to wait for it. A
session that long unresumed most likely belongs to a particle that resampling
removed; its blocks go back to the prefix cache."""


class Sessions:
    """The idle sessions, by the tokens (and adapter) they hold, the engine
    request that opened each live session, and how many batches in a row each
    idle session has waited."""

    def __init__(self) -> None:
        self.idle: dict[Query, str] = {}
        self._opened: dict[str, Any] = {}  # session -> the EngineCoreRequest that opened it
        self._passed: dict[str, int] = {}  # idle session -> batches in a row that did not resume it

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
            self._passed.pop(rid, None)

    def rest(self, query: Query, rid: str) -> None:
        """Session ``rid`` has just answered ``query`` and waits, idle, for its extension."""
        self.idle[query] = rid
        self._passed[rid] = 0

    def passed_over(self, unresumed: dict[Query, str], room: int) -> list[str]:
        """Count one more batch against the sessions a batch does not resume and
        take out of ``unresumed`` (returning their ids) those to end: the ones
        waited for :data:`MAX_PASSED_OVER` batches, then the longest-waiting ones
        beyond ``room`` (the engine's request slots the batch leaves free: an idle
        session holds one)."""
        for rid in unresumed.values():
            self._passed[rid] += 1
        by_wait = sorted(unresumed.items(), key=lambda item: -self._passed[item[1]])
        ending = [
            item
            for n, item in enumerate(by_wait)
            if self._passed[item[1]] >= MAX_PASSED_OVER or n < len(by_wait) - room
        ]
        for query, _ in ending:
            del unresumed[query]
        return [rid for _, rid in ending]

    def keep(self, waiting: dict[Query, str]) -> list[str]:
        """Put back the sessions a batch passed over (after :meth:`rest` for the
        batch's own), except one whose tokens a session of the batch now holds:
        the ids of those, to end."""
        dropped = [rid for query, rid in waiting.items() if query in self.idle]
        self.idle.update({query: rid for query, rid in waiting.items() if query not in self.idle})
        return dropped

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
