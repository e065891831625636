"""Where a log-probability request's row comes from, per engine configuration.

Three sources, one interface (:class:`RowSource`), chosen once per engine by
:func:`row_source`:

- :class:`CapturedRows`: the engine's worker runs in this process; rows are
  read from genlm-anyio's logits processor (``capture``), nothing crosses a process;
- :class:`WorkerRows`: the workers run elsewhere (the multiprocess engine,
  tensor or pipeline parallelism) and carry ``capture.RowsExtension``; a step's
  rows come back in one ``collective_rpc`` call, float32 values in id order;
- :class:`RankedRows`: neither (an engine built without genlm-anyio's
  processor or extension, speculative decoding); requests ask for
  ``logprobs=-1`` and each row is put back in id order from vLLM's ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from . import utility
from .capture import EXTENSION, TAKE_ROWS, Capture, find_capture, processor_for

MISSING = "vLLM sampled a log-probability request without running genlm-anyio's logits processor"


class RowSource(Protocol):
    """How an engine gets the rows of the log-probability requests of a step."""

    marks: bool
    """Whether requests are marked for genlm-anyio's logits processor (and ask vLLM
    for no logprobs); otherwise they ask for ``logprobs=-1``."""

    def take(self, outputs: Sequence[Any], last: bool) -> list[torch.Tensor]:
        """The rows of ``outputs`` (engine outputs of one step that sampled their
        token); ``last``: no request of the batch is left in flight, so rows kept
        for anything else may go."""
        ...

    def discard(self) -> None:
        """Forget rows kept for requests of a batch that failed."""
        ...


class CapturedRows:
    """Rows from the logits processor of the in-process engine's one worker."""

    marks = True

    def __init__(self, capture: Capture):
        self.capture = capture

    def take(self, outputs: Sequence[Any], last: bool) -> list[torch.Tensor]:
        rows = [self.capture.rows.pop(output.request_id) for output in outputs]
        if last:
            self.capture.rows.clear()
        if any(row is None for row in rows):
            raise RuntimeError(MISSING)
        return rows  # type: ignore[return-value]  # no None left

    def discard(self) -> None:
        self.capture.rows.clear()


def _collective_rpc(core: Any, method: str, args: tuple[Any, ...]) -> list[Any]:
    """``core.collective_rpc(method, args=args)``: the workers' replies (through an
    engine process, as vLLM's ``call_utility`` sends it, see :mod:`.utility`)."""
    if not utility.in_other_process(core):
        return core.collective_rpc(method, None, args, None)
    return utility.call(core, "collective_rpc", (method, None, args, None))


class WorkerRows:
    """Rows from workers in other processes, through ``capture.RowsExtension``:
    one call per step, ``4 * vocab_size`` bytes per row."""

    marks = True

    def __init__(self, core: Any, vocab_size: int):
        self._core = core
        self.vocab_size = vocab_size
        self.bytes_received = 0
        """Row bytes received from the workers so far."""

    def take(self, outputs: Sequence[Any], last: bool) -> list[torch.Tensor]:
        ids = [output.request_id for output in outputs]
        replies = _collective_rpc(self._core, TAKE_ROWS, (ids, last))
        answers = [reply for reply in replies if reply is not None]
        if len(answers) > 1:  # every row would have crossed a process several times
            raise RuntimeError(f"{len(answers)} of vLLM's workers sent the same rows; one should")
        if not answers or len(answers[0]) != 4 * self.vocab_size * len(ids):
            raise RuntimeError(MISSING)
        data = answers[0]
        self.bytes_received += len(data)
        # A copy: the received buffer is read-only, and callers may write to their rows.
        return list(torch.from_numpy(np.frombuffer(data, np.float32).reshape(len(ids), self.vocab_size).copy()))

    def discard(self) -> None:
        # The next batch's last take drops them: a call here could fail as the batch did.
        pass


class RankedRows:
    """Rows from vLLM's ``logprobs=-1``: the sampled token, then all V tokens by
    rank, put back in id order."""

    marks = False

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def take(self, outputs: Sequence[Any], last: bool) -> list[torch.Tensor]:
        return [self._row(output.new_logprobs) for output in outputs]

    def _row(self, lists: Any) -> torch.Tensor:
        ids, values = lists.logprob_token_ids[0, 1:], lists.logprobs[0, 1:]
        if len(ids) != self.vocab_size:
            raise RuntimeError(f"vLLM returned {len(ids)} log-probabilities, not {self.vocab_size}")
        out = np.empty(self.vocab_size, dtype=np.float32)
        out[ids] = values
        return torch.from_numpy(out)

    def discard(self) -> None:
        pass


def row_source(engine: Any, vocab_size: int) -> RowSource:
    """The row source of ``engine`` (a vLLM ``LLMEngine``), by where its workers run
    and what it was built with."""
    core = engine.engine_core
    capture = find_capture(core)
    if capture is not None:
        return CapturedRows(capture)
    config = engine.vllm_config
    processor = processor_for(config)
    if (
        processor is not None
        and processor in (config.model_config.logits_processors or ())
        and config.parallel_config.worker_extension_cls == EXTENSION
    ):
        return WorkerRows(core, vocab_size)
    return RankedRows(vocab_size)
