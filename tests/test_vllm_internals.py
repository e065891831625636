"""The vLLM names genlm-anyio uses (``backends/vllm/internals.py``), against the
installed vLLM and against the source of vllm==0.33.0, the newest CUDA release.

The 0.33.0 wheel is downloaded once into the test assets' cache and read as a
zip (its modules parsed, never imported or installed: it is a CUDA build).
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import zipfile
from pathlib import Path

import pytest

from tools import assets

pytest.importorskip("vllm")

from genlm_anyio.backends.vllm import internals
from genlm_anyio.backends.vllm.internals import INTERNALS, Internal, check_internals, missing_internals
from genlm_anyio.backends.vllm.logs import PAUSE_LINE, SCHEDULER_LOGGER
from genlm_anyio.backends.vllm.lora import cpu_lora_slot_bug, slot_minus_one_gets_an_adapter

pytestmark = pytest.mark.vllm

RELEASE = "vllm==0.33.0"


@pytest.fixture(scope="module")
def wheel() -> zipfile.ZipFile:
    try:
        path = assets.download(RELEASE)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"{RELEASE} could not be downloaded from PyPI ({exc}); it is read, never installed")
    with zipfile.ZipFile(path) as zf:
        yield zf


class Source:
    """Finds names in a vLLM source tree held in a wheel, as Python would import them."""

    def __init__(self, zf: zipfile.ZipFile):
        self.zf = zf
        self.files = set(zf.namelist())
        self._trees: dict[str, tuple[ast.Module, bool]] = {}

    def module(self, name: str) -> tuple[ast.Module, bool] | None:
        """The parsed module ``name`` and whether it is a package (None if absent)."""
        if name not in self._trees:
            base = name.replace(".", "/")
            for path, package in ((f"{base}.py", False), (f"{base}/__init__.py", True)):
                if path in self.files:
                    self._trees[name] = (ast.parse(self.zf.read(path)), package)
                    break
            else:
                return None
        return self._trees[name]

    @staticmethod
    def _top_level(body: list[ast.stmt]):
        """Statements of a module or class body, into ``if``/``try`` blocks (not into functions)."""
        for node in body:
            yield node
            if isinstance(node, (ast.If, ast.Try)):
                for block in (
                    node.body,
                    node.orelse,
                    getattr(node, "finalbody", []),
                    *(h.body for h in getattr(node, "handlers", [])),
                ):
                    yield from Source._top_level(block)

    def find(self, module: str, name: str, depth: int = 0):
        """``(module, node)`` defining ``name`` as ``module`` exports it (following imports), or None."""
        found = self.module(module)
        if found is None or depth > 10:
            return None
        tree, package = found
        for node in self._top_level(tree.body):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return module, node
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                return module, node
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return module, node
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = node.module or ""
                        if node.level:
                            parts = module.split(".")
                            keep = len(parts) - node.level + (1 if package else 0)
                            source = ".".join(parts[:keep] + ([source] if source else []))
                        return self.find(source, alias.name, depth + 1)
        return None

    def member(self, module: str, cls: ast.ClassDef, name: str, depth: int = 0):
        """``(module, node)`` of ``name`` in class ``cls`` or its bases, or None."""
        for node in self._top_level(cls.body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return module, node
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                return module, node
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return module, node
        for base in self._bases(module, cls):
            if depth < 10:
                found = self.member(*base, name, depth + 1)
                if found:
                    return found
        return None

    def _bases(self, module: str, cls: ast.ClassDef):
        for base in cls.bases:
            if isinstance(base, ast.Name):
                found = self.find(module, base.id)
                if found and isinstance(found[1], ast.ClassDef):
                    yield found

    def fields(self, module: str, cls: ast.ClassDef) -> set[str]:
        """The annotated fields of a dataclass-like class (msgspec Struct, dataclass), with its bases'."""
        names = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        for base in self._bases(module, cls):
            names |= self.fields(*base)
        return names

    def parameters(self, module: str, node: ast.AST) -> set[str] | None:
        """The parameter names a call of ``node`` accepts (None: any, through ``**kwargs``)."""
        if isinstance(node, ast.ClassDef):
            init = self.member(module, node, "__init__")
            if init is None:
                return self.fields(module, node)
            module, node = init
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)), ast.dump(node)[:80]
        if node.args.kwarg is not None:
            return None
        a = node.args
        return {p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)}

    def check(self, internal: Internal) -> str | None:
        """What 0.33 lacks of ``internal`` (None: all of it)."""
        first, *rest = internal.qualname.split(".")
        found = self.find(internal.module, first)
        if found is None:
            return f"{internal.module} has no {first}"
        for part in rest:
            module, node = found
            if not isinstance(node, ast.ClassDef):
                return f"{first} is not a class"
            found = self.member(module, node, part)
            if found is None:
                return f"{internal.module}.{internal.qualname}: no {part}"
        if internal.params:
            accepted = self.parameters(*found)
            absent = [] if accepted is None else [p for p in internal.params if p not in accepted]
            if absent:
                return f"{internal}: no parameter {', '.join(absent)}"
        return None


def test_every_internal_name_is_in_the_installed_vllm():
    assert missing_internals() == []
    assert check_internals() == __import__("vllm").__version__


def test_every_internal_name_is_in_vllm_0_33_with_the_parameters_we_pass(wheel):
    source = Source(wheel)
    assert source.module("vllm.v1.engine.core_client") is not None  # the wheel is vLLM's source
    problems = [(str(i), p) for i in INTERNALS if (p := source.check(i)) is not None]
    assert problems == []


def test_the_wheel_reader_finds_what_is_missing(wheel):
    """The check above can fail: names and parameters that 0.33 does not have are reported."""
    source = Source(wheel)
    assert source.check(Internal("vllm.v1.engine.llm_engine", "LLMEngine.no_such_method")) is not None
    assert source.check(Internal("vllm.v1.engine.llm_engine", "LLMEngine.__init__", ("no_such_param",))) is not None
    assert source.check(Internal("vllm.v1.engine", "EngineCoreOutput", ("error",))) is None  # new in 0.33
    assert source.check(Internal("vllm.v1.engine", "EngineCoreOutput", ("no_such_field",))) is not None
    assert source.check(Internal("vllm", "NoSuchName")) is not None


def test_the_gate_names_the_missing_piece_and_the_version(monkeypatch):
    import vllm

    monkeypatch.setattr(internals, "_checked", None)
    gone = Internal("vllm.v1.engine.llm_engine", "LLMEngine.__init__", ("no_such_param",))
    monkeypatch.setattr(internals, "INTERNALS", (*INTERNALS, gone))
    with pytest.raises(RuntimeError, match=rf"vLLM {vllm.__version__} .*LLMEngine.__init__\(no_such_param\)"):
        check_internals()


def test_the_quieted_pause_line_is_the_one_vllm_logs(wheel):
    """``logs.quiet_scheduler_pauses`` drops records by their format and logger:
    the installed vLLM's and 0.33's scheduler log that format, in that module."""
    import vllm.v1.core.sched.scheduler as installed

    assert installed.logger.name == SCHEDULER_LOGGER
    path = SCHEDULER_LOGGER.replace(".", "/") + ".py"
    for source in (Path(installed.__file__).read_text(), wheel.read(path).decode()):
        assert f'logger.info("{PAUSE_LINE}", pause_state.name)' in source


def _release_module(wheel: zipfile.ZipFile, path: str):
    """A module of the 0.33 wheel that imports only torch, loaded from its source."""
    spec = importlib.util.spec_from_loader("vllm_0_33_" + path.replace("/", "_")[:-3], loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(wheel.read(path), path, "exec"), module.__dict__)
    return module


def test_mixed_lora_batches_split_only_where_the_cpu_slot_bug_exists(wheel):
    """vLLM 0.32's CPU LoRA op gives a slot -1 (base-model) row the last adapter;
    0.33's (run from the wheel's own source, which imports only torch) does not."""
    ops = _release_module(wheel, "vllm/lora/ops/torch_ops/lora_ops.py")
    assert ops.__dict__.keys() >= {"bgmv_expand"}
    assert not slot_minus_one_gets_an_adapter(ops.bgmv_expand)
    installed = __import__("vllm").__version__
    assert cpu_lora_slot_bug() is installed.startswith("0.32")
