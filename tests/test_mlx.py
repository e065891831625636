"""The MLX backend (mlx-lm, on mlx's CPU device here) on the real SmolLM2-135M
model: the in-process engines' contract (tests/prefix_engines.py), and what is the
MLX engine's own: agreement with transformers, its separate output head, its
constructor's arguments, loading by name, LoRA adapters (peft's and mlx-lm's formats)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import anyio
import pytest
import torch
from prefix_engines import TEXTS, PrefixEngineContract, assert_matches_reference, prompt, put
from references import transformers_logprobs

from genlm_anyio import AsyncMlxLM, load_model_by_name
from genlm_anyio.compat import legacy
from tools import assets

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'genlm-anyio[mlx]')")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install 'genlm-anyio[mlx]')")

# Loads SmolLM2's weights: not in the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow

PROB_TOL = 1e-3  # MLX against transformers, in probability
# MLX against transformers, in log-probability. Both run float32 with their own
# kernels: on the ids [1, 2, 3] each is 3.3e-4 to 3.7e-4 from a float64 forward
# pass, in opposite directions, so 7.1e-4 from each other (most rows: under 2e-4).
MLX_TOL = 1.5e-3


@pytest.fixture(scope="module")
def llm():
    with AsyncMlxLM.from_name(str(assets.smollm2_dir())) as lm:
        yield lm


@pytest.fixture
def make(llm):
    """Another engine over the module's mlx-lm model."""
    return lambda **kwargs: AsyncMlxLM(llm.mlx_lm_model, llm.tokenizer, **kwargs)


class TestPrefixEngineContract(PrefixEngineContract):
    """The in-process engines' shared tests, on the MLX engine."""

    output_cache_size_arg = "cache_size"  # genlm-backend's AsyncMlxLM's name
    tol = MLX_TOL


@pytest.fixture(scope="module")
def reference(hf_parts):
    """Plain transformers on the float32 folder MLX loads: the same weights."""
    return functools.partial(transformers_logprobs, hf_parts[0])


@pytest.fixture(scope="module")
def hf_logprobs(hf_parts):
    """transformers' next-token log-probabilities of one plain forward pass, on a
    float32 model folder (None: SmolLM2's; or another one)."""
    from transformers import AutoModelForCausalLM

    models = {}

    def run(ids, folder=None):
        if folder is None:
            return transformers_logprobs(hf_parts[0], ids)
        if folder not in models:
            models[folder] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return transformers_logprobs(models[folder], ids)

    return run


def assert_close_in_probability(got, want):
    err = (got.exp() - want.exp()).abs().max().item()
    assert err < PROB_TOL, f"max probability difference {err}"


def test_the_model_folder_is_float32_so_both_engines_compute_alike(fresh):
    # transformers' float32 model is the reference: MLX runs the same weights in float32.
    assert json.loads((assets.smollm2_dir() / "config.json").read_text())["dtype"] == "float32"
    assert fresh.kv_cache.dtype == torch.float32


def test_the_output_head_runs_apart_from_the_model(fresh):
    # The output head runs apart from the model, on each row's last position only.
    assert fresh._head is not None


def test_lone_and_batched_requests_agree_with_transformers(fresh, hf_logprobs):
    seqs = [prompt(fresh, t) for t in TEXTS]
    for ids in seqs:
        fresh.clear_cache()
        assert_close_in_probability(fresh.next_token_logprobs_sync(ids), hf_logprobs(ids))
    fresh.clear_cache()
    # Rows of different lengths in one batch, some extending a cached prefix.
    fresh.cache_kv(seqs[0])
    batch = [*seqs, seqs[0] + [100, 200], seqs[1][:3]]
    for ids, got in zip(batch, fresh.batch_next_token_logprobs_sync(batch)):
        assert_close_in_probability(got, hf_logprobs(ids))


def test_bad_constructor_arguments_are_named(llm):
    model, tok = llm.mlx_lm_model, llm.tokenizer
    with pytest.raises(ValueError, match="prefill_step_size"):
        AsyncMlxLM(model, tok, prefill_step_size=0)
    # genlm-backend's timeout and cache_opts, on the class that genlm.backend's name gives.
    with pytest.raises(ValueError, match="timeout"):
        legacy.AsyncMlxLM(model, tok, timeout=-1)
    with pytest.raises(ValueError, match="cache_opts"):
        legacy.AsyncMlxLM(model, tok, cache_opts={"maxbytes": 1})


def test_load_model_by_name_and_genlm_backend_paths_give_the_mlx_class():
    with load_model_by_name(str(assets.smollm2_dir()), backend="mlx", llm_opts={"cache_size": 0}) as lm:
        assert isinstance(lm, AsyncMlxLM)
        lm.next_token_logprobs_sync([1, 2])
        lm.next_token_logprobs_sync([1, 2])
        assert lm.compute_stats.logprob_cache_hits == 0  # cache_size=0 (genlm-backend's argument) disables the cache
    script = (
        "import sys, genlm_anyio, genlm_anyio.llm, genlm_anyio.compat\n"
        "assert 'mlx' not in sys.modules and 'mlx_lm' not in sys.modules, 'mlx imported eagerly'\n"
        "genlm_anyio.compat.install()\n"
        "import genlm.backend.llm, genlm.backend.llm.mlx\n"
        "from genlm_anyio.backends.mlx import AsyncMlxLM\n"
        "assert genlm_anyio.AsyncMlxLM is genlm_anyio.llm.AsyncMlxLM is AsyncMlxLM\n"
        # genlm.backend's name gives the subclass with genlm-backend's leftovers (compat.legacy).
        "from genlm_anyio.compat import legacy\n"
        "assert genlm.backend.llm.AsyncMlxLM is genlm.backend.llm.mlx.AsyncMlxLM is legacy.AsyncMlxLM\n"
        "assert issubclass(legacy.AsyncMlxLM, AsyncMlxLM)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


# -- LoRA ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    """The peft toy adapter, the same adapter in mlx-lm's format, and the model
    with it merged in (transformers' folder)."""
    return assets.smollm2_lora_toy()


def _mlx_lm_format(peft_dir, out_dir):
    """Write the peft adapter at ``peft_dir`` in mlx-lm's adapter format."""
    import mlx.core as mx
    from safetensors.numpy import load_file

    config = json.loads((peft_dir / "adapter_config.json").read_text())
    weights = {}
    for key, array in load_file(str(peft_dir / "adapter_model.safetensors")).items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        part = "lora_a" if ".lora_A." in key else "lora_b"
        weights[f"{module}.{part}"] = mx.array(array.T)
    out_dir.mkdir()
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), weights)
    lora = {"rank": config["r"], "scale": config["lora_alpha"] / config["r"], "dropout": 0.0}
    (out_dir / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 30, "lora_parameters": lora})
    )
    return out_dir


def test_lora_adapters_agree_with_transformers_and_run_beside_the_base_model(fresh, toy, hf_logprobs, tmp_path):
    adapter_dir, merged_dir = toy
    mlx_dir = _mlx_lm_format(adapter_dir, tmp_path / "mlx-adapter")
    fresh.add_new_lora(str(adapter_dir), "toy")
    fresh.add_new_lora(str(mlx_dir), "toy-mlx")
    try:
        assert fresh.loras == {"toy": str(adapter_dir), "toy-mlx": str(mlx_dir)}
        p, other = prompt(fresh), prompt(fresh, TEXTS[1])
        lone = fresh.next_token_logprobs_sync(p, lora_name="toy")
        assert_close_in_probability(lone, hf_logprobs(p, merged_dir))
        assert (lone - fresh.next_token_logprobs_sync(p)).abs().max() > 0.01  # the adapter changes the model
        assert_close_in_probability(fresh.next_token_logprobs_sync(p, lora_name="toy-mlx"), hf_logprobs(p, merged_dir))
        # Base and adapter rows in one forward pass, each row through its own weights.
        code = prompt(fresh, TEXTS[2])
        passes = fresh.compute_stats.forward_passes

        async def mixed():
            out = {}
            async with anyio.create_task_group() as tg:
                tg.start_soon(put, out, "base", fresh.next_token_logprobs(other))
                tg.start_soon(put, out, "toy", fresh.next_token_logprobs(other, lora_name="toy"))
                tg.start_soon(put, out, "toy-code", fresh.next_token_logprobs(code, lora_name="toy"))
            return out

        out = anyio.run(mixed)
        assert fresh.compute_stats.forward_passes - passes == 1
        assert_close_in_probability(out["base"], hf_logprobs(other))
        assert_close_in_probability(out["toy"], hf_logprobs(other, merged_dir))
        assert_close_in_probability(out["toy-code"], hf_logprobs(code, merged_dir))
        # Removing an adapter drops its cached keys and values, and its name.
        in_use = fresh.kv_cache.stats.in_use
        fresh.remove_lora("toy")
        assert fresh.kv_cache.stats.in_use < in_use
        with pytest.raises(ValueError, match="no LoRA adapter is registered as 'toy'"):
            fresh.next_token_logprobs_sync(p, lora_name="toy")
        assert_close_in_probability(fresh.next_token_logprobs_sync(p), hf_logprobs(p))
    finally:
        for name in list(fresh.loras):
            fresh.remove_lora(name)


def test_bad_lora_folders_are_refused_with_the_reason(fresh, reference, tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        fresh.add_new_lora(str(tmp_path), "nothing")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ValueError, match="neither a peft LoRA adapter nor an mlx-lm one"):
        fresh.add_new_lora(str(tmp_path), "prefix")
    import mlx.core as mx

    lora = {"rank": 8, "scale": 1.0, "dropout": 0.0}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"num_layers": 1, "lora_parameters": lora}))
    module = "model.layers.0.self_attn.q_proj"  # 576 -> 576
    for a_in, target, match in (
        (100, module, "maps 576 -> 576, the adapter 100 -> 576"),
        (576, "model.nope", "no module"),
    ):
        weights = {f"{target}.lora_a": mx.zeros((a_in, 8)), f"{target}.lora_b": mx.zeros((8, 576))}
        mx.save_safetensors(str(tmp_path / "adapters.safetensors"), weights)
        with pytest.raises(ValueError, match=match):
            fresh.add_new_lora(str(tmp_path), "wrong")
    assert fresh.loras == {}
    assert_matches_reference(reference, [[1, 2, 3]], [fresh.next_token_logprobs_sync([1, 2, 3])], MLX_TOL)
