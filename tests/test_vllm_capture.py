"""genlm-anyio's logits processors and where they go, without an engine.

The V2 processor (vLLM's V2 model runner, on GPUs) is driven here as that runner
drives it (``add_request`` per request slot, then ``apply`` with a real
``LogitsContext`` each step), on CPU tensors, and loaded through vLLM's own V2
loader and parameter validator. The worker extension that hands rows over from
other processes is run on a worker's runner, and its bytes read back as the
engine reads them. The choice of processor, of row source and of where the
engine core runs is checked over the configurations a GPU user gets.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.worker.gpu.sample.logits_processor import (
    LogitsContext,
    build_custom_logits_processors,
    build_custom_logits_processors_params_validator,
)

from genlm_anyio.backends.vllm.capture import EXTENSION, KEY, FullLogprobs, FullLogprobsV2, RowsExtension, processor_for
from genlm_anyio.backends.vllm.logs import PAUSE_LINE, SCHEDULER_LOGGER, quiet_scheduler_pauses
from genlm_anyio.backends.vllm.options import multiprocess_engine
from genlm_anyio.backends.vllm.rows import CapturedRows, RankedRows, WorkerRows, row_source

pytestmark = pytest.mark.vllm

V = 50
SLOTS = 4


def req_states() -> SimpleNamespace:
    """What vLLM's loader reads of the V2 runner's ``RequestState`` (whose buffers need CUDA's pinned memory)."""
    return SimpleNamespace(
        device=torch.device("cpu"),
        max_num_reqs=SLOTS,
        vocab_size=V,
        all_token_ids=None,
        prompt_len=None,
        prefill_len=None,
        total_len=None,
    )


def v2_processor() -> FullLogprobsV2:
    """Built by vLLM's own V2 loader, from the class path a user would give."""
    procs = build_custom_logits_processors(
        None,
        req_states(),
        is_pooling_model=False,
        custom_logitsprocs=["genlm_anyio.backends.vllm.capture:FullLogprobsV2"],
    )
    assert len(procs) == 1 and isinstance(procs[0], FullLogprobsV2)
    return procs[0]


def context(slots: list[int]) -> LogitsContext:
    """A step's layout as the V2 sampler builds it: one logits row per request, no drafts."""
    n = len(slots)
    mapping = torch.tensor(slots, dtype=torch.int32)
    return LogitsContext(
        expanded_idx_mapping=mapping,
        idx_mapping=mapping,
        idx_mapping_np=np.array(slots, dtype=np.int32),
        expanded_local_pos=torch.zeros(n, dtype=torch.int32),
        input_ids=torch.zeros(n, dtype=torch.int32),
        pos=torch.arange(n, dtype=torch.int32),
        seq_lens_upper_bound_np=np.ones(n, dtype=np.int32),
    )


def marked(rid: str) -> SamplingParams:
    return SamplingParams(max_tokens=1, temperature=0.0, extra_args={KEY: rid})


def step(proc: FullLogprobsV2, slots: list[int]) -> torch.Tensor:
    """One ``apply`` over fresh logits for ``slots``; checks the logits are returned unchanged."""
    logits = torch.randn(len(slots), V) * 4
    before = logits.clone()
    out = proc.apply(logits, context(slots))
    assert out is logits and torch.equal(out, before)
    return before


def want(logits: torch.Tensor, row: int) -> torch.Tensor:
    return torch.log_softmax(logits[row].double(), dim=-1).float()


def test_v2_rows_are_the_log_softmax_of_their_own_requests_logits():
    torch.manual_seed(0)
    proc = v2_processor()
    assert proc.add_request(0, marked("a")) is True
    assert proc.add_request(1, SamplingParams(max_tokens=4)) is False  # unmarked: no processing asked
    assert proc.add_request(3, marked("b")) is True
    # Rows come in any slot order; the unmarked request's row is left alone.
    logits = step(proc, [3, 1, 0])
    got_a, got_b = proc.rows.pop("a"), proc.rows.pop("b")
    assert got_a.dtype == torch.float32 and got_a.shape == (V,) and got_a.device.type == "cpu"
    torch.testing.assert_close(got_a, want(logits, 2), rtol=0, atol=1e-5)
    torch.testing.assert_close(got_b, want(logits, 0), rtol=0, atol=1e-5)
    assert len(proc.rows) == 0 and proc.rows.steps == 1


def test_v2_a_chunked_prefill_keeps_the_row_of_its_last_chunk():
    torch.manual_seed(1)
    proc = v2_processor()
    proc.add_request(2, marked("long"))
    step(proc, [2])  # a prompt chunk before the last: its sample is thrown away
    last = step(proc, [2])
    torch.testing.assert_close(proc.rows.pop("long"), want(last, 0), rtol=0, atol=1e-5)
    assert proc.rows.pop("long") is None


def test_v2_a_reused_slot_belongs_to_its_new_request():
    torch.manual_seed(2)
    proc = v2_processor()
    proc.add_request(0, marked("first"))
    step(proc, [0])
    proc.rows.pop("first")
    # Slot 0 freed (V2 gives no notice) and reused by an unmarked request: no row.
    assert proc.add_request(0, SamplingParams(max_tokens=3)) is False
    step(proc, [0])
    assert len(proc.rows) == 0
    # Reused again, by a marked request (a resumed session is re-added the same way).
    proc.add_request(0, marked("second"))
    logits = step(proc, [0])
    torch.testing.assert_close(proc.rows.pop("second"), want(logits, 0), rtol=0, atol=1e-5)
    assert proc.rows.pop("first") is None


def test_v2_a_batch_of_every_slot_keeps_one_row_per_marked_request():
    torch.manual_seed(3)
    proc = v2_processor()
    for slot in range(SLOTS):
        proc.add_request(slot, marked(f"r{slot}") if slot % 2 == 0 else SamplingParams())
    logits = step(proc, [1, 2, 3, 0])
    assert len(proc.rows) == 2
    torch.testing.assert_close(proc.rows.pop("r2"), want(logits, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(proc.rows.pop("r0"), want(logits, 3), rtol=0, atol=1e-5)


def test_vllms_loaders_and_validators_take_each_processor_where_it_belongs():
    validate = build_custom_logits_processors_params_validator([FullLogprobsV2])
    validate(marked("ok"))
    validate(SamplingParams())
    with pytest.raises(VLLMValidationError, match=KEY):
        validate(SamplingParams(extra_args={KEY: 3}))
    # vLLM's V2 loader refuses a V1-interface processor: the reason there are two.
    with pytest.raises(ValueError, match="not a subclass"):
        build_custom_logits_processors(None, req_states(), False, [FullLogprobs])
    # The V1 validator (the V1 loader runs in the engine tests, which use it).
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters

    validate_logits_processors_parameters([FullLogprobs], marked("ok"))
    with pytest.raises(VLLMValidationError, match=KEY):
        validate_logits_processors_parameters([FullLogprobs], SamplingParams(extra_args={KEY: 3}))


def gpu_config(v2: bool = True, speculative: object = None) -> SimpleNamespace:
    return SimpleNamespace(use_v2_model_runner=v2, speculative_config=speculative)


@pytest.mark.parametrize(
    ("config", "processor"),
    [
        (gpu_config(), FullLogprobsV2),  # one CUDA GPU with Triton: vLLM's default
        (gpu_config(v2=False), FullLogprobs),  # VLLM_USE_V2_MODEL_RUNNER=0, or no Triton (and CPUs)
        (gpu_config(speculative=object()), None),  # speculative decoding: several rows per request
        (gpu_config(v2=False, speculative=object()), None),
    ],
)
def test_the_processor_follows_the_model_runner(config, processor):
    assert processor_for(config) is processor


@pytest.mark.parametrize(
    ("requested", "env", "workers", "multiprocess"),
    [
        (None, {}, 1, False),  # one GPU, vLLM's defaults: the engine core in this process
        (None, {"VLLM_ENABLE_V1_MULTIPROCESSING": ""}, 1, False),
        (None, {}, 2, True),  # TP=2 (or PP, DP): a process of its own, as vLLM does
        (None, {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, 1, True),  # the user asked for it
        (None, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, 2, False),
        (True, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, 1, True),  # an explicit argument wins
        (False, {}, 2, False),
    ],
)
def test_where_the_engine_core_runs(requested, env, workers, multiprocess):
    assert multiprocess_engine(requested, env, workers) is multiprocess


class _Worker(RowsExtension):
    """A worker as vLLM extends it: its model runner (V2 here) and the extension's method."""

    def __init__(self, processor: FullLogprobsV2):
        self.model_runner = SimpleNamespace(sampler=SimpleNamespace(logits_processors=[processor]))


@pytest.fixture
def tp_rank(monkeypatch):
    """Set this process's tensor-parallel rank, as vLLM's ``get_tp_group()`` reports it."""
    from vllm.distributed import parallel_state

    def set_rank(first: bool) -> None:
        monkeypatch.setattr(parallel_state, "_TP", SimpleNamespace(is_first_rank=first))

    return set_rank


def test_the_worker_extension_hands_over_a_steps_rows_in_id_order(tp_rank):
    proc = v2_processor()
    for slot, rid in enumerate(["a", "b", "c"]):
        proc.add_request(slot, marked(rid))
    logits = torch.randn(3, V)
    proc.apply(logits.clone(), context([0, 1, 2]))
    tp_rank(True)
    data = _Worker(proc).genlm_anyio_take_rows(["c", "a"], False)
    # Each row, V float32 values in id order, without ids, as WorkerRows reads them.
    core = SimpleNamespace(collective_rpc=lambda method, timeout, args, kwargs: [data])
    got = WorkerRows(core, V).take([SimpleNamespace(request_id="c"), SimpleNamespace(request_id="a")], last=False)
    assert len(data) == 2 * V * 4
    torch.testing.assert_close(torch.stack(got), torch.log_softmax(logits[[2, 0]], dim=-1), rtol=0, atol=1e-6)
    assert len(proc.rows) == 1  # "b" is kept until a last take
    assert _Worker(proc).genlm_anyio_take_rows([], True) is None and len(proc.rows) == 0


def test_only_the_first_tensor_parallel_rank_answers(tp_rank):
    """Every rank keeps the same rows (vLLM gathers the logits on all of them); one answers, all forget."""
    proc = v2_processor()
    proc.add_request(0, marked("a"))
    proc.apply(torch.randn(1, V), context([0]))
    tp_rank(False)
    assert _Worker(proc).genlm_anyio_take_rows(["a"], False) is None
    assert len(proc.rows) == 0


def test_a_worker_without_the_row_answers_nothing_and_the_engine_says_why(tp_rank):
    tp_rank(True)
    worker = _Worker(v2_processor())  # a pipeline stage but the last: no rows
    assert worker.genlm_anyio_take_rows(["a"], True) is None
    core = SimpleNamespace(collective_rpc=lambda method, timeout, args, kwargs: [None, None])
    with pytest.raises(RuntimeError, match="without running genlm-anyio's logits processor"):
        WorkerRows(core, V).take([SimpleNamespace(request_id="a")], last=True)


def fake_engine(in_process: bool, processors: list, extension: str | None, speculative: object = None):
    """What ``row_source`` reads of an ``LLMEngine``: its engine core (with one
    worker in this process, or none) and its configuration."""
    worker = SimpleNamespace(worker=SimpleNamespace(model_runner=_Worker(v2_processor()).model_runner))
    core = SimpleNamespace(engine_core=SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker)))
    config = SimpleNamespace(
        use_v2_model_runner=True,
        speculative_config=speculative,
        model_config=SimpleNamespace(logits_processors=processors),
        parallel_config=SimpleNamespace(worker_extension_cls=extension),
    )
    return SimpleNamespace(engine_core=core if in_process else SimpleNamespace(), vllm_config=config)


@pytest.mark.parametrize(
    ("engine", "source"),
    [
        # One worker, in this process (vLLM's default on one GPU, here): the processor's rows.
        (fake_engine(True, [FullLogprobsV2], EXTENSION), CapturedRows),
        # Workers elsewhere (multiprocess, TP, PP) with genlm-anyio's parts: the extension's rows.
        (fake_engine(False, [FullLogprobsV2], EXTENSION), WorkerRows),
        # A worker extension of the user's (vLLM takes one), or no processor: logprobs=-1.
        (fake_engine(False, [FullLogprobsV2], "user.Extension"), RankedRows),
        (fake_engine(False, None, EXTENSION), RankedRows),
        # Speculative decoding: no processor fits (several rows per request).
        (fake_engine(False, [FullLogprobsV2], EXTENSION, speculative=object()), RankedRows),
    ],
)
def test_the_row_source_follows_where_the_workers_run(engine, source):
    assert type(row_source(engine, V)) is source


def test_a_dead_engine_process_fails_the_row_call_instead_of_hanging_it():
    """vLLM's own utility call waits forever for an answer once the engine process
    is gone; WorkerRows' wait asks the client whether the engine is alive."""
    from vllm.v1.engine import EngineCoreRequestType
    from vllm.v1.engine.exceptions import EngineDeadError

    sent, checks = [], []

    def ensure_alive():
        checks.append(1)
        if len(checks) == 2:
            raise EngineDeadError()

    core = SimpleNamespace(
        utility_results={}, _send_input=lambda kind, request: sent.append((kind, request)), ensure_alive=ensure_alive
    )
    with pytest.raises(EngineDeadError):
        WorkerRows(core, V).take([SimpleNamespace(request_id="a")], last=True)
    [(kind, (client, call_id, method, args))] = sent
    assert kind is EngineCoreRequestType.UTILITY and client == 0 and call_id in core.utility_results
    assert (method, args) == ("collective_rpc", ("genlm_anyio_take_rows", None, (["a"], True), None))


def test_importing_the_capture_drops_the_schedulers_pause_lines_and_no_other():
    """What an engine process imports of genlm-anyio (the processor's module)
    filters vLLM's scheduler logger: its pause-state lines go, the rest stay."""
    logger = logging.getLogger(SCHEDULER_LOGGER)
    assert len(logger.filters) == 1  # installed by the import at the top of this file
    quiet_scheduler_pauses()  # a second install adds nothing
    assert len(logger.filters) == 1
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        logger.warning(PAUSE_LINE, "PAUSED_ALL")
        logger.warning("another line of the scheduler's")
    finally:
        logger.removeHandler(handler)
    assert seen == ["another line of the scheduler's"]
