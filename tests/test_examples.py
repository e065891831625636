"""The seed example (unchanged apart from its import) and its trio rewrite run on
the default model and print every particle with a probability; the trio
constrained-SMC example completes only strings of its constraint."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assets

# Loads SmolLM2's weights: not in the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_seed_example_is_the_shared_program_with_our_import():
    shared = ROOT.parent / "shared" / "seed_example.py"
    if not shared.exists():
        pytest.skip("../shared is not beside this checkout")
    assert (ROOT / "examples" / "seed_example.py").read_text() == shared.read_text()


@pytest.mark.parametrize("script", ["seed_example.py", "seed_example_trio.py"])
def test_seed_example_runs(script):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), str(assets.smollm2_dir())],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    probs = [float(p) for p in re.findall(r"\(probability: ([0-9.]+)\)", out)]
    assert len(probs) == 10
    assert sum(probs) == pytest.approx(1.0, abs=2e-3)


def test_demo_entry_point_runs_under_asyncio_and_trio():
    out = subprocess.run(
        [sys.executable, "-m", "genlm_anyio.demo", str(assets.smollm2_dir()), "--particles", "4", "--max-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    assert "== asyncio: 4 particles" in out and "== trio: 4 particles" in out
    assert len(re.findall(r"\(probability: ", out)) == 8


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
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "scripts")])},
    ).stdout
    assert re.search(r"N=3 x 2  transformers +\d+ tok/s", out), out
