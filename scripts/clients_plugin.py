"""The pytest plugin of the client suites, loaded with ``-p clients_plugin``.

- **The same random state for each test.** ``random``, numpy and torch are
  seeded with 0 before every test, so the suites' sampling tests (SMC, AWRS,
  which draw from the global generators) give the same outcome on every run.
- **Which tests reach genlm-anyio.** While a test sets up and runs, a trace
  function watches for the first call into genlm-anyio's own code (a model, a
  trie, a vocabulary, a ``Token``: any function of the ``genlm_anyio`` package
  except the compat switch's import machinery, its lazy exports and whatever
  runs while a module is imported). A test that never calls in only imports us.
- **A report.** With ``GENLM_ANYIO_CLIENT_REPORT`` set to a file, each test's
  outcome (passed, failed, error, skipped, xfailed, xpassed), the first line of
  its error or skip reason, and whether it reached genlm-anyio are written
  there as JSON after each test, with ``"plugin": "clients_plugin"`` (which
  shows the plugin was loaded).
- **Selection.** ``GENLM_ANYIO_CLIENT_SELECT`` names a file of node ids (one a
  line): only those run.
  ``GENLM_ANYIO_CLIENT_DESELECT`` names a JSON object of node-id regular
  expressions to reasons: matching tests are deselected, and the report says
  which pattern took which tests.
- **No shrinking, no deadline.** Hypothesis runs without its shrink phase (a
  failing example is reported as first found from the fixed seed, not
  minimised, which only changes how a failure reads and saves minutes per
  failing test) and without its 200 ms per-example deadline, a wall-clock limit
  that a busy machine exceeds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest

SEED = 0


def _package_dir() -> str:
    """genlm-anyio's package folder, found without importing it."""
    spec = importlib.util.find_spec("genlm_anyio")
    if spec is None or not spec.submodule_search_locations:
        return "\0"  # not installed: nothing can match
    return os.path.join(next(iter(spec.submodule_search_locations)), "")


_OURS = _package_dir()
# Import machinery, not a model, trie or vocabulary: the compat switch and the lazy exports.
_NOT_A_CALL_IN = (os.path.join(_OURS, "compat", ""), os.path.join(_OURS, "_lazy.py"))


def _importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs as part of an import (the import system is on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


class _Recorder:
    """Per test: its outcome, its message, and whether it called into genlm-anyio."""

    def __init__(self) -> None:
        self.tests: dict[str, dict[str, Any]] = {}
        self.current: str | None = None
        self.deselected: dict[str, list[str]] = {}

    def trace(self, frame: FrameType, event: str, arg: Any) -> None:
        code = frame.f_code
        name = code.co_filename
        if name.startswith(_OURS) and not name.startswith(_NOT_A_CALL_IN) and not _importing(frame):
            if self.current is not None:
                self.tests[self.current]["reached"] = True
            sys.settrace(None)  # one call is enough: the rest of the phase runs untraced

    def entry(self, nodeid: str) -> dict[str, Any]:
        return self.tests.setdefault(nodeid, {"outcome": None, "message": "", "reached": False})


_RECORDER = _Recorder()


@pytest.fixture(autouse=True)
def _same_random_state() -> Iterator[None]:
    random.seed(SEED)
    np.random.seed(SEED)
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.manual_seed(SEED)
    yield


def pytest_configure(config: pytest.Config) -> None:
    try:
        from hypothesis import Phase, settings
    except ImportError:
        return
    settings.register_profile("clients", phases=[p for p in Phase if p is not Phase.shrink], deadline=None)
    settings.load_profile("clients")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep = list(items)
    dropped: list[pytest.Item] = []
    patterns = os.environ.get("GENLM_ANYIO_CLIENT_DESELECT")
    if patterns:
        table = json.loads(Path(patterns).read_text(encoding="utf-8"))
        compiled = [(pattern, re.compile(pattern)) for pattern in table]
        _RECORDER.deselected = {pattern: [] for pattern in table}
        remaining = []
        for item in keep:
            hit = next((p for p, rx in compiled if rx.search(item.nodeid)), None)
            if hit is None:
                remaining.append(item)
            else:
                _RECORDER.deselected[hit].append(item.nodeid)
                dropped.append(item)
        keep = remaining
    selection = os.environ.get("GENLM_ANYIO_CLIENT_SELECT")
    if selection:
        wanted = {line.strip() for line in Path(selection).read_text(encoding="utf-8").splitlines() if line.strip()}
        dropped += [item for item in keep if item.nodeid not in wanted]
        keep = [item for item in keep if item.nodeid in wanted]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@contextmanager
def _traced(item: pytest.Item) -> Iterator[None]:
    _RECORDER.current = item.nodeid
    _RECORDER.entry(item.nodeid)
    sys.settrace(_RECORDER.trace)
    try:
        yield
    finally:
        sys.settrace(None)
        _RECORDER.current = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _traced(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _traced(item):
        return (yield)


def _first_line(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (file, line, reason)
        text = str(longrepr[2])
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(longrepr or "")
    text = text.removeprefix("Skipped: ")
    return text.strip().splitlines()[0] if text.strip() else ""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _RECORDER.entry(report.nodeid)
    if hasattr(report, "wasxfail"):
        entry["outcome"] = "xfailed" if report.skipped else "xpassed"
        entry["message"] = str(report.wasxfail)
        return
    if report.when == "setup" and report.skipped:
        entry.update(outcome="skipped", message=_first_line(report))
    elif report.failed and entry["outcome"] not in ("failed", "error"):
        entry.update(outcome="failed" if report.when == "call" else "error", message=_first_line(report))
    elif report.when == "call":
        entry.update(
            outcome="skipped" if report.skipped else "passed", message=_first_line(report) if report.skipped else ""
        )


def pytest_runtest_logfinish(nodeid: str) -> None:
    _write_report()  # after every test, so that a run stopped part-way leaves what it did


def pytest_sessionfinish(session: pytest.Session) -> None:
    _write_report()


def _write_report() -> None:
    path = os.environ.get("GENLM_ANYIO_CLIENT_REPORT")
    if not path:
        return
    report = {
        "plugin": "clients_plugin",
        "seed": SEED,
        "tests": {k: v for k, v in _RECORDER.tests.items() if v["outcome"] is not None},
        "deselected": _RECORDER.deselected,
    }
    partial = Path(path).with_suffix(".partial")
    partial.write_text(json.dumps(report, indent=1, sort_keys=True), encoding="utf-8")
    partial.replace(path)
