"""The package's own imports form no cycle (issue 18): read from the source with
``ast``, every import counted, those inside functions too (a deferred import
hides a cycle, it does not remove it), but not those under ``if TYPE_CHECKING:``,
which never run.

An import of ``a.b.c`` from outside package ``a.b`` first runs ``a.b`` (its
``__init__``), so it counts as an import of ``a.b`` as well; a name that a
package loads on first use (``lazy_exports``, PEP 562) counts as an import of
the module its table names."""

from __future__ import annotations

import ast
from pathlib import Path

import genlm_anyio

PACKAGE = "genlm_anyio"
ROOT = Path(genlm_anyio.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Every module of the package, by its dotted name."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(tree: ast.AST):
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _lazy_table(module: str) -> dict[str, str]:
    """A package's names loaded on first use: name -> the module defining it."""
    path = MODULES.get(module)
    if path is None or path.name != "__init__.py":
        return {}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    tables = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    tables[target.id] = node.value
    used = [
        call.args[1].id
        for call in ast.walk(tree)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "lazy_exports"
        and len(call.args) == 2
        and isinstance(call.args[1], ast.Name)
    ]
    out = {}
    for name in used:
        for key, value in zip(tables[name].keys, tables[name].values):
            assert isinstance(key, ast.Constant) and isinstance(value, ast.Constant)
            out[key.value] = _resolve(module, value.value, is_package=True)
    return out


def _resolve(module: str, target: str, is_package: bool, level: int | None = None) -> str:
    """The absolute name of ``target`` imported from ``module`` (relative when it starts with dots)."""
    if level is None:
        level = len(target) - len(target.lstrip("."))
        target = target[level:]
    if level == 0:
        return target
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _targets(module: str) -> set[str]:
    """The package's modules that importing ``module`` runs, directly."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    named: set[str] = set()
    for node in _nodes(tree):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.module or "", is_package, node.level)
            named.add(base)
            lazy = _lazy_table(base)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    named.add(sub)
                elif alias.name in lazy:
                    named.add(lazy[alias.name])
    out = set()
    for name in named:
        if not (name == PACKAGE or name.startswith(PACKAGE + ".")):
            continue
        # Importing a.b.c runs the packages above it, unless the importer is inside them (already running).
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            ancestor = ".".join(parts[:i])
            if ancestor in MODULES and not (module == ancestor or module.startswith(ancestor + ".")):
                out.add(ancestor)
    out.discard(module)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walk_sees_the_package_imports():
    graph = {module: _targets(module) for module in MODULES}
    # Deferred imports (inside functions) and lazily loaded names are edges too.
    assert "genlm_anyio.loading" in graph["genlm_anyio.backends.replicas"]
    assert "genlm_anyio.backends.hf" in graph["genlm_anyio.loading"]
    assert "genlm_anyio.backends.base" in graph["genlm_anyio.llm.base"]
    # A from-import of a name a package loads on first use reaches the module defining it.
    assert {"genlm_anyio.backends.base", "genlm_anyio.backends.hf"} <= graph["genlm_anyio.llm"]


def test_the_walk_finds_a_cycle_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_imports_form_no_cycle():
    graph = {module: _targets(module) for module in MODULES}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
