"""vLLM's log lines that genlm-anyio's own use of the engine would repeat at every step.

genlm-anyio holds a multiprocess engine's scheduler while each batch's
requests go in (``engine.VLLMEngine._held_scheduler``), and vLLM's scheduler
logs every change of its pause state at INFO: two lines per forward pass. The
filter here drops exactly those lines; every other vLLM line stays.
"""

from __future__ import annotations

import logging

SCHEDULER_LOGGER = "vllm.v1.core.sched.scheduler"
"""The logger of vLLM's scheduler module (``vllm/v1/core/sched/scheduler.py``)."""
PAUSE_LINE = "setting pause state to %s"
"""The format of the line ``Scheduler.set_pause_state`` logs."""


class _DropPauseLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != PAUSE_LINE


def quiet_scheduler_pauses() -> None:
    """Drop the scheduler's pause-state lines in this process (once, however often called)."""
    logger = logging.getLogger(SCHEDULER_LOGGER)
    if not any(isinstance(f, _DropPauseLines) for f in logger.filters):
        logger.addFilter(_DropPauseLines())
