"""Run programs written for genlm-backend on genlm-anyio, without editing them.

After :func:`install`, ``import genlm.backend`` (and every module under it that
genlm-backend 0.3.1 has) gives genlm-anyio's module of the same name, whether or
not genlm-backend is installed: its names are that module's, except the classes
that carry genlm-backend's leftovers (``timeout``, ``set_lora``, the trie's
``shutdown``, ...), which are :mod:`genlm_anyio.compat.legacy`'s thin subclasses,
and ``load_model_by_name``, which builds them. Three ways to switch:

- in code, before anything imports ``genlm.backend``::

      import genlm_anyio.compat
      genlm_anyio.compat.install()

- for a whole program, without touching it::

      python -m genlm_anyio.compat script.py [args...]
      python -m genlm_anyio.compat -m pytest tests/

- for every Python process of an environment: set ``GENLM_ANYIO_COMPAT=1``
  (read at interpreter start-up by the ``genlm_anyio_compat.pth`` file that the
  wheel installs).

Installing imports nothing heavy: each ``genlm.backend`` module is resolved when
it is first imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["ENV_VAR", "install", "installed", "legacy_of", "target_of", "uninstall"]

ENV_VAR = "GENLM_ANYIO_COMPAT"
"""Set to ``1`` to install the switch in every interpreter of an environment."""

_PREFIX = "genlm.backend"

# genlm-backend modules whose genlm-anyio counterpart has another path; every
# other ``genlm.backend.X`` is ``genlm_anyio.X``.
_RENAMED = {
    "genlm.backend.llm.hf": "genlm_anyio.backends.hf",
    "genlm.backend.llm.vllm": "genlm_anyio.backends.vllm",
    "genlm.backend.llm.mlx": "genlm_anyio.backends.mlx",
    "genlm.backend.llm.sgl": "genlm_anyio.backends.missing",
    "genlm.backend.tokenization.token": "genlm_anyio.vocab",
    "genlm.backend.tokenization.vocab": "genlm_anyio.vocab",
    "genlm.backend.trie.base": "genlm_anyio.trie.token_trie",
    "genlm.backend.trie.async_impl": "genlm_anyio.trie.async_trie",
}


def target_of(name: str) -> str | None:
    """The genlm-anyio module that stands for ``name``, or None if ``name`` is not under ``genlm.backend``."""
    if name != _PREFIX and not name.startswith(_PREFIX + "."):
        return None
    return _RENAMED.get(name) or "genlm_anyio" + name[len(_PREFIX) :]


# genlm-anyio's definitions that a ``genlm.backend`` name gives as
# genlm_anyio.compat.legacy's definition of the same name.
_LEGACY = frozenset(
    {
        "genlm_anyio.backends.base:AsyncLM",
        "genlm_anyio.backends.hf:AsyncTransformer",
        "genlm_anyio.backends.mlx:AsyncMlxLM",
        "genlm_anyio.backends.mock:MockAsyncLM",
        "genlm_anyio.backends.vllm.model:AsyncVirtualLM",
        "genlm_anyio.trie.async_trie:AsyncTokenCharacterTrie",
        "genlm_anyio.loading:load_model_by_name",
    }
)


def legacy_of(value: object) -> object:
    """What a ``genlm.backend`` name gives for genlm-anyio's ``value``: its
    :mod:`genlm_anyio.compat.legacy` counterpart if it has one, else ``value``."""
    qualname = getattr(value, "__qualname__", "")
    if f"{getattr(value, '__module__', '')}:{qualname}" not in _LEGACY:
        return value
    return getattr(importlib.import_module("genlm_anyio.compat.legacy"), qualname)


# A view's own, set by the import system from its spec (or not at all), never the target's.
_OWN_ATTRIBUTES = frozenset(
    {"__path__", "__file__", "__cached__", "__spec__", "__loader__", "__package__", "__getattr__", "__dir__"}
)


class _View(ModuleType):
    """A ``genlm.backend`` module: each name is looked up in the genlm-anyio module
    it stands for (on first use, so lazy names stay lazy) and passed through
    :func:`legacy_of`; a submodule is its ``genlm.backend`` view."""

    def __init__(self, name: str, target: ModuleType):
        super().__init__(name, target.__doc__)
        self.__target = target

    def __getattr__(self, name: str) -> object:
        if name in _OWN_ATTRIBUTES:
            raise AttributeError(name)
        value = getattr(self.__target, name)
        if isinstance(value, ModuleType):
            sub = f"{self.__name__}.{name}"
            if target_of(sub) == value.__name__:
                value = importlib.import_module(sub)
        else:
            value = legacy_of(value)
        setattr(self, name, value)
        return value

    def __dir__(self) -> list[str]:
        return sorted(set(dir(self.__target)) | set(self.__dict__))


class _Alias(importlib.abc.Loader):
    """Loads a ``genlm.backend`` name as a view of the genlm-anyio module it stands for."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return _View(spec.name, importlib.import_module(self.target))

    def exec_module(self, module: ModuleType) -> None:
        """The view has nothing to run: its names are the target's."""


class _Namespace(importlib.abc.Loader):
    """An empty ``genlm`` package, for environments with no other ``genlm.*`` distribution."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        module.__path__ = []


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "genlm":
            if importlib.machinery.PathFinder.find_spec(fullname, path) is not None:
                return None  # genlm-control and friends provide the namespace
            return importlib.machinery.ModuleSpec(fullname, _Namespace(), is_package=True)
        name = target_of(fullname)
        if name is None:
            return None
        found = importlib.util.find_spec(name)
        if found is None:
            return None  # a genlm-backend module genlm-anyio has no counterpart of
        # The view's __file__ is its target's, so tracebacks and tools see which module serves it.
        spec = importlib.machinery.ModuleSpec(
            fullname, _Alias(name), origin=found.origin, is_package=found.submodule_search_locations is not None
        )
        spec.has_location = found.has_location
        return spec


_finder = _Finder()


def installed() -> bool:
    """Whether ``genlm.backend`` resolves to genlm-anyio in this interpreter."""
    return _finder in sys.meta_path


def install() -> None:
    """Make ``import genlm.backend...`` give genlm-anyio's modules (idempotent).

    Raises:
        RuntimeError: ``genlm.backend`` was already imported from genlm-backend in
            this interpreter; modules holding its objects could not be switched.
    """
    if installed():
        return
    loaded = sys.modules.get(_PREFIX)
    if loaded is not None and not (loaded.__name__ or "").startswith("genlm_anyio"):
        raise RuntimeError(
            "genlm.backend was imported from genlm-backend before genlm_anyio.compat.install(); "
            "install the switch first (or run the program with `python -m genlm_anyio.compat`)"
        )
    sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    """Undo :func:`install`: forget the ``genlm.backend`` aliases imported so far."""
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    for name in [n for n in sys.modules if target_of(n) is not None]:
        del sys.modules[name]


def _install_from_environment() -> None:
    """Called at start-up by ``genlm_anyio_compat.pth``: install when ``GENLM_ANYIO_COMPAT`` is set."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on"):
        install()
