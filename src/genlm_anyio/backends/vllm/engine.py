"""A vLLM engine core driven directly: batches of log-probability and sampling requests.

A request goes in as an ``EngineCoreRequest`` (built by the engine's own input
processor) and its output comes back as an ``EngineCoreOutput``; the front
end's output processor, which turns log-probabilities into one Python
``Logprob`` object per token, is never involved. A batch runs in phases
(:meth:`VLLMEngine._run`): the batch first claims the idle sessions its
log-probability requests extend and ends the idle sessions waited for too long
(see ``sessions``); each engine round then adds its requests (resuming a
claimed session or starting a new request) and collects their outputs; once
the batch is done, sampled runs are trimmed and the log-probability requests
stay as idle sessions for later batches.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from ..base import Adapter, Query, RequestFailed, SampleRequest
from . import utility
from .internals import TESTED_VERSIONS, check_internals
from .lora import LoRAs, cpu_lora_slot_bug
from .options import REQUIRED_OPTIONS, start_engine
from .sessions import Sessions

if TYPE_CHECKING:
    from .rows import RowSource

Request = Union[Query, SampleRequest]


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
    """Batches run as two engine rounds (base, then adapters: see ``LoRAs.rounds``)."""
    rounds: int = 0
    """Engine rounds run: each adds its requests, then takes outputs until they finish."""
    engine_steps: int = 0
    """Engine steps (forward passes) whose outputs held requests of a round."""

    @property
    def tokens_computed(self) -> int:
        """Prompt tokens the model ran: fed minus prefix-cache hits."""
        return self.tokens_fed - self.tokens_cached


@dataclass
class _Batch:
    """One batch in flight: what :meth:`VLLMEngine._run`'s phases share."""

    requests: Sequence[Request]
    idle: dict[Query, str]
    """Idle sessions that this batch does not resume and keeps waiting."""
    claims: dict[int, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    """Index in ``requests`` -> the idle session it resumes and the tokens it adds."""
    results: list[Any] = field(init=False)
    where: dict[str, int] = field(default_factory=dict)
    """Engine request id -> index in ``requests``."""
    sampled: dict[str, list[int]] = field(default_factory=dict)
    """Tokens sampled so far by each sampling run."""
    waiting: set[str] = field(default_factory=set)
    """Added and not finished."""

    def __post_init__(self) -> None:
        self.results = [None] * len(self.requests)


class VLLMEngine:
    """A vLLM engine that runs batches of log-probability and sampling requests.

    One batch runs at a time; :meth:`reset_prefix_cache` waits for it.

    Args:
        engine: a ``vllm.v1.engine.llm_engine.LLMEngine``, built with
            ``max_logprobs=-1`` and ``logprobs_mode="raw_logprobs"``.
    """

    def __init__(self, engine: Any):
        version = check_internals()
        from vllm import SamplingParams
        from vllm.platforms import current_platform
        from vllm.v1.engine import FinishReason
        from vllm.v1.engine.exceptions import EngineDeadError

        from .rows import row_source

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
                f"genlm-anyio's vLLM hook does not fit vLLM {version} (tested with {', '.join(TESTED_VERSIONS)}): "
                f"the engine has no {', '.join(missing)}"
            )
        config = engine.model_config
        wrong = {k: getattr(config, k, None) for k, v in REQUIRED_OPTIONS.items() if getattr(config, k, None) != v}
        if wrong:
            raise ValueError(
                f"the vLLM engine must be built with {REQUIRED_OPTIONS} for full-vocabulary log-probabilities; it has {wrong}"
            )
        self.version = version
        self._engine = engine
        self._core = core
        self._inputs = inputs
        self._tasks = engine.get_supported_tasks()
        self._ids = itertools.count()
        self._sessions = Sessions()
        self._cpu = current_platform.is_cpu()
        self.loras = LoRAs(engine, split_mixed=self._cpu and cpu_lora_slot_bug())
        self._lock = threading.Lock()
        self.stats = EngineStats()
        self.vocab_size: int = config.get_vocab_size()
        # Where log-probability rows come from: genlm-anyio's logits processor, in this
        # process or through the workers' extension (no sort), or else logprobs=-1.
        self.rows: RowSource = row_source(engine, self.vocab_size)
        # Built once: the input processor clones them for each request. Greedy, because
        # the sampled token is thrown away and this is the cheapest way to draw it.
        self._captured_params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        self._sorted_params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, detokenize=False)
        self._dead_error = EngineDeadError
        self._error_finish = FinishReason.ERROR
        self.max_model_len: int = config.max_model_len
        scheduler = engine.vllm_config.scheduler_config
        active = getattr(scheduler, "max_num_active_seqs", None)
        # The engine's request slots. Each request of a batch holds one until the batch
        # ends (an idle session keeps its slot), so a larger batch would never finish.
        self.max_requests: int = active if active is not None else scheduler.max_num_seqs
        # An engine core in another process steps as soon as a request reaches it, so
        # a round's requests would be split over several steps (forward passes): there
        # its scheduler is held while they go in (see ``_held_scheduler``).
        self._holds = utility.in_other_process(core) and engine.vllm_config.parallel_config.data_parallel_size == 1
        self._pending: list[Future[Any]] = []

    @classmethod
    def from_options(
        cls,
        model: str,
        engine_opts: dict[str, Any],
        cpus: Sequence[int] | None = None,
        multiprocess: bool | None = None,
    ) -> VLLMEngine:
        """Start an engine for ``model`` (see :func:`~genlm_anyio.backends.vllm.options.start_engine`)."""
        return cls(start_engine(model, engine_opts, cpus=cpus, multiprocess=multiprocess))

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
        with self._lock:
            self.loras.add(adapter)

    def remove_lora(self, adapter: Adapter) -> None:
        """End ``adapter``'s idle sessions and unload its weights."""
        with self._lock:
            self._retire(self._sessions.of_adapter(adapter))
            self.loras.remove(adapter)

    # -- requests -----------------------------------------------------------------------
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
        return self._captured_params if self.rows.marks else self._sorted_params

    def _add(self, request: Request) -> str:
        """Start a request; a log-probability request opens a session."""
        from vllm.inputs import TokensPrompt

        if isinstance(request, Query):
            session, prompt = True, request.ids
        else:
            session, prompt = False, request.prompt
        core_request = self._inputs.process_inputs(
            request_id=f"genlm-{next(self._ids)}",
            prompt=TokensPrompt(prompt_token_ids=list(prompt)),
            params=self._params(request),
            supported_tasks=self._tasks,
            lora_request=self.loras.request(request.adapter),
            resumable=session,
        )
        self._inputs.assign_request_id(core_request)
        if session:
            self._mark(core_request)
            self._sessions.opened(core_request.request_id, core_request)
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

        opened = self._sessions.opening_request(rid)
        self._core.add_request(
            msgspec.structs.replace(opened, prompt_token_ids=list(new_tokens), arrival_time=time.time())
        )
        self.stats.sessions_resumed += 1
        self.stats.tokens_fed += len(new_tokens)

    def _mark(self, core_request: Any) -> None:
        """Have the capturing logits processor keep this log-probability request's
        row (on the input processor's own copy of its sampling parameters)."""
        if self.rows.marks:
            from .capture import KEY

            core_request.sampling_params.extra_args = {KEY: core_request.request_id}

    def _retire(self, rids: Sequence[str]) -> None:
        """End sessions; their KV blocks stay in the prefix cache, free to evict."""
        if rids:
            self._core.abort_requests(list(rids))
            self._sessions.ended(list(rids))

    @staticmethod
    def _error(output: Any) -> RequestFailed:
        """The answer for a request that vLLM ended with an error: its own text where it gives one."""
        error = getattr(output, "error", None)  # vLLM 0.33's RequestError; absent in 0.32
        if error is None:
            return RequestFailed(RuntimeError, "vLLM ended the request with an error (it gave no reason)")
        return RequestFailed(RuntimeError, f"vLLM ended the request with an error: {error.message} ({error.code})")

    # -- batches ------------------------------------------------------------------------
    def run(self, requests: Sequence[Request]) -> list[Any]:
        """Run ``requests`` together: a log-probability tensor for each :class:`Query`,
        the sampled ids (eos left out) for each :class:`SampleRequest`, or a
        :class:`RequestFailed` for a request vLLM ended with an error. Their
        adapters must be registered (:meth:`add_lora`)."""
        with self._lock:
            try:
                return self._run(requests)
            except self._dead_error as exc:
                raise RuntimeError(
                    "vLLM's engine process died: this model cannot run requests any more; close it and start a new one"
                ) from exc

    def _next_outputs(self) -> Any:
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
        batch = _Batch(requests, self._sessions.take_idle())
        try:
            for i, request in enumerate(requests):
                claim = Sessions.claim(request, batch.idle) if isinstance(request, Query) else None
                if claim is not None:
                    batch.claims[i] = claim
            self._retire(self._sessions.passed_over(batch.idle, room=self.max_requests - len(requests)))
            rounds = self.loras.rounds([r.adapter for r in requests])
            if len(rounds) > 1:
                self.stats.split_rounds += 1
            for round_ in rounds:
                self._start_round(batch, round_)
                self._collect(batch)
        except BaseException:
            self.rows.discard()
            # Leave the engine with nothing of this batch in flight or idle.
            self._retire(
                list(
                    {*batch.idle.values(), *(rid for rid, _ in batch.claims.values())}
                    | {rid for rid in batch.where if rid not in batch.sampled or rid in batch.waiting}
                )
            )
            raise
        self._finish(batch)
        return batch.results

    @contextlib.contextmanager
    def _held_scheduler(self) -> Iterator[None]:
        """While a round's requests go in: an engine core in another process with
        its scheduler paused (vLLM's ``pause_scheduler("keep")``, which queues what
        is added and steps nothing) and resumed after, so that its next step runs
        them all, not the first few that arrived. The replies are not waited for
        (the calls are messages in order with the requests); a failed one fails a
        later round."""
        if not self._holds:
            yield
            return
        failed = [f.exception() for f in self._pending if f.done() and f.exception() is not None]
        self._pending = [f for f in self._pending if not f.done()]
        if failed:
            raise RuntimeError(f"vLLM's engine could not pause or resume its scheduler: {failed[0]}") from failed[0]
        self._pending.append(utility.send(self._core, "pause_scheduler", ("keep", False)))
        try:
            yield
        finally:
            self._pending.append(utility.send(self._core, "resume_scheduler", ()))

    def _start_round(self, batch: _Batch, round_: list[int]) -> None:
        """Add the requests of one engine round: resume the idle session a
        log-probability request extends, or start a new engine request."""
        self.stats.rounds += 1
        with self._held_scheduler():
            self._add_round(batch, round_)

    def _add_round(self, batch: _Batch, round_: list[int]) -> None:
        for i in round_:
            request = batch.requests[i]
            if isinstance(request, SampleRequest) and request.max_tokens == 0:
                batch.results[i] = []
                continue
            claim = batch.claims.get(i)
            rid = claim[0] if claim else self._add(request)
            # Recorded before a resume, so that a failure while resuming retires it.
            batch.where[rid] = i
            batch.waiting.add(rid)
            if isinstance(request, SampleRequest):
                batch.sampled[rid] = []
            if claim:
                self._resume(*claim)

    def _collect(self, batch: _Batch) -> None:
        """Take the engine's outputs until every request added so far has finished."""
        while batch.waiting:
            sampled = []  # log-probability requests whose step came in: their rows are due
            outputs = [o for o in self._next_outputs().outputs if o.request_id in batch.waiting]
            if outputs:
                self.stats.engine_steps += 1
            for output in outputs:
                rid = output.request_id
                if output.num_nans_in_logits:
                    raise FloatingPointError(f"vLLM's logits held {output.num_nans_in_logits} NaNs")
                if output.prefill_stats is not None:
                    self.stats.tokens_cached += output.prefill_stats.num_cached_tokens
                i = batch.where[rid]
                if output.finish_reason == self._error_finish:
                    batch.results[i] = self._error(output)
                    batch.sampled.pop(rid, None)
                elif rid in batch.sampled:
                    batch.sampled[rid].extend(output.new_token_ids)
                elif output.new_token_ids:  # the step that computed its log-probabilities
                    sampled.append(output)
                if output.finish_reason is not None:
                    batch.waiting.discard(rid)
                    if rid not in batch.sampled and batch.results[i] is None and not output.new_token_ids:
                        raise RuntimeError(f"vLLM ended a request without its logprobs ({output.finish_reason})")
            if sampled:
                for output, row in zip(sampled, self.rows.take(sampled, last=not batch.waiting)):
                    batch.results[batch.where[output.request_id]] = row

    def _finish(self, batch: _Batch) -> None:
        """Trim the sampled runs (their eos) and keep the log-probability requests
        as idle sessions, next to those the batch passed over; a request vLLM
        failed holds nothing."""
        for rid, i in batch.where.items():
            request = batch.requests[i]
            if isinstance(batch.results[i], RequestFailed):
                self._sessions.ended([rid])
            elif isinstance(request, SampleRequest):  # exactly the requests in ``sampled``
                tokens = batch.sampled[rid]
                if tokens and tokens[-1] in request.eos_token_ids:
                    tokens.pop()
                batch.results[i] = tokens
            else:
                self._sessions.rest(request, rid)
        self._retire(self._sessions.keep(batch.idle))

    def close_sessions(self) -> None:
        """End every idle session (``reset_prefix_cache`` does this first)."""
        with self._lock:
            self._retire(list(self._sessions.take_idle().values()))

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
