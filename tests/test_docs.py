"""Every ```python block of the documentation (docs/**/*.md and README.md) runs.

Conventions, which docs/index.md states for readers:

- each block is a whole program, run on its own in a fresh interpreter (in a
  scratch directory, with a timeout);
- the hub id ``HuggingFaceTB/SmolLM2-135M-Instruct`` stands for the local copy of
  that model the tests use (tools/assets.py), and the scratch directory of a
  block that names its GGUF file, ``SmolLM2-135M-Instruct.Q4_1.gguf``, holds it;
- a block that cannot run here is preceded by ``<!-- skip: REASON -->`` (the
  reason is required, and shown as the skip's reason).

Blocks that load model weights, the GGUF file or a transformers tokenizer are
marked ``slow``; the rest run in the fast tier, which downloads no weights.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools import assets

ROOT = Path(__file__).resolve().parent.parent
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_NAME = Path(assets.SMOLLM2_GGUF).name
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)(?P<attrs>.*)$")
SKIP = re.compile(r"^\s*<!--\s*skip:(?P<reason>.*?)-->\s*$")
# What loads model weights (the mock model reads only a tokenizer).
LOADS_WEIGHTS = re.compile(
    rf"load_model_by_name|AsyncTransformer|AsyncVirtualLM|AutoModel|AutoTokenizer|from_name|{re.escape(GGUF_NAME)}"
)


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None  # the reason, for a block marked to be left out

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    """The ```python blocks of ``page``, in order (blocks inside other fences are text, not code)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    previous = ""  # the last non-blank line before the current one
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            if lines[i].strip():
                previous = lines[i]
            i += 1
            continue
        fence, start = opening["fence"], i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if opening["lang"] in ("python", "py"):
            marker = SKIP.match(previous)
            if marker is not None and not marker["reason"].strip():
                raise ValueError(f"{page}:{start + 1}: a skip marker needs a reason")
            code = textwrap.dedent("\n".join(body)) + "\n"
            blocks.append(Block(page, start + 1, code, marker["reason"].strip() if marker else None))
        previous = lines[i - 1] if i - 1 < len(lines) else ""
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]


def _param(block: Block):
    marks = [pytest.mark.slow] if LOADS_WEIGHTS.search(block.code) else []
    if block.skip:
        marks.append(pytest.mark.skip(reason=block.skip))
    return pytest.param(block, marks=marks, id=block.id)


def test_every_python_fence_is_found():
    """The parser sees every ```python fence the pages have (so none goes untested)."""
    for page in PAGES:
        opened = sum(
            1 for line in page.read_text(encoding="utf-8").splitlines() if re.match(r"^\s*```+\s*py(thon)?\b", line)
        )
        assert opened == sum(1 for block in BLOCKS if block.page == page), page


def test_skips_are_few():
    skipped = [block.id for block in BLOCKS if block.skip]
    assert len(skipped) <= len(BLOCKS) // 3, skipped


@pytest.mark.parametrize("block", [_param(block) for block in BLOCKS])
def test_docs_example_runs(block: Block, tmp_path: Path):
    # The assets are fetched only for a block that names them (the fast tier fetches no weights).
    code = block.code.replace(HUB_ID, str(assets.smollm2_dir())) if HUB_ID in block.code else block.code
    if GGUF_NAME in block.code:
        (tmp_path / GGUF_NAME).symlink_to(assets.smollm2_gguf())
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, f"{block.id} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"


def test_the_trie_figure_is_drawn_from_the_current_trie(tmp_path: Path):
    """docs/img/trie.svg is what scripts/trie_figure.py draws from the Rust trie today."""
    out = tmp_path / "trie.svg"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "trie_figure.py"), str(out)], check=True, timeout=120)
    assert out.read_text(encoding="utf-8") == (ROOT / "docs" / "img" / "trie.svg").read_text(encoding="utf-8")
