"""Run programs written for genlm-backend on genlm-anyio, without editing them.

After :func:`install`, ``import genlm.backend`` (and every module under it that
genlm-backend 0.3.1 has) gives genlm-anyio's module of the same name, whether or
not genlm-backend is installed. Three ways to switch:

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

__all__ = ["ENV_VAR", "install", "installed", "target_of", "uninstall"]

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


class _Alias(importlib.abc.Loader):
    """Loads a ``genlm.backend`` name as the genlm-anyio module it stands for."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The module is genlm-anyio's, already executed."""


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
        if importlib.util.find_spec(name) is None:
            return None  # a genlm-backend module genlm-anyio has no counterpart of
        spec = importlib.machinery.ModuleSpec(fullname, _Alias(name))
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
