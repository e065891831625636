"""Run our users' own test suites on genlm-anyio, through the compat switch.

    python scripts/client_suites.py [SUITE ...] [--reference] [--update-known]

SUITE is one of ``genlm-backend``, ``genlm-control``, ``genlm-bytes`` (default:
all). Each suite's released sdist is fetched from PyPI into the asset cache and
unpacked into a fresh work folder; its tests then run under
``python -m genlm_anyio.compat -m pytest``, so every ``import genlm.backend``
in them (and in genlm-control / genlm-bytes themselves) gets genlm-anyio.

The tests name hub models and tokenizers, which cannot be fetched here. The
work copy is rewritten on the fly (never in this repository): a hub model
becomes the local SmolLM2-135M folder, a hub tokenizer the closest local
tokenizer (see ``MODELS`` and ``TOKENIZERS``).

Failures are compared with ``tests/clients/known_failures.txt`` (one test id a
line, with its reason after ``#``; docs/compat.md explains each group). A
failure not listed there fails the run; a listed test that passes is reported,
so the list only shrinks. ``--reference`` runs the same suites on genlm-backend
itself (no switch) and only reports counts; ``--update-known`` rewrites the list
from this run's failures, keeping the reasons of those already there.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets

ROOT = Path(__file__).resolve().parent.parent
KNOWN = ROOT / "tests" / "clients" / "known_failures.txt"
WORK = assets.CACHE / "client-suites"

SUITES = {
    "genlm-backend": "genlm-backend==0.3.1",
    "genlm-control": "genlm-control==0.4.1",
    "genlm-bytes": "genlm-bytes==0.2.0",
}

# Hub models with weights -> the local SmolLM2-135M-Instruct folder.
MODELS = (
    "openai-community/gpt2",
    "gpt2-medium",
    "gpt2",
    "HuggingFaceTB/SmolLM-135M",
    "mlx-community/Llama-3.2-1B-Instruct-4bit",
)
# Hub LoRA adapters -> a toy adapter on SmolLM2 built with peft (and its merged model).
# Hub tokenizers -> the closest local tokenizer (same family or same kind of model).
TOKENIZERS = {
    "meta-llama/Meta-Llama-3-8B": "llama-bpe",
    "unsloth/DeepSeek-R1-Distill-Llama-8B": "llama-bpe",
    "codellama/CodeLlama-7b-hf": "llama-spm",
    "codellama/CodeLlama-7b-Instruct-hf": "llama-spm",
    "mistralai/Mistral-7B-Instruct-v0.3": "llama-spm",
    "EleutherAI/llemma_7b": "llama-spm",
    "google/gemma-2b": "llama-spm",
    "google/gemma-7b": "llama-spm",
    "google/gemma-3-1b-pt": "llama-spm",
    "microsoft/phi-2": "gpt-2",
}

# Tests left out of the run, each with its reason (docs/compat.md lists them too).
DESELECTED = {
    "genlm-backend": {
        "tests/test_mlx.py": "imports BatchAbandoned, an internal of genlm-backend's timer batching that "
        "genlm-anyio leaves out (docs/compat.md), so none of its tests can be collected; and its second model, "
        "mamba2-tiny-random, cannot be fetched here. Our tests/test_mlx.py covers the MLX backend",
    },
    "genlm-control": {
        "tests/sampler/test_awrs.py": "AWRS's own statistics on mock potentials: never touches genlm.backend, "
        "and takes ~18 CPU-minutes of hypothesis examples here",
        "tests/potential/test_llm.py::test_new_eos_tokens": "draws GPT-2 token ids up to 50256, beyond SmolLM2's "
        "49152: fails on either backend, and hypothesis then spends ~5 minutes shrinking",
    },
}

# Hypothesis draws its examples from a fixed seed and every test starts from the same
# random state (clients_plugin.py), so a test's outcome does not change from run to run.
PYTEST_ARGS = [
    "--hypothesis-seed=0",
    "-q",
    "-p",
    "no:cacheprovider",
    "--timeout=600",
    "-o",
    "asyncio_default_fixture_loop_scope=function",
]


@dataclass
class Result:
    suite: str
    passed: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    messages: dict[str, str] = field(default_factory=dict)


def _substitutions() -> dict[str, str]:
    smollm2 = str(assets.smollm2_dir())
    table = {name: smollm2 for name in MODELS}
    lora, merged = assets.smollm2_lora_toy()
    table.update({"vxef/smol_lora_toy": str(lora), "vxef/smol_merged_toy": str(merged)})
    table.update({name: str(assets.tokenizer_dir(local)) for name, local in TOKENIZERS.items()})
    return table


def _rewrite(folder: Path, table: dict[str, str]) -> None:
    """Replace quoted hub names by local paths in every test file of ``folder``."""
    pattern = re.compile("([\"'])(" + "|".join(re.escape(k) for k in sorted(table, key=len, reverse=True)) + r")\1")
    for path in folder.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        new = pattern.sub(lambda m: m.group(1) + table[m.group(2)] + m.group(1), text)
        if new != text:
            path.write_text(new, encoding="utf-8")


def prepare(suite: str) -> Path:
    """A fresh copy of ``suite``'s tests (from its sdist), rewritten for this machine,
    in a folder of this run's own (runs at the same time do not share one)."""
    archive = assets.download(SUITES[suite], source=True)
    WORK.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{suite}-", dir=WORK))
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/tests/")]
        for member in members:
            member.name = member.name[len(top) + 1 :]
        tar.extractall(folder, members=members, filter="data")
    _rewrite(folder / "tests", _substitutions())
    return folder


def run(suite: str, reference: bool) -> Result:
    folder = prepare(suite)
    try:
        return _run_in(folder, suite, reference)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_in(folder: Path, suite: str, reference: bool) -> Result:
    report = folder / "report.xml"
    entry = (
        [sys.executable, "-m", "pytest"] if reference else [sys.executable, "-m", "genlm_anyio.compat", "-m", "pytest"]
    )
    plugin_dir = str(Path(__file__).resolve().parent)  # clients_plugin.py: the same random state for each test
    pythonpath = os.pathsep.join(p for p in (plugin_dir, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=pythonpath
    )
    print(f"== {suite} ({'genlm-backend' if reference else 'genlm-anyio'}): {' '.join(entry[2:])} tests", flush=True)
    # A whole file is left out of collection (its imports may fail); a single test is deselected.
    skip = [f"--ignore={test}" if "::" not in test else f"--deselect={test}" for test in DESELECTED.get(suite, {})]
    for test, why in DESELECTED.get(suite, {}).items():
        print(f"   deselected {test}: {why}", flush=True)
    proc = subprocess.run(
        [*entry, "tests", *PYTEST_ARGS, *skip, f"--junitxml={report}"], cwd=folder, env=env, check=False
    )
    result = Result(suite)
    if proc.returncode not in (0, 1) or not report.exists():  # interrupted, crashed or killed: no full report
        result.failed.append(f"{suite}::<pytest exited with {proc.returncode}>")
        return result
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{suite}::{case.get('classname', '').replace('.', '/')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            result.passed += 1
        elif outcome.tag == "skipped":
            result.skipped += 1
        else:
            result.failed.append(test_id)
            result.messages[test_id] = (
                (outcome.get("message") or "").splitlines()[0][:160] if outcome.get("message") else ""
            )
    return result


def read_known() -> dict[str, str]:
    known = {}
    if KNOWN.exists():
        for line in KNOWN.read_text(encoding="utf-8").splitlines():
            test_id, _, reason = line.partition("#")
            if test_id.strip():
                known[test_id.strip()] = reason.strip()
    return known


def write_known(results: list[Result], known: dict[str, str]) -> None:
    ran = {r.suite for r in results}
    keep = {t: why for t, why in known.items() if t.split("::")[0] not in ran}
    for r in results:
        for test_id in r.failed:
            keep[test_id] = known.get(test_id) or r.messages.get(test_id, "")
    header = "# Client tests that fail on genlm-anyio, each with its reason (see docs/compat.md).\n"
    KNOWN.parent.mkdir(parents=True, exist_ok=True)
    KNOWN.write_text(header + "".join(f"{t}  # {why}\n" for t, why in sorted(keep.items())), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", help=f"any of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--reference", action="store_true", help="run on genlm-backend itself, without the switch")
    parser.add_argument("--update-known", action="store_true", help="rewrite the known-failures list from this run")
    args = parser.parse_args()
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    known = read_known()
    results = [run(suite, args.reference) for suite in args.suites or list(SUITES)]
    status = 0
    for r in results:
        print(f"{r.suite}: {r.passed} passed, {len(r.failed)} failed, {r.skipped} skipped")
    if args.reference:
        return 0
    if args.update_known:
        write_known(results, known)
        return 0
    for r in results:
        new = [t for t in r.failed if t not in known]
        fixed = [t for t, _ in known.items() if t.startswith(r.suite + "::") and t not in r.failed]
        for t in new:
            print(f"NEW FAILURE {t}: {r.messages.get(t, '')}")
        for t in fixed:
            print(f"now passes (remove it from {KNOWN.relative_to(ROOT)}): {t}")
        status |= bool(new)
    total_passed = sum(r.passed for r in results)
    total_failed = sum(len(r.failed) for r in results)
    print(
        f"clients: {total_passed} passed, {total_failed} failed (all known)"
        if not status
        else "clients: new failures above"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
