"""Calls to methods of an engine core in another process (vLLM's utility calls).

vLLM's ``MPClient`` sends a utility call as one message on the engine's input
socket, in order with the requests sent around it, and its output thread
resolves the call's future when the engine core's reply comes back.
"""

from __future__ import annotations

import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any


def in_other_process(core: Any) -> bool:
    """Whether ``core`` (an ``LLMEngine``'s engine core client) talks to an engine
    core in another process."""
    return hasattr(core, "utility_results")


def send(core: Any, method: str, args: tuple[Any, ...]) -> Future[Any]:
    """Call ``method(*args)`` of the engine core behind ``core`` (an ``MPClient``)
    without waiting: the future of its reply."""
    from vllm.v1.engine import EngineCoreRequestType

    future: Future[Any] = Future()
    call_id = uuid.uuid4().int >> 64
    core.utility_results[call_id] = future
    core._send_input(EngineCoreRequestType.UTILITY, (0, call_id, method, args))
    return future


def call(core: Any, method: str, args: tuple[Any, ...]) -> Any:
    """Call ``method(*args)`` of the engine core behind ``core`` and wait for the
    reply, in slices: vLLM's own wait never ends once the engine process has died."""
    future = send(core, method, args)
    while True:
        try:
            return future.result(timeout=0.5)
        except FutureTimeout:
            core.ensure_alive()  # EngineDeadError once the engine process is gone
