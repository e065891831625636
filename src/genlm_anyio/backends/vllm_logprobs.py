"""Full-vocabulary log-probabilities from inside vLLM's sampler, without its sort.

vLLM returns ``logprobs=-1`` (all V log-probabilities) through the sampler's
``topk`` over the vocabulary, a full sort of every row (on CPU about 2.3 ms per
request for V = 49,152, as much as the model's forward pass per token).
:class:`FullLogprobs` is a vLLM logits processor (vLLM's supported
``logits_processors`` engine option) that instead keeps the ``log_softmax`` of
the raw logits of the requests marked for it, in token-id order, and leaves the
logits unchanged. Requests marked for it ask for no logprobs at all, so the
sampler skips its own.

It runs inside the engine's worker, so its rows are in reach only when the
worker runs in this process (the in-process engine core with one worker, on
vLLM's V1 model runner: :func:`install`); :func:`find_capture` finds it there.
Elsewhere genlm-anyio asks for ``logprobs=-1``.

This module imports vLLM: import it only once vLLM is known to be installed.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

KEY = "genlm_anyio.full_logprobs"
"""The ``SamplingParams.extra_args`` entry that marks a request: its value is the
engine request id under which its row is kept."""


class FullLogprobs(LogitsProcessor):
    """Keeps the raw log-probability rows of the marked requests of each step.

    ``rows`` maps an engine request id to the last row computed for it (a view
    of that step's ``(marked requests, V)`` float32 tensor, on the engine's
    device). A step whose row is thrown away (a prompt chunk before the last)
    is overwritten by the step that samples.
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self._marked: dict[int, str] = {}  # batch index -> request id
        self.rows: dict[str, torch.Tensor] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        key = (sampling_params.extra_args or {}).get(KEY)
        if key is not None and not isinstance(key, str):
            raise ValueError(f"extra_args[{KEY!r}] must be a request id (str), not {type(key).__name__}")

    def is_argmax_invariant(self) -> bool:
        # False: vLLM then runs it for greedy requests too (it changes nothing).
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(
            self._marked, batch_update, lambda params, _prompt, _output: (params.extra_args or {}).get(KEY)
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self._marked:
            index = list(self._marked)
            # The sampler's own formula for raw_logprobs, on the marked rows only.
            values = logits[index].log_softmax(dim=-1, dtype=torch.float32)
            for i, row in zip(index, values):
                self.rows[self._marked[i]] = row
        return logits


def install(vllm_config: Any) -> None:
    """Add :class:`FullLogprobs` to an engine configuration's logits processors
    where vLLM's V1 model runner will take it: vLLM's V2 model runner (on GPUs
    with Triton) takes only processors of its own interface, and speculative
    decoding takes none. Elsewhere the engine runs without it (``logprobs=-1``)."""
    if vllm_config.use_v2_model_runner or vllm_config.speculative_config is not None:
        return
    model = vllm_config.model_config
    model.logits_processors = [*(model.logits_processors or ()), FullLogprobs]


def find_capture(core: Any) -> FullLogprobs | None:
    """The :class:`FullLogprobs` of an in-process engine core's one worker, or
    None (workers in other processes, or an engine built without it)."""
    try:
        processors = core.engine_core.model_executor.driver_worker.worker.model_runner.input_batch.logitsprocs
    except AttributeError:
        return None
    return next((p for p in processors.all if isinstance(p, FullLogprobs)), None)
