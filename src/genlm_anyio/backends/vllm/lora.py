"""LoRA adapters on a vLLM engine: registration, and the rounds a batch that
mixes base-model and adapter requests runs in."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from ..base import Adapter


def slot_minus_one_gets_an_adapter(bgmv_expand: Callable[..., Any]) -> bool:
    """Whether a LoRA expand op of vLLM's CPU ops (``lora/ops/torch_ops``'
    ``bgmv_expand``) adds an adapter to a row of slot -1 ("no adapter"), found
    by running it on a one-row batch."""
    import torch

    out = torch.zeros(1, 1)
    bgmv_expand(torch.ones(1, 1), torch.ones(1, 1, 1), out, torch.tensor([-1]), add_inputs=True)
    return bool(out.item() != 0)


@lru_cache(maxsize=1)
def cpu_lora_slot_bug() -> bool:
    """Whether the installed vLLM's CPU LoRA ops give a base-model row the last
    slot's adapter, as vLLM 0.32's do (they index the stacked adapter weights
    with the slot, and -1 picks the last; 0.33 masks slot -1 out)."""
    from vllm.lora.ops.torch_ops import bgmv_expand

    return slot_minus_one_gets_an_adapter(bgmv_expand)


class LoRAs:
    """The adapters registered in one engine, as vLLM ``LoRARequest``s (vLLM id: the adapter's serial).

    Args:
        engine: the vLLM ``LLMEngine``.
        split_mixed: run batches that mix base-model and adapter requests in
            two rounds (:meth:`rounds`): where :func:`cpu_lora_slot_bug` holds.
    """

    def __init__(self, engine: Any, split_mixed: bool):
        self._engine = engine
        self.split_mixed = split_mixed
        self._requests: dict[Adapter, Any] = {}

    def __bool__(self) -> bool:
        return bool(self._requests)

    def add(self, adapter: Adapter) -> None:
        """Load ``adapter``'s weights into the engine."""
        from vllm.lora.request import LoRARequest

        if self._engine.vllm_config.lora_config is None:
            raise ValueError(
                "this vLLM engine was started without LoRA support: pass engine_opts={'enable_lora': True} "
                "(and max_lora_rank at least the adapter's rank) to AsyncVirtualLM.from_name"
            )
        request = LoRARequest(lora_name=adapter.name, lora_int_id=adapter.serial, lora_path=adapter.path)
        if not self._engine.add_lora(request):
            raise RuntimeError(f"vLLM could not load the LoRA adapter at {adapter.path!r}")
        self._requests[adapter] = request

    def remove(self, adapter: Adapter) -> None:
        """Unload ``adapter``'s weights (nothing if it is not loaded)."""
        if self._requests.pop(adapter, None) is not None:
            self._engine.remove_lora(adapter.serial)

    def request(self, adapter: Adapter | None) -> Any:
        """The ``LoRARequest`` of a registered adapter (None for the base model)."""
        return None if adapter is None else self._requests[adapter]

    def rounds(self, adapters: Sequence[Adapter | None]) -> list[list[int]]:
        """The engine rounds a batch of requests under ``adapters`` runs in, as
        indices: one, except where :attr:`split_mixed` and base-model and adapter
        requests meet; there, base requests run first, then the adapters'
        (which vLLM batches together)."""
        everything = list(range(len(adapters)))
        if not self.split_mixed or not self._requests:
            return [everything]
        base = [i for i in everything if adapters[i] is None]
        if not base or len(base) == len(everything):
            return [everything]
        return [base, [i for i in everything if adapters[i] is not None]]
