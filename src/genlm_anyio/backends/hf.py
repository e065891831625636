"""The Hugging Face transformers backend, with a prefix KV cache per token and
LoRA adapters (peft) that share forward passes."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checks import positive_int
from . import shared_prefix
from .base import Adapter, Query
from .padding import PaddedBatch, present
from .prefix import PassRow, PrefixCachedLM, model_lock

# peft's name for "no adapter" in a mixed-adapter batch.
_BASE = "__base__"

_INSTANCES = itertools.count()


def _layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def _load_past(kv: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Put the gathered past, ``(layers, batch, heads, length, dim)``, into an empty DynamicCache."""
    for layer in range(keys.shape[0]):
        if hasattr(kv, "layers"):
            # Create the layer with an empty update, then hand it the past as is:
            # the model's own update concatenates it with the new tokens, the one
            # copy that is needed (a plain update would copy it once more).
            kv.update(keys[layer, :, :, :0], values[layer, :, :, :0], layer)
            kv.layers[layer].keys, kv.layers[layer].values = keys[layer], values[layer]
        else:
            kv.update(keys[layer], values[layer], layer)


# The attention function that reads shared prefixes once (backends/shared_prefix.py),
# registered in transformers' attention and mask registries under this name and
# selected for the forward passes that plan shared prefixes.
_SHARED_PREFIX_ATTENTION = "genlm_anyio_shared_prefix"
# Model types whose attention modules call the registry with plain causal attention
# (no sliding window, logit soft-capping, sinks or ALiBi) and expose ``layer_idx``.
_SHARED_PREFIX_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_shared_prefix_pass = threading.local()


@dataclass
class _SharedPrefixPass:
    """What the attention function needs in one forward pass: per group, its rows
    and its prefix's keys and values (``(layers, kv_heads, prefix, dim)`` each), and
    the mask of the rows' own parts."""

    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    mask: torch.Tensor


def _shared_prefix_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    current: _SharedPrefixPass | None = getattr(_shared_prefix_pass, "current", None)
    if current is None:
        raise RuntimeError(f"{_SHARED_PREFIX_ATTENTION} attention runs only inside AsyncTransformer's forward passes")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise RuntimeError(f"{_SHARED_PREFIX_ATTENTION} attention does not implement {name}")
    layer = module.layer_idx
    groups = [(rows, keys[layer], values[layer]) for rows, keys, values in current.groups]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return shared_prefix.attend(query, key, value, current.mask, groups, scale), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None  # the attention function builds its own mask from the pass


def _register_shared_prefix_attention() -> bool:
    """Register the attention function with transformers (once); False where this
    transformers has no attention registry."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(_SHARED_PREFIX_ATTENTION, _shared_prefix_attention)
    AttentionMaskInterface.register(_SHARED_PREFIX_ATTENTION, _no_mask)
    return True


def _reads_shared_prefixes(model: Any) -> bool:
    """Whether ``model``'s attention can be replaced by the shared-prefix attention."""
    config = model.config
    if getattr(config, "model_type", None) not in _SHARED_PREFIX_MODELS:
        return False
    if getattr(config, "use_sliding_window", False) or (
        getattr(config, "sliding_window", None) is not None and config.model_type == "mistral"
    ):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False  # flash or flex attention chosen by the user: keep it
    return _register_shared_prefix_attention()


@contextlib.contextmanager
def _attention_implementation(model: Any, name: str, current: _SharedPrefixPass) -> Iterator[None]:
    """(model lock held) Run ``model``'s attention through ``name`` for one pass."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    _shared_prefix_pass.current = current
    try:
        yield
    finally:
        _shared_prefix_pass.current = None
        config._attn_implementation = before


@contextlib.contextmanager
def _peft_quiet() -> Iterator[None]:
    """Silence peft's warnings about several adapters in one model and about the
    "active" adapter: rows choose their adapter per pass, so neither applies."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted", category=UserWarning)
        yield


def _adapter_names_hook(module: Any, args: tuple, kwargs: dict, names: list[str]) -> tuple[tuple, dict]:
    # peft's LoRA layers route each row of a batch through the adapter named for it.
    kwargs["adapter_names"] = names
    return args, kwargs


def _last_rows_hook(module: Any, args: tuple, kwargs: dict, last: torch.Tensor) -> tuple[tuple, dict]:
    """Give the output head one hidden state per sequence, (batch, 1, hidden): its
    last position, so no logits are made for the other positions."""
    hidden = args[0] if args else kwargs.pop("input")
    rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
    return (rows.unsqueeze(1), *args[1:]), kwargs


class AsyncTransformer(PrefixCachedLM):
    """A transformers causal LM with autobatching and a shared prefix KV cache.

    Extending a cached sequence by one token computes one token; identical
    concurrent requests are computed once; finished results are kept in a
    bounded LRU cache. LoRA adapters (:meth:`add_new_lora`, loaded with peft)
    run in the same forward passes as the base model, each row through its own
    adapter; cached keys, values and results are never shared across adapters.

    Args:
        hf_model: a ``transformers`` causal language model (in eval mode).
        hf_tokenizer: its tokenizer.
        batch_size: most sequences in one batch (genlm-backend's argument; here a
            cap on a round of requests, which is otherwise gathered until no
            more arrive).
        kv_cache_bytes: the byte budget of the KV cache (default 1 GiB).
        logprob_cache_size: most results the output cache keeps (0 disables it).
        logprob_cache_bytes: most bytes the output cache keeps (default 256 MiB;
            each result is one float32 row of ``vocab_size``).
        max_forward_tokens: most new tokens, and most padded positions (rows times
            the longest row), in one forward pass, and the most uncached tokens a
            batch admits (a longer prompt is computed in chunks).
    """

    def __init__(
        self,
        hf_model: Any,
        hf_tokenizer: Any,
        batch_size: int = 128,
        *,
        kv_cache_bytes: int = 1 << 30,
        logprob_cache_size: int = 256,
        logprob_cache_bytes: int = 1 << 28,
        max_forward_tokens: int = 4096,
    ):
        positive_int("batch_size", batch_size)
        self.model = hf_model.eval()
        config = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
        vocab_size = hf_model.get_output_embeddings().weight.shape[0]
        self.device = next(hf_model.parameters()).device
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        super().__init__(
            hf_tokenizer,
            vocab_size,
            (config.num_hidden_layers, heads, head_dim),
            next(hf_model.parameters()).dtype,
            self.device,
            max_batch_size=batch_size,
            kv_cache_bytes=kv_cache_bytes,
            logprob_cache_size=logprob_cache_size,
            logprob_cache_bytes=logprob_cache_bytes,
            max_forward_tokens=max_forward_tokens,
        )
        # transformers 5.2x renamed `past_key_values` to `cache`.
        self._cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
        # A pass hooks the model's modules and adapters load into the model: one lock per model.
        self._lock = model_lock(hf_model)
        # Adapters live in the model, which other instances may share: peft names are per instance.
        self._peft_suffix = f"-genlm{next(_INSTANCES)}"
        self.reads_shared_prefixes = _reads_shared_prefixes(hf_model)
        """Whether forward passes read a prefix shared by several rows once
        (docs/runtime.md); False for models outside the supported attention types."""

    @classmethod
    def from_name(
        cls,
        model_id: str,
        bitsandbytes_opts: dict[str, Any] | None = None,
        hf_opts: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> AsyncTransformer:
        """Load ``model_id`` (a hub id, a local folder, or a ``.gguf`` file) with transformers.

        ``bitsandbytes_opts`` build a ``BitsAndBytesConfig`` (quantization; needs
        bitsandbytes and, for most options, CUDA). ``hf_opts`` go to
        ``from_pretrained`` (``device_map``, ``dtype``, ...); by default the model
        goes to CUDA when it is available. ``kwargs`` go to the constructor.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf_opts = dict(hf_opts or {})
        if bitsandbytes_opts:
            from transformers import BitsAndBytesConfig

            hf_opts["quantization_config"] = BitsAndBytesConfig(**bitsandbytes_opts)
        if "device_map" not in hf_opts and torch.cuda.is_available():
            hf_opts["device_map"] = "cuda"
        path, tok_opts = model_id, {}
        if str(model_id).endswith(".gguf"):
            gguf = Path(model_id)
            path, tok_opts = str(gguf.parent), {"gguf_file": gguf.name}
            hf_opts.setdefault("gguf_file", gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(path, **tok_opts)
        model = AutoModelForCausalLM.from_pretrained(path, **hf_opts)
        return cls(model, tokenizer, **kwargs)

    @property
    def batch_size(self) -> int:
        """Most sequences in one batch (settable)."""
        return self._batcher.max_batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._batcher.max_batch_size = positive_int("batch_size", value)

    # -- LoRA adapters ------------------------------------------------------------
    def _lora_layers(self) -> list[Any]:
        """The model's modules that route rows by adapter name (none until peft
        adapters are loaded, by this instance or another over the same model)."""
        try:
            from peft.tuners.lora import LoraLayer
            from peft.utils.other import AuxiliaryTrainingWrapper
        except ImportError:
            return []
        return [m for m in self.model.modules() if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]

    def _peft_name(self, adapter: Adapter) -> str:
        return adapter.name + self._peft_suffix

    def _load_adapter(self, adapter: Adapter, replaced: Adapter | None) -> None:
        try:
            import peft  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "LoRA adapters on the transformers backend need peft: pip install 'genlm-anyio[lora]'"
            ) from exc
        with self._lock:
            if replaced is not None:
                self._drop_adapter(replaced)
            with _peft_quiet():
                self.model.load_adapter(adapter.path, adapter_name=self._peft_name(adapter))
            # Rows choose their adapter per forward pass; none may be switched off globally.
            self.model.enable_adapters()

    def _delete_adapter(self, adapter: Adapter) -> None:
        with _peft_quiet():
            self.model.delete_adapter(self._peft_name(adapter))

    @contextlib.contextmanager
    def _hooks(self, adapters: Sequence[Adapter | None], last: torch.Tensor) -> Iterator[None]:
        """(lock held) For one forward pass: route row ``b`` through ``adapters[b]``,
        and keep only position ``last[b]`` of row ``b`` for the output head."""
        handles = []
        try:
            lora_layers = self._lora_layers()
            if lora_layers:
                names = [_BASE if a is None else self._peft_name(a) for a in adapters]
                hook = partial(_adapter_names_hook, names=names)
                handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in lora_layers]
            head = self.model.get_output_embeddings()
            handles.append(head.register_forward_pre_hook(partial(_last_rows_hook, last=last), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- forward passes ---------------------------------------------------------------
    def _forward_pass(
        self, rows: list[PassRow], past: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from transformers import DynamicCache

        padded = PaddedBatch.of([row.new for row in rows], [len(p) for p in past])
        width, batch = padded.width, len(rows)
        split = shared_prefix.plan(past) if self.reads_shared_prefixes else None
        own = split.own if split is not None else past
        past_len = max(len(p) for p in own)
        if split is not None and batch * self.model.config.num_attention_heads * width * (past_len + width) > (
            shared_prefix.MAX_OWN_SCORES
        ):
            split, own, past_len = None, past, max(len(p) for p in past)

        kv = DynamicCache()
        if past_len:
            keys, values = self.kv_cache.gather(own)
            _load_past(kv, keys, values)
        last = torch.from_numpy(padded.last)
        inputs = {
            "input_ids": torch.from_numpy(padded.tokens).to(self.device),
            "position_ids": torch.from_numpy(padded.positions).to(self.device),
            "use_cache": True,
            self._cache_arg: kv,
        }
        with contextlib.ExitStack() as stack:
            if split is None:
                # Each row's own past (right-padded to past_len), then its new tokens.
                mask = np.concatenate([present([len(o) for o in own], past_len), present(padded.new_lengths, width)], 1)
                inputs["attention_mask"] = torch.from_numpy(mask).to(self.device, torch.long)
            else:
                stack.enter_context(
                    _attention_implementation(self.model, _SHARED_PREFIX_ATTENTION, self._pass(split, width))
                )
            stack.enter_context(self._hooks([row.query.adapter for row in rows], last))
            outputs = self.model(**inputs)
        logits = outputs.logits
        del outputs
        if logits.shape[1] != 1:  # the model bypassed its output-embedding module (and the hook)
            logits = logits[torch.arange(batch), last.to(logits.device)].unsqueeze(1)
        logprobs = torch.log_softmax(logits[:, 0].float(), dim=-1).cpu()
        del logits
        # Per layer (batch, heads, width, dim) -> (batch * width, layers, heads, dim), padding left out.
        index = torch.from_numpy(padded.kept).to(self.device)
        flat = (-1, self.kv_cache.heads, self.kv_cache.head_dim)
        keys, values = (
            torch.stack(
                [
                    _layer_kv(kv, layer)[part][:, :, past_len:].transpose(1, 2).reshape(flat).index_select(0, index)
                    for layer in range(self.kv_cache.layers)
                ],
                dim=1,
            )
            for part in (0, 1)
        )
        return logprobs, keys, values

    def _pass(self, split: shared_prefix.Plan, width: int) -> _SharedPrefixPass:
        """The shared prefixes' keys and values, gathered once per group, and the own parts' mask."""
        groups = []
        for group in split.groups:
            keys, values = self.kv_cache.gather([group.slots])  # (layers, 1, kv_heads, prefix, dim)
            rows = torch.tensor(group.rows, device=self.device)
            groups.append((rows, keys[:, 0], values[:, 0]))
        mask = shared_prefix.own_mask([len(o) for o in split.own], split.own_length, width, self.device)
        return _SharedPrefixPass(groups, mask)

    # -- uncached ---------------------------------------------------------------------
    def _plain_pass(self, query: Query) -> torch.Tensor:
        # The output head sees the last position only, as in the cached path (and
        # in transformers' generate): the head over one row and over all rows are
        # different BLAS kernels, whose float32 results differ by ~1e-5.
        with self._hooks([query.adapter], torch.tensor([len(query.ids) - 1])):
            logits = self.model(torch.tensor([query.ids], device=self.device), use_cache=False).logits[0, -1]
        return torch.log_softmax(logits.float(), dim=-1).cpu()
