"""Run make targets one after another, every one even when one fails, and print a summary.

    python3 scripts/run_targets.py [--first TARGET] [--elsewhere TARGET ...] TARGET [TARGET ...]

Each target runs as ``make TARGET`` with its output streaming as usual. The
``--first`` target (the set-up the others need) runs before them; if it fails
the others are reported as not run, since each would fail the same way. At the
end a table gives each target's result and seconds, and names the ``--elsewhere``
targets: checks this run leaves to a target of their own. The exit status is 0
when every target passed and 1 otherwise.

Standard library only, so it runs before the virtual environment exists.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def run(target: str) -> tuple[bool, float]:
    """``make TARGET`` in this directory: whether it passed, and its seconds."""
    make = os.environ.get("MAKE", "make")
    print(f"\n==> make {target}", flush=True)
    start = time.monotonic()
    code = subprocess.call([make, "--no-print-directory", target])
    seconds = time.monotonic() - start
    print(f"<== make {target}: {'passed' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s", flush=True)
    return code == 0, seconds


def table(rows: list[tuple[str, str, float | None]]) -> str:
    """The summary: one row per target, then the total."""
    width = max(len("target"), *(len(name) for name, _, _ in rows))
    lines = [f"{'target':<{width}}  {'result':<7}  {'seconds':>7}", f"{'-' * width}  {'-' * 7}  {'-' * 7}"]
    for name, result, seconds in rows:
        lines.append(f"{name:<{width}}  {result:<7}  {'-' if seconds is None else f'{seconds:.0f}':>7}")
    total = sum(seconds for _, _, seconds in rows if seconds is not None)
    lines.append(f"{'total':<{width}}  {'':<7}  {total:>7.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", help="a target the others need; if it fails, they are not run")
    parser.add_argument(
        "--elsewhere", action="append", default=[], help="a target this run leaves out, named in the summary"
    )
    parser.add_argument("targets", nargs="+")
    args = parser.parse_args(argv)

    rows: list[tuple[str, str, float | None]] = []
    if args.first:
        ok, seconds = run(args.first)
        rows.append((args.first, "passed" if ok else "FAILED", seconds))
        if not ok:
            rows += [(target, "not run", None) for target in args.targets]
    if not rows or rows[0][1] == "passed":
        for target in args.targets:
            ok, seconds = run(target)
            rows.append((target, "passed" if ok else "FAILED", seconds))

    failed = [name for name, result, _ in rows if result != "passed"]
    print("\n" + table(rows))
    if args.elsewhere:
        print("\nleft to targets of their own: " + ", ".join(f"make {target}" for target in args.elsewhere))
    print(
        f"\n{len(rows) - len(failed)} of {len(rows)} passed"
        + (f"; failed or not run: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
