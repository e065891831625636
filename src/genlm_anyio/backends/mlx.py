"""The MLX backend: an mlx-lm model (Apple silicon, or ``mlx[cpu]`` on Linux) with
the transformers backend's prefix KV cache, batching and LoRA adapters.

mlx is imported when a model is made, never when this module is imported: the
class exists (for genlm-backend's import paths) where mlx is not installed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checks import check_int, positive_int
from .base import Adapter, Query
from .padding import PaddedBatch, present
from .prefix import PassRow, PrefixCachedLM, model_lock

_INSTALL = "the MLX backend needs mlx and mlx-lm: pip install 'genlm-anyio[mlx]' (on Linux also 'mlx[cpu]')"


def _mlx() -> Any:
    """``mlx.core``, or ImportError saying how to install it."""
    try:
        import mlx.core as mx
        import mlx_lm  # noqa: F401
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    return mx


# -- moving arrays between mlx and torch (both in host memory) ---------------------------------
def _to_torch(a: Any) -> torch.Tensor:
    mx = _mlx()
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: move the bits
        return torch.from_numpy(np.array(a.view(mx.uint16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def _to_mlx(t: torch.Tensor) -> Any:
    mx = _mlx()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.uint16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())


def _log_softmax(logits: Any) -> torch.Tensor:
    """float32 log-probabilities of mlx ``logits`` along the last axis, normalized by
    torch: mlx's CPU ``logsumexp`` is off by up to ~1e-4 over a 49k vocabulary."""
    return torch.log_softmax(_to_torch(logits).float(), dim=-1)


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _PassLayerCache:
    """One attention layer's cache for one forward pass, in mlx-lm's cache protocol.

    Row ``b`` has ``lengths[b]`` cached tokens (its past, right-padded to the
    longest) and then its new tokens (right-padded too): the rotary offset is per
    row, and the mask lets each new token see its row's past and the new tokens up
    to itself. The keys and values of the new tokens are kept for the prefix cache.
    """

    def __init__(self, past: tuple[Any, Any] | None, offset: Any, mask: Any):
        self.past = past
        self.offset = offset
        self.mask = mask
        self.new: tuple[Any, ...] = ()  # (keys, values) once the layer has run

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        mx = _mlx()
        self.new = (keys, values)
        if self.past is None:
            return keys, values
        return mx.concatenate([self.past[0], keys], axis=2), mx.concatenate([self.past[1], values], axis=2)

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> Any:
        if return_array and (self.mask is None or isinstance(self.mask, str)):
            from mlx_lm.models.base import create_causal_mask

            return create_causal_mask(n, self.offset)  # rows alike: the offset is an int
        return self.mask


class _AdapterRows:
    """Which rows of the running forward pass go through which adapter: serial ->
    a ``(batch, 1, 1)`` 0/1 row mask, or None where every row does."""

    def __init__(self) -> None:
        self.masks: dict[int, Any] = {}


@functools.cache
def _lora_linear_class() -> type:
    """The module that replaces a linear layer some adapter targets (made on first
    use, as it subclasses mlx's ``nn.Module``)."""
    import mlx.nn as nn

    class RoutedLoRALinear(nn.Module):
        """A linear layer plus each registered adapter's low-rank update, applied to
        the rows of a forward pass that use that adapter (mlx-lm's LoRALinear
        computes one adapter for the whole batch)."""

        def __init__(self, base: Any, adapter_rows: _AdapterRows):
            super().__init__()
            self.base = base
            # Plain attributes, not module state: they are not the model's parameters.
            object.__setattr__(self, "adapter_rows", adapter_rows)
            object.__setattr__(self, "adapters", {})

        def __call__(self, x: Any) -> Any:
            y = self.base(x)
            for serial, rows in self.adapter_rows.masks.items():
                low_rank = self.adapters.get(serial)
                if low_rank is None:
                    continue
                a, b, scale = low_rank
                delta = ((x @ a) @ b) * scale
                y = y + (delta if rows is None else delta * rows).astype(y.dtype)
            return y

    return RoutedLoRALinear


def _read_adapter(path: Path) -> dict[str, tuple[Any, Any, float]]:
    """The low-rank updates of a LoRA adapter folder, saved by peft or by mlx-lm:
    module name (mlx-lm's, e.g. ``model.layers.0.self_attn.q_proj``) ->
    ``(a, b, scale)`` with ``a`` of shape ``(in, rank)`` and ``b`` ``(rank, out)``."""
    mx = _mlx()
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"lora_path {str(path)!r} holds no adapter_config.json")
    config = json.loads(config_file.read_text())
    updates: dict[str, dict[str, Any]] = {}
    if "lora_parameters" in config:  # mlx-lm's format
        kind = config.get("fine_tune_type", "lora")
        if kind != "lora":
            raise ValueError(f"lora_path {str(path)!r}: fine_tune_type {kind!r} is not supported, only 'lora'")
        scale = float(config["lora_parameters"]["scale"])
        for key, array in mx.load(str(path / "adapters.safetensors")).items():
            module, _, part = key.rpartition(".")
            if part in ("lora_a", "lora_b"):
                updates.setdefault(module, {})[part[-1]] = array
    elif str(config.get("peft_type", "")).upper() == "LORA":  # peft's format
        if config.get("use_dora"):
            raise ValueError(f"lora_path {str(path)!r}: DoRA adapters are not supported")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ValueError(f"lora_path {str(path)!r}: per-module ranks or alphas are not supported")
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", rank))
        scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
        weights_file = path / "adapter_model.safetensors"
        if not weights_file.is_file():
            raise ValueError(f"lora_path {str(path)!r} holds no adapter_model.safetensors")
        for key, array in mx.load(str(weights_file)).items():
            # base_model.model.<module>.lora_A[.<adapter name>].weight; peft keeps (out, in) like torch.
            parts = key.removeprefix("base_model.model.").split(".")
            for i, part in enumerate(parts):
                if part in ("lora_A", "lora_B"):
                    updates.setdefault(".".join(parts[:i]), {})[part[-1].lower()] = array.T
                    break
    else:
        raise ValueError(f"lora_path {str(path)!r} is neither a peft LoRA adapter nor an mlx-lm one")
    incomplete = [m for m, ab in updates.items() if set(ab) != {"a", "b"}]
    if not updates or incomplete:
        raise ValueError(f"lora_path {str(path)!r}: no complete LoRA weights (modules lacking A or B: {incomplete})")
    return {module: (ab["a"], ab["b"], scale) for module, ab in updates.items()}


def _rope_config(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 saves the rotary settings under ``rope_parameters``, where
    mlx-lm's older architectures (llama among them) read ``rope_theta`` and
    ``rope_scaling``; without them they would silently use a default theta."""
    rope = config.get("rope_parameters")
    if "rope_theta" in config or not isinstance(rope, dict) or "rope_theta" not in rope:
        return {}
    scaling = None if rope.get("rope_type", "default") == "default" else rope
    return {"rope_theta": rope["rope_theta"], "rope_scaling": scaling}


class AsyncMlxLM(PrefixCachedLM):
    """An mlx-lm language model with autobatching and a shared prefix KV cache.

    It behaves as :class:`~genlm_anyio.AsyncTransformer` does: concurrent requests
    run as one batched forward pass (rows of different lengths right-padded, each
    with its own rotary offset and mask); extending a cached sequence by one token
    computes one token; identical requests are computed once; results are
    float32 log-probabilities over the whole vocabulary. LoRA adapters
    (:meth:`add_new_lora`: a folder saved by peft or by mlx-lm) run in the same
    forward passes as the base model, each row through its own adapter.

    Supported models are those whose every layer caches keys and values in
    mlx-lm's plain ``KVCache`` (no sliding windows or state-space layers).

    Args:
        mlx_lm_model: a model from ``mlx_lm.load`` / ``mlx_lm.utils.load_model``.
        tokenizer: its Hugging Face tokenizer (or mlx-lm's wrapper of it).
        prefill_step_size: most new (uncached) tokens one forward pass computes,
            and most padded positions (rows times the longest row): a batch is
            admitted by its requests' uncached tokens up to this many, larger
            batches are split into several passes, and a prompt longer than
            this is computed in chunks (genlm-backend's argument, whose prefill
            steps it also sizes).
        cache_size: most results the output cache keeps (0 disables it).
        batch_size: most sequences in one batch.
        kv_cache_bytes: the byte budget of the KV cache (default 1 GiB).
        logprob_cache_bytes: most bytes the output cache keeps (default 256 MiB).
    """

    def __init__(
        self,
        mlx_lm_model: Any,
        tokenizer: Any,
        prefill_step_size: int = 2048,
        cache_size: int = 256,
        *,
        batch_size: int = 128,
        kv_cache_bytes: int = 1 << 30,
        logprob_cache_bytes: int = 1 << 28,
    ):
        mx = _mlx()
        from mlx_lm.models.cache import KVCache, make_prompt_cache
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        positive_int("prefill_step_size", prefill_step_size)
        positive_int("batch_size", batch_size)
        check_int("cache_size", cache_size, minimum=0)
        kinds = {type(c).__name__ for c in make_prompt_cache(mlx_lm_model) if type(c) is not KVCache}
        if kinds:
            raise ValueError(
                f"AsyncMlxLM supports models whose every layer uses mlx-lm's KVCache; this one uses {sorted(kinds)}"
            )
        self.mlx_lm_model = mlx_lm_model
        self.mlx_lm_model.eval()
        # One token through the model tells the cache's layout and the vocabulary's size.
        probe = [_PassLayerCache(None, 0, None) for _ in make_prompt_cache(mlx_lm_model)]
        logits = mlx_lm_model(mx.array([[0]], mx.int32), cache=probe)
        keys = probe[0].new[0]
        mx.eval(logits, keys)
        dtype = _TORCH_DTYPES.get(str(keys.dtype).removeprefix("mlx.core."))
        if dtype is None:
            raise ValueError(f"the model's keys are {keys.dtype}; AsyncMlxLM caches float32, float16 or bfloat16")
        super().__init__(
            tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer,
            int(logits.shape[-1]),
            (len(probe), int(keys.shape[1]), int(keys.shape[3])),
            dtype,
            torch.device("cpu"),
            max_batch_size=batch_size,
            kv_cache_bytes=kv_cache_bytes,
            logprob_cache_size=cache_size,
            logprob_cache_bytes=logprob_cache_bytes,
            max_forward_tokens=prefill_step_size,
        )
        self.prefill_step_size = prefill_step_size
        # Instances over one model share the adapters' modules patched into it.
        self._lock = model_lock(mlx_lm_model)
        self._adapter_rows = _AdapterRows()
        self._lora_modules: dict[str, Any] = {}  # module name -> its RoutedLoRALinear
        self._head = self._find_head()

    @classmethod
    def from_name(cls, model_name: str, **kwargs: Any) -> AsyncMlxLM:
        """Load ``model_name`` (a local folder or a hub id of safetensors weights,
        in transformers' or mlx-lm's layout) with mlx-lm; ``kwargs`` go to the
        constructor."""
        _mlx()
        from mlx_lm.utils import load_model
        from transformers import AutoTokenizer

        path = Path(model_name)
        if not path.is_dir():
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model_name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        config = json.loads((path / "config.json").read_text())
        model, _ = load_model(path, model_config=_rope_config(config))
        return cls(model, AutoTokenizer.from_pretrained(path), **kwargs)

    # -- LoRA adapters ------------------------------------------------------------
    def _load_adapter(self, adapter: Adapter, replaced: Adapter | None) -> None:
        mx = _mlx()
        updates = _read_adapter(Path(adapter.path))
        modules = dict(self.mlx_lm_model.named_modules())
        for name, (a, b, _) in updates.items():
            module = self._lora_modules[name] if name in self._lora_modules else modules.get(name)
            if module is None:
                raise ValueError(f"lora_path {adapter.path!r}: the model has no module {name!r}")
            linear = getattr(module, "base", module)
            weight = getattr(linear, "weight", None)
            if weight is None or weight.ndim != 2:
                raise ValueError(f"lora_path {adapter.path!r}: module {name!r} is not a linear layer")
            # A quantized layer packs 32 // bits weights into each uint32.
            dims = (weight.shape[1] * 32 // getattr(linear, "bits", 32), weight.shape[0])
            if (a.shape[0], b.shape[1]) != dims or a.shape[1] != b.shape[0]:
                raise ValueError(
                    f"lora_path {adapter.path!r}: {name!r} maps {dims[0]} -> {dims[1]}, "
                    f"the adapter {a.shape[0]} -> {b.shape[1]} (rank {a.shape[1]}/{b.shape[0]})"
                )
        with self._lock:
            if replaced is not None:
                self._drop_adapter(replaced)
            for name, (a, b, scale) in updates.items():
                routed = self._lora_modules.get(name)
                if routed is None:
                    routed = _lora_linear_class()(modules[name], self._adapter_rows)
                    self._replace_module(name, routed)
                    self._lora_modules[name] = routed
                dtype = routed.base.weight.dtype if routed.base.weight.dtype != mx.uint32 else mx.float32
                a, b = a.astype(dtype), b.astype(dtype)
                mx.eval(a, b)
                routed.adapters[adapter.serial] = (a, b, scale)

    def _replace_module(self, name: str, module: Any) -> None:
        *parents, last = name.split(".")
        owner = self.mlx_lm_model
        for part in parents:
            owner = owner[int(part)] if isinstance(owner, list) else getattr(owner, part)
        if isinstance(owner, list):
            owner[int(last)] = module
        else:
            setattr(owner, last, module)

    def _delete_adapter(self, adapter: Adapter) -> None:
        for routed in self._lora_modules.values():
            routed.adapters.pop(adapter.serial, None)

    def _route(self, adapters: Sequence[Adapter | None]) -> None:
        """(lock held) Send each row of the next forward pass through its adapter."""
        mx = _mlx()
        serials = np.array([0 if a is None else a.serial for a in adapters])
        self._adapter_rows.masks = {
            int(s): None if (serials == s).all() else mx.array((serials == s).astype(np.float32)).reshape(-1, 1, 1)
            for s in set(serials.tolist()) - {0}
        }

    # -- forward passes ---------------------------------------------------------------
    def _run_model(
        self, tokens: Any, caches: list[Any] | None, last: list[int], adapters: Sequence[Adapter | None]
    ) -> Any:
        """Logits ``(batch, vocab)`` of position ``last[b]`` of each row, each row under its adapter."""
        mx = _mlx()
        self._route(adapters)
        try:
            rows = mx.arange(len(last)), mx.array(last)
            if self._head is None:
                return self.mlx_lm_model(tokens, cache=caches)[rows]
            hidden = self.mlx_lm_model.model(tokens, cache=caches)
            return self._head(hidden[rows][:, None])[:, 0]
        finally:
            self._adapter_rows.masks = {}

    def _find_head(self) -> Any:
        """The output head, run apart from the model on each row's last position, so that
        no logits are made for the other positions: ``model.lm_head``, or the tied
        embedding, where the model's own output equals it (not where the model
        scales or caps its logits); None otherwise."""
        mx = _mlx()
        model = self.mlx_lm_model
        inner = getattr(model, "model", None)
        head = getattr(model, "lm_head", None)
        if head is None:
            head = getattr(getattr(inner, "embed_tokens", None), "as_linear", None)
        if inner is None or head is None:
            return None
        tokens = mx.array([[1, 2, 3]], mx.int32)
        try:
            apart = head(inner(tokens))
        except (TypeError, ValueError):  # another structure
            return None
        whole = model(tokens)
        return head if apart.shape == whole.shape and mx.allclose(apart, whole, rtol=1e-5, atol=1e-5).item() else None

    def _forward_pass(
        self, rows: list[PassRow], past: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mx = _mlx()
        padded = PaddedBatch.of([row.new for row in rows], [len(p) for p in past])
        batch, width, past_len = len(rows), padded.width, max(len(p) for p in past)
        if padded.aligned:
            # Rows alike (a lone request, or particles in step): the model's own causal mask.
            offset: Any = past_len
            mask: Any = "causal" if width > 1 else None
        else:
            offset = mx.array(padded.past_lengths.astype(np.int32))
            grid = np.zeros((batch, 1, width, past_len + width), dtype=bool)
            grid[:, 0, :, :past_len] = present(padded.past_lengths, past_len)[:, None, :]
            grid[:, 0, :, past_len:] = np.tri(width, dtype=bool)
            mask = mx.array(grid)
        layers = self.kv_cache.layers
        if past_len:
            keys, values = self.kv_cache.gather(past)
            keys, values = _to_mlx(keys), _to_mlx(values)
            caches = [_PassLayerCache((keys[i], values[i]), offset, mask) for i in range(layers)]
        else:
            caches = [_PassLayerCache(None, offset, mask) for _ in range(layers)]
        last = self._run_model(
            mx.array(padded.tokens.astype(np.int32)), caches, padded.last.tolist(), [row.query.adapter for row in rows]
        ).astype(mx.float32)
        # (batch, heads, width, dim) per layer -> (batch * width, layers, heads, dim), padding left out.
        kept = mx.array(padded.kept.astype(np.int32))
        new_kv = []
        for part in (0, 1):
            stacked = mx.stack([c.new[part] for c in caches], axis=1)  # (batch, layers, heads, width, dim)
            flat = stacked.transpose(0, 3, 1, 2, 4).reshape(batch * width, layers, self.kv_cache.heads, -1)
            new_kv.append(flat[kept])
        mx.eval(last, *new_kv)
        return _log_softmax(last), _to_torch(new_kv[0]), _to_torch(new_kv[1])

    def _plain_pass(self, query: Query) -> torch.Tensor:
        mx = _mlx()
        # The head sees the last position only, as in the cached path.
        logits = self._run_model(mx.array([query.ids], mx.int32), None, [len(query.ids) - 1], [query.adapter])
        mx.eval(logits)
        return _log_softmax(logits[0])

    def clear_cache(self) -> None:
        """Drop the KV cache, the output cache and mlx's buffer cache."""
        super().clear_cache()
        _mlx().clear_cache()
