"""``python -m genlm_anyio.compat [-m MODULE | SCRIPT] [ARGS...]``: run a program
written for genlm-backend on genlm-anyio, unchanged."""

from __future__ import annotations

import os
import runpy
import sys

from . import install

USAGE = "usage: python -m genlm_anyio.compat [-m MODULE | SCRIPT] [ARGS...]"


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(0 if argv else 2)
    install()
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit(USAGE)
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
