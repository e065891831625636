"""The docs quote the figures the benchmarks wrote (benches/results/*.json), and
those figures are what the harness says they are: best and median of at least 3."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("render_docs", ROOT / "benches" / "render_docs.py")
assert _spec is not None and _spec.loader is not None
render_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_docs)

RESULTS = render_docs.load_results()
PAGES = sorted((ROOT / "docs").rglob("*.md"))


def test_there_are_results() -> None:
    assert RESULTS, "benches/results/ holds no results file: run make bench"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_quote_the_results_files(page: Path) -> None:
    text = page.read_text()
    assert render_docs.update(text, RESULTS) == text, (
        f"{page.relative_to(ROOT)} does not quote benches/results as they are: run python benches/render_docs.py"
    )


def test_every_results_file_is_quoted() -> None:
    quoted = {name for page in PAGES for name in render_docs.quoted(page.read_text())}
    assert set(RESULTS) <= quoted, f"results files no docs page quotes: {sorted(set(RESULTS) - quoted)}"


def test_a_missing_results_file_says_so() -> None:
    page = "<!-- results: nothing-here -->\n<!-- /results: nothing-here -->\n"
    assert "Not measured yet: `benches/results/nothing-here.json` is missing" in render_docs.update(page, RESULTS)


def test_the_docs_figures_come_from_one_run() -> None:
    runs = {name: record.get("run") for name, record in RESULTS.items()}
    assert len(set(runs.values())) == 1, f"results files from different make bench runs: {runs}"


def test_the_docs_figures_come_from_whole_runs() -> None:
    stopped = {name: record["stopped"] for name, record in RESULTS.items() if record.get("stopped")}
    assert not stopped, f"results files of runs stopped early: {stopped}"


_STOPPED_RUN = """
import os, signal, sys, time
from pathlib import Path
import common
report = common.Report("demo", "Demo", Path(sys.argv[1]))
table = report.table("rows", ["row"])
with report.written():
    table.add("measured")
    if sys.argv[2] == "error":
        raise ValueError("a real failure")
    if sys.argv[2] == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    table.add("last")
"""


@pytest.mark.parametrize("how", ["whole", "term", "error"])
def test_a_run_stopped_by_sigterm_keeps_its_rows_and_says_so(tmp_path: Path, how: str) -> None:
    """``Report.written``: a ``timeout`` (SIGTERM) leaves the rows measured so far,
    marked as a stopped run, and exit status 124; a failure is not hidden."""
    script, out = tmp_path / "run.py", tmp_path / "demo.json"
    script.write_text(_STOPPED_RUN)
    run = subprocess.run(
        [sys.executable, str(script), str(out), how],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "benches")},
        timeout=50,
        check=False,
    )
    if how == "error":
        assert run.returncode == 1 and "ValueError: a real failure" in run.stderr, run.stderr
        assert not out.exists()
        return
    record = json.loads(out.read_text())
    rows = record["tables"][0]["rows"]
    if how == "whole":
        assert run.returncode == 0, run.stderr
        assert record["stopped"] is None and rows == [["measured"], ["last"]]
        assert "stopped by" not in render_docs.render(record)
    else:
        assert run.returncode == 124, run.stderr
        assert record["stopped"].startswith("stopped by SIGTERM after ") and rows == [["measured"]]
        assert record["stopped"] in render_docs.render(record)


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_each_figure_is_the_best_and_median_of_at_least_three(name: str) -> None:
    measurements = RESULTS[name]["measurements"]
    assert measurements, f"{name}.json records no timed samples"
    for key, m in measurements.items():
        assert len(m["seconds"]) >= 3, f"{name}: {key} has {len(m['seconds'])} samples"
        assert m["best_s"] == min(m["seconds"]), key
        assert m["median_s"] == statistics.median(m["seconds"]), key


def test_a_changed_figure_is_caught() -> None:
    """The check compares the numbers themselves: one changed cell makes a page stale."""
    name, record = next(iter(RESULTS.items()))
    page = f"<!-- results: {name} -->\n\n{render_docs.render(record)}\n<!-- /results: {name} -->\n"
    assert render_docs.update(page, RESULTS) == page
    row = record["tables"][0]["rows"][0]
    changed = page.replace(" | ".join(row), " | ".join([*row[:-1], row[-1] + "0"]), 1)
    assert changed != page
    assert render_docs.update(changed, RESULTS) != changed


def _reference_check(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run, in a new interpreter (with ``flags`` before the script), the benches' check of the reference."""
    script = tmp_path / "reference.py"
    script.write_text("import common\nprint(common.genlm_backend_module('genlm.backend.llm.hf').__file__)\n")
    return subprocess.run(
        [sys.executable, *flags, str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT / "benches")},
        check=False,
    )


def test_the_reference_is_genlm_backends_own_module(tmp_path: Path) -> None:
    plain = _reference_check(tmp_path, env={"GENLM_ANYIO_COMPAT": "0"})
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip().endswith(os.path.join("genlm", "backend", "llm", "hf.py")), plain.stdout


@pytest.mark.parametrize("how", ["environment", "compat module"])
def test_the_reference_check_refuses_genlm_anyio_behind_the_switch(tmp_path: Path, how: str) -> None:
    if how == "environment":
        run = _reference_check(tmp_path, env={"GENLM_ANYIO_COMPAT": "1"})
    else:
        run = _reference_check(tmp_path, "-m", "genlm_anyio.compat", env={"GENLM_ANYIO_COMPAT": "0"})
    assert run.returncode != 0
    assert "not to genlm-backend" in run.stderr and "genlm_anyio" in run.stderr, run.stderr
