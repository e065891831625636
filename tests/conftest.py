"""Shared fixtures: real tokenizers and vocabularies from the asset cache."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import assets  # noqa: E402

# Families whose tokenizer adds a SentencePiece dummy-prefix space at the start of a text.
DUMMY_PREFIX = {"llama-spm", "phi-3", "gemma-4"}


@functools.lru_cache(maxsize=None)
def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.tokenizer_dir(name))


@functools.lru_cache(maxsize=None)
def vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test strings for ``ggml-vocab-{name}.gguf`` with their reference ids."""
    base = assets.vocab_dir() / f"ggml-vocab-{name}.gguf"
    inputs = base.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = base.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    if inputs and inputs[-1] == "":
        inputs.pop()
    ids = [[int(t) for t in line.split()] for line in outputs[: len(inputs)]]
    assert len(ids) == len(inputs), f"{name}: {len(inputs)} strings, {len(ids)} id lines"
    return list(zip(inputs, ids))


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    return assets.vocab_dir()
