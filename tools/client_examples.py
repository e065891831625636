"""Run genlm-control's documented examples on genlm-anyio, through the compat switch.

    python -m tools.client_examples [--timeout SECONDS] [--reference] [--list]

The ```python blocks of genlm-control 0.4.1's README.md and docs/*.md are read
from its sdist (fetched from PyPI into the asset cache, never copied here). Each
page becomes one program, its blocks in the page's order inside one
``async def main()`` run by ``asyncio.run``, so top-level ``await`` works and a
block sees the names the blocks above it defined, as a reader of the page would
run them. The program runs under ``python -m genlm_anyio.compat`` with a
timeout, and reports every block on its own line: passed, failed (with the
error's last line), or skipped with its reason.

The only changes made to a block are the offline substitutions (``SUBSTITUTIONS``:
hub model names become the local SmolLM2-135M-Instruct folder, the special tokens
of a substituted model become SmolLM2's) and, where a block uses a name that
``genlm.control`` (or ``genlm.control.sampler``) exports without importing it,
that import; each is shown in the block's line. Not run, and listed as skipped with the reason:

- blocks that are fragments (a placeholder ``...`` or path, or a name that no
  block above defines and neither ``genlm.control`` nor ``genlm.control.sampler``
  exports);
- blocks that need a GPU or a hub-only resource (``NEEDS``);
- blocks that use a name only a skipped or failed block defines;
- blocks identical to one on an earlier page (reported with that block's
  result, counted once).

Exit status: 1 if a block fails that is not in ``KNOWN_FAILURES`` (each listed
with its reason); a known failure that passes is reported so the list only
shrinks. ``--reference`` runs the same programs on genlm-backend (no switch) and
only reports. The last line is ``N passed, M failed``.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import os
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import assets

ROOT = Path(__file__).resolve().parent.parent
SDIST = "genlm-control==0.4.1"
PAGES = (
    "README.md",
    "docs/index.md",
    "docs/getting_started.md",
    "docs/potentials.md",
    "docs/samplers.md",
    "docs/performance.md",
)

# Offline substitutions, applied as plain text replacements (longest first).
# Hub models -> the local SmolLM2 folder ({smollm2}); a substituted model's
# special tokens -> SmolLM2's end-of-turn token.
SUBSTITUTIONS = {
    '"openai-community/gpt2"': '"{smollm2}"',
    '"meta-llama/Llama-3.2-1B-Instruct"': '"{smollm2}"',
    '"meta-llama/Llama-3.2-1B"': '"{smollm2}"',
    'eos_byte_strings=[b"<|eom_id|>", b"<|eot_id|>"]': 'eos_byte_strings=[b"<|im_end|>"]',
}

# Blocks that cannot run here, found by a string they contain -> the reason.
NEEDS = {
    'backend="vllm"': "needs a GPU (the vLLM backend)",
    "distilbert-base-uncased-finetuned-sst-2-english": "needs a hub-only model (distilbert sentiment classifier)",
    "/path/to/adapter": "fragment: placeholder adapter path",
    "genlm.eval.domains": "needs genlm-eval (not installed with genlm-control) and hub-only Llama-3.2-3B",
}

# Blocks expected to fail on genlm-anyio -> the reason (page#block, 1-based).
KNOWN_FAILURES: dict[str, str] = {
    "README.md#2": "transformers 5's apply_chat_template(tokenize=True) returns a BatchEncoding (a dict), "
    "not the list of ids the README assigns to llm.prompt_ids; genlm-backend fails the same way (--reference)",
}

# Packages whose ``__all__`` names a block may use without importing them.
EXPORTING = {"genlm/control/__init__.py": "genlm.control", "genlm/control/sampler/__init__.py": "genlm.control.sampler"}

MARK = "@@example"


@dataclass
class Block:
    page: str
    index: int  # 1-based among the page's python blocks
    code: str
    binds: set[str] = field(default_factory=set)
    uses: set[str] = field(default_factory=set)
    deps: list[int] = field(default_factory=list)  # indices of earlier blocks of the page it needs
    skip: str | None = None
    imports: dict[str, str] = field(default_factory=dict)  # names added as `from MODULE import NAME`
    substituted: list[str] = field(default_factory=list)
    same_as: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page}#{self.index}"


def read_pages(archive: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The documentation pages of the sdist, and {name: module} for the names its packages export."""
    pages: dict[str, str] = {}
    exports: dict[str, str] = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            rel = member.name.split("/", 1)[-1]
            if rel in PAGES:
                pages[rel] = tar.extractfile(member).read().decode("utf-8")
            elif rel in EXPORTING:
                module = EXPORTING[rel]
                for node in ast.walk(ast.parse(tar.extractfile(member).read().decode("utf-8"))):
                    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                        for name in ast.literal_eval(node.value):
                            exports.setdefault(name, module)
    return {p: pages[p] for p in PAGES if p in pages}, exports


def python_blocks(markdown: str) -> list[str]:
    """The ```python fenced blocks of a page, dedented, in order."""
    blocks, current, indent = [], None, ""
    for line in markdown.splitlines():
        stripped = line.strip()
        if current is None:
            if stripped.startswith("```python"):
                current, indent = [], line[: len(line) - len(line.lstrip())]
        elif stripped.startswith("```"):
            blocks.append(textwrap.dedent("\n".join(current)).strip() + "\n")
            current = None
        else:
            current.append(line[len(indent) :] if line.startswith(indent) else line)
    return blocks


def _names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(names bound anywhere in ``tree``, names it reads)."""
    binds, uses = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (uses if isinstance(node.ctx, ast.Load) else binds).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            binds.add(node.name)
        elif isinstance(node, ast.arg):
            binds.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            binds.update((a.asname or a.name).split(".")[0] for a in node.names)
    return binds, uses


def analyse(page: str, codes: list[str], exports: dict[str, str], seen: dict[str, Block]) -> list[Block]:
    """Blocks of one page with their substitutions, dependencies and skip reasons."""
    blocks: list[Block] = []
    smollm2 = str(assets.smollm2_dir())
    for i, code in enumerate(codes, 1):
        block = Block(page, i, code)
        blocks.append(block)
        for old, new in sorted(SUBSTITUTIONS.items(), key=lambda kv: -len(kv[0])):
            if old in block.code:
                block.code = block.code.replace(old, new.format(smollm2=smollm2))
                block.substituted.append(old)
        if code in seen:
            block.same_as = seen[code].id
            continue
        seen[code] = block
        block.skip = next((why for marker, why in NEEDS.items() if marker in code), None)
        try:
            tree = ast.parse(block.code)
        except SyntaxError as e:
            block.skip = block.skip or f"fragment: does not parse ({e.msg})"
            continue
        if any(isinstance(n, ast.Constant) and n.value is Ellipsis for n in ast.walk(tree)):
            block.skip = block.skip or "fragment: `...` placeholder"
        block.binds, uses = _names(tree)
        block.uses = uses - block.binds - set(dir(builtins))
        missing = []
        for name in sorted(block.uses):
            definer = next((b for b in reversed(blocks[:-1]) if name in b.binds), None)
            if definer is not None:
                block.deps.append(definer.index)
            elif name in exports:
                block.imports[name] = exports[name]
            else:
                missing.append(name)
        if missing:
            block.skip = block.skip or f"fragment: uses {', '.join(missing)}, defined nowhere above"
        skipped_deps = sorted({d for d in block.deps if blocks[d - 1].skip})
        if skipped_deps:
            block.skip = block.skip or f"uses names only skipped block(s) #{', #'.join(map(str, skipped_deps))} define"
    return blocks


def import_lines(block: Block) -> str:
    """The imports added to ``block`` for the exported names it uses without importing."""
    modules = sorted(set(block.imports.values()))
    return "".join(
        f"from {m} import {', '.join(sorted(n for n, mm in block.imports.items() if mm == m))}\n" for m in modules
    )


def program(blocks: list[Block]) -> str:
    """One page as a program: its blocks in order inside ``async def main()``, each reported."""
    lines = ["import asyncio, sys, traceback", "", "", "async def main():", "    _ok = set()"]
    for b in blocks:
        if b.skip or b.same_as:
            continue
        body = b.code
        if b.imports:
            body = import_lines(b) + body
        deps = sorted(set(b.deps))
        lines += [
            f"    if not {set(deps) or 'set()'} <= _ok:",
            f"        print({MARK!r}, {b.index}, 'skipped', 'uses a name only a block that did not pass defines', flush=True)",
            "    else:",
            f"        print({MARK!r}, {b.index}, 'started', flush=True)",
            "        try:",
            textwrap.indent(body, " " * 12).rstrip(),
            f"            _ok.add({b.index})",
            f"            print({MARK!r}, {b.index}, 'passed', flush=True)",
            "        except Exception as e:",
            "            traceback.print_exc()",
            "            last = (traceback.format_exception_only(e)[-1].strip() or type(e).__name__).replace(chr(10), ' ')",
            f"            print({MARK!r}, {b.index}, 'failed', last, flush=True)",
        ]
    lines += ["", "", "asyncio.run(main())", ""]
    return "\n".join(lines)


def run_page(blocks: list[Block], timeout: float, reference: bool, logs: Path) -> dict[int, tuple[str, str]]:
    """Run one page's program; {block index: (status, detail)} for the blocks it ran."""
    source = program(blocks)
    page = blocks[0].page
    script = logs / (page.replace("/", "_") + ".py")
    script.write_text(source, encoding="utf-8")
    entry = [sys.executable] if reference else [sys.executable, "-m", "genlm_anyio.compat"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = script.with_suffix(".log")
    try:
        proc = subprocess.run([*entry, str(script)], cwd=logs, env=env, capture_output=True, text=True, timeout=timeout)
        out, err, tail = proc.stdout, proc.stderr, (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        tail = f"timed out after {timeout:.0f} s"
    log.write_text(out + "\n--- stderr ---\n" + err, encoding="utf-8")
    results: dict[int, tuple[str, str]] = {}
    for line in out.splitlines():
        if line.startswith(MARK + " "):
            _, index, status, *rest = line.split(" ", 3)
            results[int(index)] = (status, rest[0] if rest else "")
    for index, (status, _) in results.items():
        if status == "started":  # the process died (or timed out) inside this block
            results[index] = ("failed", tail)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=240, help="seconds allowed for one page's program")
    parser.add_argument("--reference", action="store_true", help="run on genlm-backend itself (no switch); report only")
    parser.add_argument("--list", action="store_true", help="show what would run, run nothing")
    parser.add_argument("pages", nargs="*", help=f"only these pages (default: all of {', '.join(PAGES)})")
    args = parser.parse_args()

    unknown = [p for p in args.pages if p not in PAGES]
    if unknown:
        parser.error(f"unknown page(s) {unknown}; choose from {list(PAGES)}")
    pages, exports = read_pages(assets.download(SDIST, source=True))
    seen: dict[str, Block] = {}
    by_page = {page: analyse(page, python_blocks(text), exports, seen) for page, text in pages.items()}
    print(
        f"genlm-control 0.4.1 documented examples on {'genlm-backend' if args.reference else 'genlm-anyio'}"
        f" ({sum(map(len, by_page.values()))} python blocks in {len(by_page)} pages)",
        flush=True,
    )

    outcome: dict[str, tuple[str, str]] = {}
    logs = Path(tempfile.mkdtemp(prefix="client-examples-"))
    start = time.perf_counter()
    for page, blocks in by_page.items():
        if args.pages and page not in args.pages:
            continue
        runnable = [b for b in blocks if not b.skip and not b.same_as]
        ran = run_page(blocks, args.timeout, args.reference, logs) if runnable and not args.list else {}
        for b in blocks:
            if b.same_as:  # reported, counted once (as its first occurrence)
                first = outcome.get(b.same_as, ("not run",))[0]
                status, detail = "same", f"same code as {b.same_as} ({first})"
            elif b.skip:
                status, detail = "skipped", b.skip
            elif args.list:
                status, detail = "would run", ""
            else:
                status, detail = ran.get(b.index, ("failed", "not reached (the program stopped before it)"))
            outcome[b.id] = (status, detail)
            ran_code = not (b.skip or b.same_as)
            notes = [f"substituted {', '.join(b.substituted)}"] if b.substituted and ran_code else []
            notes += ["+ " + import_lines(b).strip().replace("\n", "; ")] if b.imports and ran_code else []
            if status == "failed" and b.id in KNOWN_FAILURES:
                notes.append(f"known: {KNOWN_FAILURES[b.id]}")
            extra = f" [{'; '.join(notes)}]" if notes else ""
            print(f"{b.id:30} {status}{': ' + detail if detail else ''}{extra}", flush=True)

    passed = sum(s == "passed" for s, _ in outcome.values())
    failed = [i for i, (s, _) in outcome.items() if s == "failed"]
    skipped = sum(s == "skipped" for s, _ in outcome.values())
    new = [i for i in failed if i not in KNOWN_FAILURES]
    fixed = [i for i in KNOWN_FAILURES if outcome.get(i, ("",))[0] == "passed"]
    for i in fixed:
        print(f"now passes (remove it from KNOWN_FAILURES): {i}")
    if not args.list:
        print(f"logs: {logs} ({time.perf_counter() - start:.0f} s)")
    if new and not args.reference:
        print(f"new failures: {', '.join(new)}")
    print(f"{passed} passed, {len(failed)} failed, {skipped} skipped")
    return 1 if new and not args.reference and not args.list else 0


if __name__ == "__main__":
    sys.exit(main())
