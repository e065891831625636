"""Shared fixtures: real models, vocabularies and LoRA adapters from the asset cache
(the helpers the tests import are in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import assets


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    return assets.vocab_dir()


@pytest.fixture(scope="session")
def hf_parts():
    """SmolLM2-135M (float32) and its tokenizer, loaded once for the whole run; tests never change the weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_dir()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


@pytest.fixture
def fresh(llm):
    """The test module's engine ``llm`` (a module fixture) with its caches cleared."""
    llm.clear_cache()
    return llm


@pytest.fixture(scope="session")
def lora_adapters(tmp_path_factory) -> dict[str, str]:
    """LoRA adapters for SmolLM2 (q_proj and v_proj, rank 8), built with peft and
    saved: ``identity`` (peft's initial adapter, equal to the base model) and
    ``shifted`` / ``shifted2`` (random B matrices: each changes the model its own way)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(assets.smollm2_dir(), dtype=torch.float32)
    # peft draws the A matrices from torch's global generator: fix them, whatever ran before.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    root = tmp_path_factory.mktemp("lora")
    paths = {"identity": str(root / "identity")}
    model.save_pretrained(paths["identity"])
    for name, seed in (("shifted", 1), ("shifted2", 2)):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
    return paths
