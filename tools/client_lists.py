"""The committed lists a client-suite run is checked against, and the check.

- ``tests/clients/known_failures.txt``: each test that fails on genlm-anyio, a
  block of lines: ``SUITE::NODEID``, then ``    error: FIRST LINE`` (the
  start of the first line of the error it must fail with; further ``error:``
  lines are alternatives, for a test whose drawn inputs meet one cause in
  several ways) and ``    reason: WHY``.
- ``tests/clients/known_skips.txt``: each test a suite skips here,
  ``SUITE::NODEID  # the skip message``.
- ``tests/clients/reaching.txt``: the tests that called into genlm-anyio in
  the last full run (``SUITE::NODEID``); ``make test`` runs only these.

A run fails on: an unlisted failure, a listed test that fails with another
error or passes, a listed entry without a reason, a skip that is not listed or
a listed one that no longer skips, and (for the reaching list) a listed test
that no longer reaches genlm-anyio or is gone, or, in a full run, a test that
reaches it and is not listed. Each message names the list to edit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "tests" / "clients"
KNOWN_FAILURES = FOLDER / "known_failures.txt"
KNOWN_SKIPS = FOLDER / "known_skips.txt"
REACHING = FOLDER / "reaching.txt"

FAILED = ("failed", "error", "xpassed")


@dataclass(frozen=True)
class Known:
    error: str
    reason: str
    also: tuple[str, ...] = ()
    """Other errors it may fail with instead (further ``error:`` lines): a test whose
    inputs Hypothesis draws meets the same cause through other inputs."""

    def matches(self, message: str) -> bool:
        """Whether ``message`` starts with one of the listed errors."""
        return any(message.startswith(e) for e in (self.error, *self.also) if e)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def read_failures(path: Path | None = None) -> dict[str, Known]:
    """``known_failures.txt`` (or ``path``) as test id -> expected error and reason."""
    path = path or KNOWN_FAILURES
    known: dict[str, Known] = {}
    current: str | None = None
    fields: dict[str, str] = {}
    also: list[str] = []
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    for number, line in enumerate([*lines, ""], 1):
        if line.startswith("#"):
            continue
        if line.startswith("    ") and current is not None:
            key, sep, value = line.strip().partition(":")
            if not sep or key not in ("error", "reason"):
                raise ValueError(f"{_rel(path)}:{number}: expected 'error: ...' or 'reason: ...', got {line!r}")
            if key == "error" and "error" in fields:
                also.append(value.strip())
            else:
                fields[key] = value.strip()
            continue
        if current is not None:
            known[current] = Known(fields.get("error", ""), fields.get("reason", ""), tuple(also))
        current, fields, also = (line.strip() or None), {}, []
    return known


def write_failures(known: dict[str, Known], path: Path | None = None) -> None:
    path = path or KNOWN_FAILURES
    header = (
        "# Client tests that fail on genlm-anyio (docs/compat.md groups them). Each: the test id, the start of the\n"
        "# first line of the error it must fail with (or of one of several), and why. A test that fails otherwise, or\n"
        "# passes, fails the run.\n"
    )
    body = "".join(
        f"{t}\n    error: {k.error}".rstrip()
        + "".join(f"\n    error: {e}" for e in k.also)
        + f"\n    reason: {k.reason}".rstrip()
        + "\n"
        for t, k in sorted(known.items())
    )
    path.write_text(header + body, encoding="utf-8")


def read_ids(path: Path) -> dict[str, str]:
    """A list of ``SUITE::NODEID  # note`` lines as id -> note."""
    ids = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                test_id, _, note = line.partition("  # ")
                ids[test_id.strip()] = note.strip()
    return ids


def write_ids(ids: dict[str, str], path: Path, header: str) -> None:
    lines = (f"{t}  # {note}" if note else t for t, note in sorted(ids.items()))
    path.write_text(f"# {header}\n" + "".join(f"{line}\n" for line in lines), encoding="utf-8")


def check(
    suite: str, tests: dict[str, dict], selected: set[str] | None, left_out: re.Pattern | None = None
) -> list[str]:
    """Every way this run of ``suite`` (test id -> outcome, message, reached)
    departs from the committed lists. ``selected`` is the subset run (None for a
    full run) and ``left_out`` matches the node ids a partial run left out:
    entries outside the run are not judged."""
    problems: list[str] = []

    def judged(test_id: str) -> bool:
        if not test_id.startswith(suite + "::") or (selected is not None and test_id not in selected):
            return False
        return left_out is None or not left_out.search(test_id.split("::", 1)[1])

    failures, skips, reaching = read_failures(), read_ids(KNOWN_SKIPS), read_ids(REACHING)
    for test_id, known in failures.items():
        if not judged(test_id):
            continue
        if not known.reason or not known.error:
            problems.append(f"{test_id}: no error or no reason given (edit {_rel(KNOWN_FAILURES)})")
        got = tests.get(test_id)
        if got is None:
            problems.append(f"{test_id}: listed as failing but did not run (remove it from {_rel(KNOWN_FAILURES)})")
        elif got["outcome"] not in FAILED:
            problems.append(f"{test_id}: now {got['outcome']} (remove it from {_rel(KNOWN_FAILURES)})")
        elif not known.matches(got["message"]):
            problems.append(
                f"{test_id}: fails differently: expected {known.error!r}, got {got['message']!r} "
                f"(fix it, or edit its error in {_rel(KNOWN_FAILURES)})"
            )
    for test_id, got in sorted(tests.items()):
        if got["outcome"] in FAILED and test_id not in failures:
            problems.append(
                f"{test_id}: NEW FAILURE {got['message']!r} (fix it, or list it with its reason in "
                f"{_rel(KNOWN_FAILURES)})"
            )
    skipped = {t for t, got in tests.items() if got["outcome"] in ("skipped", "xfailed")}
    listed = {t for t in skips if judged(t)}
    for test_id in sorted(skipped - listed):
        problems.append(f"{test_id}: skipped ({tests[test_id]['message']!r}) but not in {_rel(KNOWN_SKIPS)}")
    for test_id in sorted(listed - skipped):
        state = tests[test_id]["outcome"] if test_id in tests else "did not run"
        problems.append(f"{test_id}: listed in {_rel(KNOWN_SKIPS)} but {state} (remove it there)")
    if len(skipped) != len(listed):
        problems.append(f"{suite}: {len(skipped)} skipped, {len(listed)} listed in {_rel(KNOWN_SKIPS)}")
    reached = {t for t, got in tests.items() if got["reached"]}
    committed = {t for t in reaching if judged(t)}
    update = f"(run `python -m tools.client_suites --full --update` to regenerate {_rel(REACHING)})"
    for test_id in sorted(committed - reached):
        state = "did not run" if test_id not in tests else "no longer calls into genlm-anyio"
        problems.append(f"{test_id}: in {_rel(REACHING)} but {state} {update}")
    if selected is None and left_out is None:
        for test_id in sorted(reached - committed):
            problems.append(f"{test_id}: calls into genlm-anyio but is not in {_rel(REACHING)} {update}")
    return problems
