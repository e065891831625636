"""The pytest plugin of the client suites, loaded with ``-p tools.clients_plugin``.

- **The same random state for each test.** ``random``, numpy and torch are
  seeded with 0 before every test, so the suites' sampling tests (SMC, AWRS,
  which draw from the global generators) give the same outcome on every run.
- **Which tests reach genlm-anyio.** Every function and method of
  genlm-anyio's own modules (a model, a trie, a vocabulary: any function of the
  ``genlm_anyio`` package but the compat switch's import machinery and its lazy
  exports; its ``legacy`` classes count) is wrapped as its module is imported, and a wrapper called from the
  main thread while a test sets up or runs marks that test, unless the call
  comes from genlm-anyio itself, from a finaliser (a garbage collection, a
  ``weakref.finalize`` callback: an earlier test's objects go at any time), or
  while a module is imported. A test that never calls in only imports
  us. (A wrapper costs one flag test per call; a trace function, which Python
  calls on every call of every function, made pytest crash in a suite's
  failure reports.)
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

import functools
import gc
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import os
import random
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, FunctionType, ModuleType
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
# Import machinery, not a model, trie or vocabulary: the compat switch and the lazy
# exports (compat/legacy.py's classes are models and tries).
_NOT_A_CALL_IN = tuple(
    os.path.join(_OURS, *part) for part in (("compat", "__init__.py"), ("compat", "__main__.py"), ("_lazy.py",))
)
_MAIN_THREAD = threading.main_thread().ident
# Finalisers run when an object of an earlier test is collected, not because this test called.
_FINALISING = weakref.finalize.__call__.__code__


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
        self.armed = False  # a test sets up or runs and has not called in yet
        self.collecting = False  # the garbage collector runs (and with it, finalisers)
        self.deselected: dict[str, list[str]] = {}

    def called(self) -> None:
        """A wrapper of genlm-anyio's was called (two frames up is its caller)."""
        if self.current is None or self.collecting or threading.get_ident() != _MAIN_THREAD:
            return
        caller = sys._getframe(2)
        # Only a call from outside enters genlm-anyio (one from its own code, a __del__ say, came in before).
        if caller.f_code.co_filename.startswith(_OURS) or caller.f_code is _FINALISING or _importing(caller):
            return
        self.tests[self.current]["reached"] = True
        self.armed = False

    def gc_phase(self, phase: str, info: dict[str, Any]) -> None:
        self.collecting = phase == "start"

    def entry(self, nodeid: str) -> dict[str, Any]:
        return self.tests.setdefault(nodeid, {"outcome": None, "message": "", "reached": False})


_RECORDER = _Recorder()
_WRAPPERS: dict[Callable[..., Any], Callable[..., Any]] = {}  # genlm-anyio's function -> its wrapper
_WRAPPERS_MADE: set[Callable[..., Any]] = set()
_WATCHED_CLASSES: set[type] = set()


def _ours(function: Any) -> bool:
    """Whether ``function`` is (or decorates) a function of genlm-anyio that counts as a call in."""
    if not isinstance(function, FunctionType) or function in _WRAPPERS_MADE:
        return False
    name = inspect.unwrap(function).__code__.co_filename
    return name.startswith(_OURS) and not name.startswith(_NOT_A_CALL_IN)


def _watched(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``'s wrapper, which tells the recorder it was called (one per function)."""
    wrapper = _WRAPPERS.get(function)
    if wrapper is not None:
        return wrapper
    if inspect.iscoroutinefunction(function):  # stays a coroutine function for those who ask

        @functools.wraps(function)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _RECORDER.armed:
                _RECORDER.called()
            return await function(*args, **kwargs)

    else:

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _RECORDER.armed:
                _RECORDER.called()
            return function(*args, **kwargs)

    _WRAPPERS[function] = wrapper
    _WRAPPERS_MADE.add(wrapper)
    return wrapper


def _watched_attribute(value: Any) -> Any:
    """A class attribute with its functions of genlm-anyio wrapped (``value`` itself if it has none)."""
    if _ours(value):
        return _watched(value)
    if isinstance(value, (staticmethod, classmethod)) and _ours(value.__func__):
        return type(value)(_watched(value.__func__))
    if type(value) is property and any(_ours(f) for f in (value.fget, value.fset, value.fdel)):
        wrap = [_watched(f) if _ours(f) else f for f in (value.fget, value.fset, value.fdel)]
        return property(*wrap, value.__doc__)
    if isinstance(value, functools.cached_property) and _ours(value.func):
        cached = functools.cached_property(_watched(value.func))
        cached.attrname = value.attrname
        return cached
    if isinstance(value, type):
        _watch_class(value)
    return value


def _watch_class(cls: type) -> None:
    module = sys.modules.get(cls.__module__)
    if cls in _WATCHED_CLASSES or module is None or not _watched_module(module):
        return
    _WATCHED_CLASSES.add(cls)
    for name, value in list(vars(cls).items()):
        new = _watched_attribute(value)
        if new is not value:
            setattr(cls, name, new)


def _watched_module(module: ModuleType) -> bool:
    name = getattr(module, "__file__", None) or ""
    return name.startswith(_OURS) and not name.startswith(_NOT_A_CALL_IN)


def _watch_module(module: ModuleType) -> None:
    """Wrap the functions of genlm-anyio in ``module``'s namespace and in its classes."""
    if not _watched_module(module):
        return
    for name, value in list(vars(module).items()):
        if isinstance(value, type):
            _watch_class(value)
        elif _ours(value):
            setattr(module, name, _watched(value))


class _WatchingLoader(importlib.abc.Loader):
    """A genlm-anyio module's own loader, whose module is watched once it has run."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _watch_module(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...
        return getattr(self.loader, name)


class _WatchingFinder(importlib.abc.MetaPathFinder):
    """Finds genlm-anyio's modules as the other finders do, with a watching loader."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name.partition(".")[0] != "genlm_anyio":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _WatchingLoader(spec.loader)
                return spec
        return None


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests() -> None:
    """Watch genlm-anyio before a conftest.py imports it (the switch has imported some of it already)."""
    sys.meta_path.insert(0, _WatchingFinder())
    gc.callbacks.append(_RECORDER.gc_phase)
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] == "genlm_anyio":
            _watch_module(module)


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
def _watching(item: pytest.Item) -> Iterator[None]:
    _RECORDER.current = item.nodeid
    _RECORDER.armed = not _RECORDER.entry(item.nodeid)["reached"]
    try:
        yield
    finally:
        _RECORDER.current = None
        _RECORDER.armed = False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _watching(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _watching(item):
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
