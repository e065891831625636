"""Starting a vLLM engine: the options genlm-anyio needs, where the engine core
runs, and the CPU platform's thread binding."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ...checks import positive_int
from .internals import check_internals

REQUIRED_OPTIONS = {"max_logprobs": -1, "logprobs_mode": "raw_logprobs"}
"""Options genlm-anyio sets itself: every request may ask for all V
log-probabilities, computed from the raw logits (not after temperature or penalties)."""

MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"


def split_cores(cpus: Sequence[int], parts: int) -> list[list[int]]:
    """``cpus`` (sorted) in ``parts`` contiguous runs, the longer ones first; with
    fewer cores than parts, the parts share cores in turn."""
    positive_int("parts", parts)
    cores = sorted(set(cpus))
    if not cores:
        raise ValueError("cpus must not be empty")
    if len(cores) < parts:
        return [[cores[i % len(cores)]] for i in range(parts)]
    size, extra = divmod(len(cores), parts)
    runs, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        runs.append(cores[start:end])
        start = end
    return runs


def cpu_thread_binding(workers: int, cpus: Sequence[int]) -> str:
    """A ``VLLM_CPU_OMP_THREADS_BIND`` value for ``workers`` CPU workers: ``cpus``
    split by :func:`split_cores`, joined by ``|`` (``"0|1"`` for 2 workers on
    cores 0 and 1)."""
    return "|".join(",".join(map(str, run)) for run in split_cores(cpus, workers))


def workers(args: Any) -> int:
    """The GPU (or CPU) workers an engine built from ``args`` runs."""
    return args.tensor_parallel_size * args.pipeline_parallel_size * (args.data_parallel_size or 1)


def multiprocess_engine(requested: bool | None, env: Mapping[str, str], worker_count: int) -> bool:
    """Whether the engine core runs in a process of its own.

    ``requested`` (the caller's choice) wins, then ``VLLM_ENABLE_V1_MULTIPROCESSING``
    where the user set it; otherwise an engine with one worker runs in this
    process (its rows then never cross a process: see ``capture``), and one
    with several workers in its own, as vLLM does by default."""
    if requested is not None:
        return requested
    chosen = env.get(MULTIPROCESSING, "")
    if chosen != "":
        return bool(int(chosen))
    return worker_count > 1


def _inductor_breaks(args: Any) -> str | None:
    """Why torch's inductor cannot compile for an engine built from ``args`` under
    this process's ATen kernel path (``ATEN_CPU_CAPABILITY``), or None where it can
    (vllm-cpu 0.32 with torch 2.13; docs/vllm.md)."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if capability == "default":
        return "ATEN_CPU_CAPABILITY=default: inductor's generated C++ does not compile on that kernel path"
    if capability == "avx2" and args.tensor_parallel_size > 1:
        # The inductor-compiled input mask of the vocabulary-parallel embedding indexes out of range.
        return "ATEN_CPU_CAPABILITY=avx2 with tensor parallelism: inductor's vocabulary mask indexes out of range"
    return None


def _cpu_environment(args: Any, cpus: Sequence[int] | None) -> dict[str, str]:
    """The environment an engine built from ``args`` needs on vLLM's CPU platform:
    a thread binding for its workers where vLLM's own would fail or ``cpus`` asks
    for one, and no torch.compile (``args.enforce_eager`` set, and
    ``TORCHDYNAMO_DISABLE`` for the functions vLLM compiles even then) where
    inductor's code fails on this kernel path."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    env = {}
    broken = _inductor_breaks(args)
    if broken is not None:
        # Only the workers of a parallel engine compile anything once enforce_eager is set.
        if not args.enforce_eager or args.tensor_parallel_size > 1:
            warnings.warn(f"{broken}: the engine runs without torch.compile", RuntimeWarning, stacklevel=3)
        args.enforce_eager = True
        env["TORCHDYNAMO_DISABLE"] = "1"
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return env
    count = args.tensor_parallel_size * args.pipeline_parallel_size
    if cpus is None:
        from vllm.utils.cpu_resource_utils import get_visible_memory_node

        # vLLM's "auto" binding puts each worker on a NUMA node of its own.
        if count <= len(get_visible_memory_node()):
            return env
        cpus = sorted(os.sched_getaffinity(0))
    return {**env, "VLLM_CPU_OMP_THREADS_BIND": cpu_thread_binding(count, cpus)}


def _check_ray(args: Any) -> None:
    """Refuse the Ray executor where vLLM's platform has no Ray device, as vLLM
    would (``ray_utils.initialize_ray_cluster``), but before starting anything and
    with an error that reaches the caller (vLLM's is in its engine process's log)."""
    from vllm.platforms import current_platform

    if args.distributed_executor_backend == "ray" and not current_platform.ray_device_key:
        raise ValueError(
            f"engine_opts distributed_executor_backend='ray': vLLM's {current_platform.device_name} platform "
            "does not run workers on Ray (it has no Ray device); leave the option out for its multiprocess executor"
        )


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` while an engine starts: vLLM reads it there, in this process and
    in the engine and worker processes it starts, which inherit it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_engine(
    model: str, engine_opts: dict[str, Any], cpus: Sequence[int] | None = None, multiprocess: bool | None = None
) -> Any:
    """A vLLM ``LLMEngine`` for ``model``; ``engine_opts`` are ``vllm.EngineArgs`` fields.

    Prefix caching is on unless ``engine_opts`` turn it off, and the engine has
    :data:`REQUIRED_OPTIONS`, genlm-anyio's logits processor for its model
    runner (``capture.install``) and its worker extension (``capture.RowsExtension``,
    unless ``engine_opts`` name another). Where the engine core runs:
    :func:`multiprocess_engine`. On vLLM's CPU platform, unless
    ``VLLM_CPU_OMP_THREADS_BIND`` is set, the engine's workers get threads bound
    to ``cpus`` (default: the cores this process may run on), split into one
    contiguous range per worker (:func:`cpu_thread_binding`); without ``cpus``,
    only when vLLM's own binding (one NUMA node per worker) cannot place them.
    """
    check_internals()
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.executor import Executor

    from .capture import EXTENSION, install

    # Rows leave workers in other processes through genlm-anyio's worker extension,
    # unless the user brings one of their own (vLLM takes one): then logprobs=-1.
    opts = {"enable_prefix_caching": True, "worker_extension_cls": EXTENSION, **engine_opts}
    clash = {k: opts[k] for k, v in REQUIRED_OPTIONS.items() if k in opts and opts[k] != v}
    if clash:
        raise ValueError(f"engine_opts may not set {clash}: genlm-anyio needs {REQUIRED_OPTIONS}")
    opts.update(REQUIRED_OPTIONS)
    args = EngineArgs(model=model, **opts)
    _check_ray(args)
    env = _cpu_environment(args, cpus)
    mp = multiprocess_engine(multiprocess, os.environ, workers(args))
    # vLLM reads the variable while it starts (its CPU platform picks its worker executor from it).
    env[MULTIPROCESSING] = "1" if mp else "0"
    with _environment(env):
        config = args.create_engine_config()
        install(config)
        return LLMEngine(
            vllm_config=config,
            executor_class=Executor.get_class(config),
            log_stats=not args.disable_log_stats,
            multiprocess_mode=mp,
        )
