"""Full-vocabulary log-probabilities from inside vLLM's sampler, without its sort.

vLLM returns ``logprobs=-1`` (all V log-probabilities) through the sampler's
``topk`` over the vocabulary, a full sort of every row (on CPU about 2.3 ms per
request for V = 49,152, as much as the model's forward pass per token). The
logits processors here instead keep the ``log_softmax`` of the raw logits of
the requests marked for them, in token-id order, and leave the logits
unchanged. Marked requests ask for no logprobs at all, so the sampler skips
its own. vLLM has two logits-processor interfaces: :class:`FullLogprobs` for
its V1 model runner (CPUs, and GPUs without Triton) and
:class:`FullLogprobsV2` for its V2 model runner (GPUs with Triton);
:func:`install` adds the one the engine's runner takes.

Each step's kept rows are copied to the host once, as one tensor (on a GPU into
pinned memory, without blocking the sampler; the reader waits for that copy
only): callers get CPU tensors from every backend, and one copy per step costs
one transfer where a copy per row would cost one device sync per row.

The processors run inside the engine's workers. Where the worker runs in this
process (the in-process engine core with one worker), :func:`find_capture`
finds its rows. Elsewhere (the multiprocess engine, tensor or pipeline
parallelism) :class:`RowsExtension`, mixed into every worker by vLLM's
``worker_extension_cls``, hands a step's rows over through the engine's
``collective_rpc``, as one buffer of float32 values in id order (no ids, no sort).

This module imports vLLM: import it only once vLLM is known to be installed.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as LogitsProcessorV2

from .logs import quiet_scheduler_pauses

# An engine process imports this module (its configuration names the processor),
# and that process runs the scheduler whose pause lines the engine's batches repeat.
quiet_scheduler_pauses()

KEY = "genlm_anyio.full_logprobs"
"""The ``SamplingParams.extra_args`` entry that marks a request: its value is the
engine request id under which its row is kept."""


def _marked_id(params: SamplingParams | None) -> str | None:
    return None if params is None else (params.extra_args or {}).get(KEY)


def _validate(params: SamplingParams) -> None:
    key = _marked_id(params)
    if key is not None and not isinstance(key, str):
        raise ValueError(f"extra_args[{KEY!r}] must be a request id (str), not {type(key).__name__}")


class Rows:
    """The kept rows by engine request id; a later step's row for a request
    replaces an earlier one (a prompt chunk before the last is thrown away)."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[torch.Tensor, Any]] = {}  # request id -> (host row, copy event or None)
        self.steps = 0
        """Steps that kept rows (each one host copy)."""

    def keep(self, request_ids: list[str], values: torch.Tensor) -> None:
        """Keep ``values[i]`` as the row of ``request_ids[i]``, copied to the host at once."""
        event = None
        if values.device.type != "cpu":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        self.steps += 1
        for rid, row in zip(request_ids, values):
            self._rows[rid] = (row, event)

    def pop(self, request_id: str) -> torch.Tensor | None:
        """The row kept for ``request_id`` (None if none), on the host, forgotten here."""
        kept = self._rows.pop(request_id, None)
        if kept is None:
            return None
        row, event = kept
        if event is not None:
            event.synchronize()
        return row

    def clear(self) -> None:
        self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)


def _log_softmax(logits: torch.Tensor, index: list[int]) -> torch.Tensor:
    # The sampler's own formula for raw_logprobs, on the marked rows only.
    return logits[index].log_softmax(dim=-1, dtype=torch.float32)


class FullLogprobs(LogitsProcessor):
    """Keeps the raw log-probability rows of the marked requests of each step
    (vLLM's V1 model runner). ``rows`` holds them by engine request id."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self._marked: dict[int, str] = {}  # batch index -> request id
        self.rows = Rows()

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        _validate(sampling_params)

    def is_argmax_invariant(self) -> bool:
        # False: vLLM then runs it for greedy requests too (it changes nothing).
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._marked, batch_update, lambda params, _prompt, _output: _marked_id(params))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self._marked:
            index = list(self._marked)
            self.rows.keep([self._marked[i] for i in index], _log_softmax(logits, index))
        return logits


class FullLogprobsV2(LogitsProcessorV2):
    """Keeps the raw log-probability rows of the marked requests of each step
    (vLLM's V2 model runner, whose state is per request slot). ``rows`` holds
    them by engine request id."""

    def __init__(self, vllm_config: Any, req_states: Any):
        self._marked: dict[int, str] = {}  # request slot -> request id
        self.rows = Rows()

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        _validate(sampling_params)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        # A slot is reused without notice: an unmarked request clears it.
        rid = _marked_id(sampling_params)
        if rid is None:
            self._marked.pop(req_idx, None)
            return False
        self._marked[req_idx] = rid
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        # One logits row per request (no speculative decoding: see install), in the
        # order of ctx.idx_mapping_np, the host copy of each row's slot.
        slots = ctx.idx_mapping_np.tolist()
        index = [row for row, slot in enumerate(slots) if slot in self._marked]
        if index:
            self.rows.keep([self._marked[slots[row]] for row in index], _log_softmax(logits, index))
        return logits


Capture = Union[FullLogprobs, FullLogprobsV2]


def processor_for(vllm_config: Any) -> type[FullLogprobs] | type[FullLogprobsV2] | None:
    """The processor class an engine configuration's model runner takes: the V2
    one where vLLM runs its V2 model runner (GPUs with Triton), the V1 one
    elsewhere, none under speculative decoding (a request owns several logits
    rows per step there)."""
    if vllm_config.speculative_config is not None:
        return None
    return FullLogprobsV2 if vllm_config.use_v2_model_runner else FullLogprobs


def install(vllm_config: Any) -> None:
    """Add :func:`processor_for`'s processor to an engine configuration's logits
    processors (none where it gives none: the engine then uses ``logprobs=-1``)."""
    processor = processor_for(vllm_config)
    if processor is not None:
        model = vllm_config.model_config
        model.logits_processors = [*(model.logits_processors or ()), processor]


def capture_of(runner: Any) -> Capture | None:
    """The capturing processor of a worker's model runner (V1 or V2), or None."""
    input_batch = getattr(runner, "input_batch", None)  # the V1 runner's
    v1 = getattr(getattr(input_batch, "logitsprocs", None), "all", ())
    v2 = getattr(getattr(runner, "sampler", None), "logits_processors", ())
    return next((p for p in (*v1, *v2) if isinstance(p, (FullLogprobs, FullLogprobsV2))), None)


def find_capture(core: Any) -> Capture | None:
    """The capturing processor of an in-process engine core's one worker, or
    None (workers in other processes, or an engine built without it)."""
    try:
        runner = core.engine_core.model_executor.driver_worker.worker.model_runner
    except AttributeError:
        return None
    return capture_of(runner)


EXTENSION = "genlm_anyio.backends.vllm.capture.RowsExtension"
""":class:`RowsExtension`'s name, as vLLM's ``worker_extension_cls`` takes it."""

TAKE_ROWS = "genlm_anyio_take_rows"
"""The method of :class:`RowsExtension` that the engine calls through ``collective_rpc``."""


class RowsExtension:
    """Mixed into each of an engine's workers (vLLM's ``worker_extension_cls``):
    the captured rows leave the worker's process as one buffer per step."""

    model_runner: Any  # the worker's, set by vLLM's Worker

    def genlm_anyio_take_rows(self, request_ids: list[str], last: bool) -> bytes | None:
        """The rows kept for ``request_ids``, forgotten here, as their float32
        values in id order, one row after another; None on a worker that does
        not answer (tensor-parallel ranks but the first all keep the same rows;
        pipeline stages but the last keep none). With ``last`` (the batch has no
        request left in flight), rows kept for anything else are dropped too."""
        from vllm.distributed.parallel_state import get_tp_group

        capture = capture_of(self.model_runner)
        if capture is None:
            return None
        rows = [row for row in map(capture.rows.pop, request_ids) if row is not None]
        if last:
            capture.rows.clear()
        if not rows or len(rows) < len(request_ids) or not get_tp_group().is_first_rank:
            return None
        return torch.stack(rows).numpy().tobytes()
