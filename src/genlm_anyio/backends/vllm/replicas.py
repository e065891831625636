"""The vLLM engines of a :class:`~genlm_anyio.backends.replicas.ReplicatedLM`."""

from __future__ import annotations

import os
from typing import Any

from .engine import VLLMEngine
from .internals import vllm_version
from .model import AsyncVirtualLM
from .options import split_cores


def start_replicas(model_name: str, replicas: int, replica_opts: dict[str, Any]) -> list[AsyncVirtualLM]:
    """``replicas`` multiprocess engines of ``model_name`` (each engine core in a
    process of its own), on vLLM's CPU platform (NotImplementedError elsewhere),
    each bound to its own contiguous range of this process's cores.
    ``replica_opts`` go to :meth:`AsyncVirtualLM.from_name` (``engine_opts``,
    ``max_batch_size``). On a failure, the engines started so far are closed."""
    vllm_version()  # a clear ImportError without vLLM
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        # Each engine would need its own devices (CUDA_VISIBLE_DEVICES in its
        # engine process); that path has not been run yet, so it is not offered.
        raise NotImplementedError(
            "ReplicatedLM.from_name starts vLLM replicas on CPU machines only for now; on GPUs, "
            "build one AsyncVirtualLM per device and pass them to ReplicatedLM(...)"
        )
    opts = dict(replica_opts)
    engine_opts = opts.pop("engine_opts", None)
    if engine_opts is not None and not isinstance(engine_opts, dict):
        raise TypeError(f"engine_opts must be a dict or None, not {type(engine_opts).__name__}")
    started: list[AsyncVirtualLM] = []
    try:
        for cpus in split_cores(sorted(os.sched_getaffinity(0)), replicas):
            engine = VLLMEngine.from_options(model_name, dict(engine_opts or {}), cpus=cpus, multiprocess=True)
            started.append(AsyncVirtualLM(engine, **opts))
    except BaseException:
        for lm in started:
            lm.close()
        raise
    return started
