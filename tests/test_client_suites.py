"""The client suites' machinery: the pytest plugin (seeding, which tests reach
genlm-anyio, the report), the committed lists and their check, and the
work-copy edits, each on a small suite written here (no model weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tools import client_lists, client_rewrites, client_suites

ROOT = Path(client_lists.__file__).resolve().parent.parent

SUITE = """
import gc
import random
import weakref

import numpy as np
import pytest

KEPT = []


def test_seeded():
    assert random.random() == random.Random(0).random()
    assert np.random.random() == np.random.RandomState(0).random_sample()


def test_seeded_again():  # the state is reset before each test, not once
    test_seeded()


def test_reaches_the_trie():
    from genlm.backend.tokenization import Token
    from genlm.backend.trie import TokenCharacterTrie

    trie = TokenCharacterTrie([Token(0, b"a"), Token(1, b"ab")])
    assert trie.weight_sum([0.25, 0.75])[trie.root] == 1.0
    holder = type("Holder", (), {})()
    holder.cycle = holder  # only the garbage collector frees it
    weakref.finalize(holder, trie.weight_sum, [0.25, 0.75])
    KEPT.append(holder)


def test_frees_an_earlier_tests_object():  # its finaliser calls the trie: not a call of this test
    KEPT.clear()
    assert gc.collect() > 0


def test_reaches_from_a_fixture(vocab):
    assert vocab == [b"a"]  # a list: no call into genlm-anyio here


@pytest.fixture
def vocab():  # a call in a fixture's set-up counts for the test that asks for it
    from genlm.backend.tokenization import Token
    from genlm.backend.trie import TokenCharacterTrie

    return TokenCharacterTrie([Token(0, b"a")]).decode


def test_imports_only():
    import genlm.backend.trie  # noqa: F401  (an import is not a call into genlm-anyio)
    import genlm.backend.tokenization.bytes  # noqa: F401


def test_fails():
    assert 1 == 2, "one is not two"


def test_skips():
    pytest.skip("not here")


def test_deselected():
    raise AssertionError("never runs")
"""


def run_suite(tmp_path: Path, *args: str, **env: str) -> dict:
    (tmp_path / "test_suite.py").write_text(SUITE, encoding="utf-8")
    (tmp_path / "deselect.json").write_text(json.dumps({r"::test_deselected$": "why"}), encoding="utf-8")
    report = tmp_path / "report.json"
    full_env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        GENLM_ANYIO_CLIENT_REPORT=str(report),
        GENLM_ANYIO_CLIENT_DESELECT=str(tmp_path / "deselect.json"),
        **env,
    )
    cmd = [sys.executable, "-m", "genlm_anyio.compat", "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    subprocess.run([*cmd, "test_suite.py"], cwd=tmp_path, env=full_env, check=False, capture_output=True)
    return json.loads(report.read_text(encoding="utf-8")) if report.exists() else {}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The plugin's report of the suite above, run once with the plugin loaded."""
    return run_suite(tmp_path_factory.mktemp("suite"), "-p", "tools.clients_plugin")


def test_the_plugin_is_loaded_by_the_runner_and_seeds_each_test(report):
    assert client_suites.PYTEST_ARGS[:2] == ["-p", "tools.clients_plugin"]
    assert report["plugin"] == "clients_plugin"
    tests = report["tests"]
    assert tests["test_suite.py::test_seeded"]["outcome"] == "passed"
    assert tests["test_suite.py::test_seeded_again"]["outcome"] == "passed"


def test_without_the_plugin_there_is_no_report(tmp_path):
    assert run_suite(tmp_path) == {}


def test_the_report_says_which_tests_call_into_genlm_anyio(report):
    tests = report["tests"]
    reached = {t.split("::")[1] for t, v in tests.items() if v["reached"]}
    assert reached == {"test_reaches_the_trie", "test_reaches_from_a_fixture"}


def test_the_report_holds_outcomes_messages_and_deselections(report):
    tests = report["tests"]
    assert tests["test_suite.py::test_fails"] == {
        "outcome": "failed",
        "message": "AssertionError: one is not two",
        "reached": False,
    }
    assert tests["test_suite.py::test_skips"]["outcome"] == "skipped"
    assert tests["test_suite.py::test_skips"]["message"] == "not here"
    assert "test_suite.py::test_deselected" not in tests
    assert report["deselected"] == {r"::test_deselected$": ["test_suite.py::test_deselected"]}


def test_a_selection_runs_only_the_listed_tests(tmp_path):
    (tmp_path / "select.txt").write_text("test_suite.py::test_fails\n", encoding="utf-8")
    tests = run_suite(tmp_path, "-p", "tools.clients_plugin", GENLM_ANYIO_CLIENT_SELECT=str(tmp_path / "select.txt"))[
        "tests"
    ]
    assert list(tests) == ["test_suite.py::test_fails"]


@pytest.fixture
def lists(tmp_path, monkeypatch):
    """The committed lists, moved to a temporary folder with one entry each."""
    monkeypatch.setattr(client_lists, "KNOWN_FAILURES", tmp_path / "known_failures.txt")
    monkeypatch.setattr(client_lists, "KNOWN_SKIPS", tmp_path / "known_skips.txt")
    monkeypatch.setattr(client_lists, "REACHING", tmp_path / "reaching.txt")
    monkeypatch.setattr(client_lists, "ROOT", tmp_path)
    client_lists.write_failures(
        {"s::t.py::fails": client_lists.Known("AssertionError: one", "why")}, client_lists.KNOWN_FAILURES
    )
    client_lists.write_ids({"s::t.py::skips": "not here"}, client_lists.KNOWN_SKIPS, "skips")
    client_lists.write_ids({"s::t.py::fails": "", "s::t.py::passes": ""}, client_lists.REACHING, "reaching")


def outcome(outcome: str, message: str = "", reached: bool = True) -> dict:
    return {"outcome": outcome, "message": message, "reached": reached}


AS_LISTED = {
    "s::t.py::fails": outcome("failed", "AssertionError: one is not two"),
    "s::t.py::passes": outcome("passed"),
    "s::t.py::skips": outcome("skipped", "not here", reached=False),
}


def test_a_run_as_listed_passes_the_check(lists):
    assert client_lists.read_failures() == {"s::t.py::fails": client_lists.Known("AssertionError: one", "why")}
    assert client_lists.check("s", AS_LISTED, None) == []
    assert client_lists.check("s", AS_LISTED, {"s::t.py::fails", "s::t.py::passes"}) == [
        "s::t.py::skips: skipped ('not here') but not in known_skips.txt",
        "s: 1 skipped, 0 listed in known_skips.txt",
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"s::t.py::fails": outcome("passed")}, "s::t.py::fails: now passed (remove it from known_failures.txt)"),
        (
            {"s::t.py::fails": outcome("failed", "TypeError: x")},
            "s::t.py::fails: fails differently: expected 'AssertionError: one', got 'TypeError: x'",
        ),
        ({"s::t.py::passes": outcome("failed", "E")}, "s::t.py::passes: NEW FAILURE 'E'"),
        ({"s::t.py::skips": outcome("passed", reached=False)}, "s::t.py::skips: listed in known_skips.txt but passed"),
        ({"s::t.py::new": outcome("skipped", "x", False)}, "s::t.py::new: skipped ('x') but not in known_skips.txt"),
        ({"s::t.py::passes": outcome("passed", reached=False)}, "s::t.py::passes: in reaching.txt but no longer calls"),
        ({"s::t.py::new": outcome("passed")}, "s::t.py::new: calls into genlm-anyio but is not in reaching.txt"),
    ],
)
def test_every_departure_from_the_lists_fails_the_check_and_names_the_list(lists, change, expected):
    problems = client_lists.check("s", {**AS_LISTED, **change}, None)
    assert any(p.startswith(expected) for p in problems), problems


def test_a_listed_failure_needs_a_reason(lists):
    client_lists.write_failures(
        {"s::t.py::fails": client_lists.Known("AssertionError", "")}, client_lists.KNOWN_FAILURES
    )
    assert client_lists.check("s", AS_LISTED, None) == [
        "s::t.py::fails: no error or no reason given (edit known_failures.txt)"
    ]


def test_an_edit_that_no_longer_applies_stops_the_run(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_llm.py").write_text("@v1_capable\ndef test_a():\n    pass\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="has 1 of '@v1_capable\\\\n', expected 7"):
        client_rewrites.apply_edits(tmp_path, "genlm-backend")


def test_an_edit_applies_inside_its_test_only(tmp_path, monkeypatch):
    source = textwrap.dedent(
        """\
        @cuda_only
        def test_memory():
            x = f(device="cuda")


        @cuda_only
        def test_cache_contains():
            x = f(device="cuda")
        """
    )
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_cache.py").write_text(source, encoding="utf-8")
    edits = tuple(e for e in client_rewrites.EDITS["genlm-backend"] if e.file == "tests/test_cache.py")
    monkeypatch.setitem(client_rewrites.EDITS, "genlm-backend", edits)
    client_rewrites.apply_edits(tmp_path, "genlm-backend")
    assert (tmp_path / "tests" / "test_cache.py").read_text(encoding="utf-8") == source.replace(
        '@cuda_only\ndef test_cache_contains():\n    x = f(device="cuda")',
        'def test_cache_contains():\n    x = f(device="cpu")',
    )


def test_a_model_named_for_its_tokenizer_gets_the_tokenizer_of_its_family(tmp_path):
    (tmp_path / "t.py").write_text(
        'a = AutoTokenizer.from_pretrained("openai-community/gpt2")\nb = load_model_by_name("gpt2")\n'
        'c = load_tokenizer("google/gemma-7b", True)\n',
        encoding="utf-8",
    )
    client_rewrites.substitute_names(tmp_path, "SMOLLM2", lambda name: Path("/tok") / name, {})
    assert (tmp_path / "t.py").read_text(encoding="utf-8") == (
        'a = AutoTokenizer.from_pretrained("/tok/gpt-2")\nb = load_model_by_name("SMOLLM2")\n'
        'c = load_tokenizer("/tok/llama-spm", True)\n'
    )


def test_further_error_lines_are_alternatives(lists):
    known = client_lists.Known("IndexError", "why", also=("ValueError: token_ids",))
    client_lists.write_failures({"s::t.py::fails": known}, client_lists.KNOWN_FAILURES)
    assert client_lists.read_failures() == {"s::t.py::fails": known}
    for message in ("IndexError: list index out of range", "ValueError: token_ids_list[0] holds 50255"):
        assert client_lists.check("s", {**AS_LISTED, "s::t.py::fails": outcome("failed", message)}, None) == []
    (problem,) = client_lists.check("s", {**AS_LISTED, "s::t.py::fails": outcome("failed", "KeyError: 3")}, None)
    assert "fails differently" in problem
