"""The seed example is the shared program (unchanged apart from its import); the
trio constrained-SMC example completes only strings of its constraint; benches/gpu.sh's
benchmark runs at a small size.

The seed examples themselves (asyncio and trio) and the ``genlm-anyio-demo``
command run in scripts/wheel_check.sh (``make test-wheel``), from the installed
wheel, where they check that every particle is printed and that the
probabilities sum to one; they are not run a second time here."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools import assets

# Loads SmolLM2's weights: not in the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_seed_example_is_the_shared_program_with_our_import():
    shared = ROOT.parent / "shared" / "seed_example.py"
    if not shared.exists():
        pytest.skip("../shared is not beside this checkout")
    assert (ROOT / "examples" / "seed_example.py").read_text() == shared.read_text()


def test_control_smc_trio_completes_only_strings_of_the_constraint():
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "control_smc_trio.py"),
            str(assets.smollm2_dir()),
            "--particles",
            "4",
            "--max-tokens",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    completed = int(re.search(r"(\d+) completed", out).group(1))
    posterior = {
        ast.literal_eval(text): float(p) for text, p in re.findall(r"^('.*') \(probability: ([0-9.]+)\)$", out, re.M)
    }
    assert completed >= 1 and posterior
    # The README's regex, checked here with Python's re, independently of the example's DFA.
    for text in posterior:
        assert re.fullmatch(r" SMC is (🔥🔥|😍😍|🤌🤌) with LMs", text), text
    assert sum(posterior.values()) == pytest.approx(1.0, abs=1e-3)


def test_the_gpu_benchmark_script_runs_on_cpu_at_a_small_size():
    """benches/gpu.sh's benchmark, kept working here (the GPU runs it at full size)."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benches" / "gpu_sis.py"),
            "--tokenizer",
            str(assets.smollm2_dir()),
            "--device",
            "cpu",
            "--models",
            "smollm2",
            "--sizes",
            "3x2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
    ).stdout
    assert re.search(r"N=3 x 2  transformers +\d+ tok/s", out), out
