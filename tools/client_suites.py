"""Run our users' own test suites on genlm-anyio, through the compat switch.

    python -m tools.client_suites [SUITE ...] [--full] [--update] [--reference]

SUITE is one of ``genlm-backend``, ``genlm-control``, ``genlm-bytes`` (default:
all). Each suite's released sdist is fetched from PyPI into the asset cache and
unpacked into a fresh work folder, rewritten there for this machine
(``client_rewrites.py``: hub names become local stand-ins, GPU markers are
dropped where the test's subject runs on a CPU), and its tests run under
``python -m genlm_anyio.compat -m pytest -p tools.clients_plugin``, so every
``import genlm.backend`` in them (and in genlm-control / genlm-bytes
themselves) gets genlm-anyio. Tests that start a vLLM engine run in a pytest
process of their own (vLLM changes torch's thread settings for its process).

Without ``--full`` only the tests that call into genlm-anyio run (the list
``tests/clients/reaching.txt``, written by a full run); ``--full`` runs every
test and checks that list too. The outcome is checked against the committed
lists (``client_lists.py``); any difference fails the run and says which list
to edit. ``--update`` rewrites the lists from this run instead (new known
failures get their error and an empty reason, which the next check refuses
until someone writes one). ``--reference`` runs the same suites on
genlm-backend itself (no switch) and only reports counts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import assets, client_lists, client_rewrites

WORK = assets.CACHE / "client-suites"


@dataclass(frozen=True)
class Suite:
    spec: str
    # Node-id prefixes that start a vLLM engine: each runs in a pytest process of its own.
    own_process: tuple[str, ...] = ()
    # Node-id regular expressions left out of the run, each with its reason.
    deselected: dict[str, str] = field(default_factory=dict)


SUITES = {
    "genlm-backend": Suite(
        "genlm-backend==0.3.1",
        own_process=("tests/test_llm.py", "tests/test_lora.py"),
        deselected={
            r"^tests/test_mlx\.py::.*\[yujiepan/mamba2-tiny-random\]$": "a hub-only model (a tiny random Mamba 2), "
            "which cannot be fetched here and which genlm-anyio's MLX backend does not take (it keeps a KV cache, "
            "Mamba has none); the same 15 tests run on the local SmolLM2"
        },
    ),
    "genlm-control": Suite("genlm-control==0.4.1", own_process=("tests/potential/test_llm.py::test_vllm_backend",)),
    "genlm-bytes": Suite("genlm-bytes==0.2.0"),
}

# Hypothesis draws its examples from a fixed seed and every test starts from the same
# random state (clients_plugin.py), so a test's outcome does not change from run to run.
PYTEST_ARGS = [
    "-p",
    "tools.clients_plugin",
    "--hypothesis-seed=0",
    "-q",
    "-p",
    "no:cacheprovider",
    "--timeout=900",
    "-o",
    "asyncio_default_fixture_loop_scope=function",
]


@dataclass
class Result:
    suite: str
    tests: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def count(self, *outcomes: str) -> int:
        return sum(t["outcome"] in outcomes for t in self.tests.values())

    def line(self) -> str:
        return (
            f"{self.suite}: {self.count('passed')} passed, {self.count(*client_lists.FAILED)} failed, "
            f"{self.count('skipped', 'xfailed')} skipped, {sum(t['reached'] for t in self.tests.values())} "
            f"exercising genlm-anyio, in {self.seconds:.0f} s"
        )


# Parametrized tests on a stand-in carry its path in their ids: the lists hold it as $CACHE.
def portable(nodeid: str) -> str:
    return nodeid.replace(str(assets.CACHE), "$CACHE")


def local(nodeid: str) -> str:
    return nodeid.replace("$CACHE", str(assets.CACHE))


def prepare(suite: str) -> Path:
    """A fresh copy of ``suite``'s tests (from its sdist), rewritten for this machine,
    in a folder of this run's own (runs at the same time do not share one)."""
    archive = assets.download(SUITES[suite].spec, source=True)
    WORK.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{suite}-", dir=WORK))
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/tests/")]
        for member in members:
            member.name = member.name[len(top) + 1 :]
        tar.extractall(folder, members=members, filter="data")
    client_rewrites.apply_edits(folder, suite)
    lora, merged = assets.smollm2_lora_toy()
    client_rewrites.substitute_names(
        folder / "tests",
        str(assets.smollm2_dir()),
        assets.tokenizer_dir,
        {"vxef/smol_lora_toy": str(lora), "vxef/smol_merged_toy": str(merged)},
    )
    return folder


def _environment(folder: Path) -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)  # tools.clients_plugin, from the suite's own folder
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=pythonpath
    )
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # the engines here are small; vLLM's default is ~7 GiB each
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


def _pytest(folder: Path, env: dict[str, str], targets: list[str], reference: bool, tag: str) -> dict:
    """One pytest process over ``targets``; the plugin's report of it."""
    report = folder / f"report-{tag}.json"
    entry = [sys.executable, "-m", "pytest"]
    if not reference:
        entry[1:1] = ["-m", "genlm_anyio.compat"]
    proc = subprocess.run(
        [*entry, *targets, *PYTEST_ARGS], cwd=folder, env=dict(env, GENLM_ANYIO_CLIENT_REPORT=str(report)), check=False
    )
    if proc.returncode not in (0, 1, 5) or not report.exists():  # 5: nothing selected
        raise RuntimeError(
            f"pytest exited with {proc.returncode}"
            + (
                ""
                if report.exists()
                else " and clients_plugin wrote no report: was it loaded (-p tools.clients_plugin)?"
            )
        )
    data = json.loads(report.read_text(encoding="utf-8"))
    if data.get("plugin") != "clients_plugin":
        raise RuntimeError(f"{report.name} is not clients_plugin's report")
    return data


def run(suite: str, selected: set[str] | None, reference: bool, left_out: re.Pattern | None = None) -> Result:
    """``suite``'s tests (only ``selected`` ones unless None, none that ``left_out``
    matches), checked unless ``reference``."""
    folder = prepare(suite)
    start = time.monotonic()
    try:
        config = SUITES[suite]
        env = _environment(folder)
        deselected = dict(config.deselected)
        if left_out is not None:
            deselected[left_out.pattern] = "left out of this partial run (--leave-out)"
        (folder / "deselect.json").write_text(json.dumps(deselected), encoding="utf-8")
        env["GENLM_ANYIO_CLIENT_DESELECT"] = str(folder / "deselect.json")
        if selected is not None:
            prefix = suite + "::"
            (folder / "select.txt").write_text(
                "".join(local(t[len(prefix) :]) + "\n" for t in sorted(selected) if t.startswith(prefix)),
                encoding="utf-8",
            )
            env["GENLM_ANYIO_CLIENT_SELECT"] = str(folder / "select.txt")
        print(f"== {suite} ({'genlm-backend' if reference else 'genlm-anyio'})", flush=True)
        for pattern, why in config.deselected.items():
            print(f"   deselected {pattern}: {why}", flush=True)
        parts = [("main", ["tests", *(f"--deselect={p}" for p in config.own_process)])]
        parts += [(f"own{i}", [p]) for i, p in enumerate(config.own_process)]
        result = Result(suite)
        matched: dict[str, list[str]] = {}
        for tag, targets in parts:
            if (
                selected is not None
                and tag != "main"
                and not any(t.startswith(f"{suite}::{targets[0]}") for t in selected)
            ):
                continue  # nothing of this part is selected: no engine start for nothing
            data = _pytest(folder, env, targets, reference, tag)
            result.tests.update({f"{suite}::{portable(t)}": v for t, v in data["tests"].items()})
            for pattern, ids in data["deselected"].items():
                matched.setdefault(pattern, []).extend(ids)
        result.seconds = time.monotonic() - start
        if not reference:
            result.problems = client_lists.check(suite, result.tests, selected, left_out)
            result.problems += [
                f"{suite}: deselection {p!r} matches no test: remove it from SUITES in {Path(__file__).name}"
                for p in config.deselected
                if not matched.get(p)
            ]
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def update(results: list[Result], full: bool, left_out: re.Pattern | None) -> None:
    """Rewrite the committed lists from ``results`` (only the entries of the tests they ran)."""
    ran = {r.suite for r in results}

    def other(ids: dict) -> dict:
        return {
            t: v
            for t, v in ids.items()
            if t.split("::")[0] not in ran or (left_out is not None and left_out.search(t.split("::", 1)[1]))
        }

    known = client_lists.read_failures()
    failures = other(known)
    skips = other(client_lists.read_ids(client_lists.KNOWN_SKIPS))
    for r in results:
        for test_id, got in r.tests.items():
            if got["outcome"] in client_lists.FAILED:
                old = known.get(test_id)
                if old is not None and old.matches(got["message"]):
                    failures[test_id] = old
                else:
                    failures[test_id] = client_lists.Known(got["message"], old.reason if old else "")
            elif got["outcome"] in ("skipped", "xfailed"):
                skips[test_id] = got["message"]
    client_lists.write_failures(failures)
    client_lists.write_ids(skips, client_lists.KNOWN_SKIPS, "Client tests skipped here, each with its skip message.")
    if full:
        reaching = other(client_lists.read_ids(client_lists.REACHING))
        reaching.update({t: "" for r in results for t, got in r.tests.items() if got["reached"]})
        client_lists.write_ids(
            reaching,
            client_lists.REACHING,
            "Client tests that call into genlm-anyio (a model, trie or vocabulary), recorded by clients_plugin.py\n"
            "# in a full run (`python -m tools.client_suites --full --update`); `make test` runs these.",
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", help=f"any of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--full", action="store_true", help="every test, not only those that reach genlm-anyio")
    parser.add_argument("--update", action="store_true", help="rewrite the committed lists from this run")
    parser.add_argument("--reference", action="store_true", help="run on genlm-backend itself, without the switch")
    parser.add_argument(
        "--leave-out",
        metavar="REGEX",
        help="a partial run: leave out the node ids REGEX matches, and judge only the rest",
    )
    args = parser.parse_args()
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    selected = None if args.full or args.reference else set(client_lists.read_ids(client_lists.REACHING))
    left_out = re.compile(args.leave_out) if args.leave_out else None
    results = [run(suite, selected, args.reference, left_out) for suite in args.suites or list(SUITES)]
    for r in results:
        print(r.line())
    if args.reference:
        return 0
    if args.update:
        update(results, args.full, left_out)
        return 0
    problems = [p for r in results for p in r.problems]
    for p in problems:
        print(p)
    print(f"clients: {len(problems)} departures from tests/clients/*.txt" if problems else "clients: as listed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
