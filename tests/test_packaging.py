"""What the package promises about its imports: the vocabulary and trie modules
load without torch, and the torch-using names load on first use.

Each check runs in a fresh interpreter, since this process may have imported
torch already.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(script: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_vocab_trie_and_arrays_do_not_import_torch():
    script = """
        import sys
        import genlm_anyio.arrays, genlm_anyio.vocab, genlm_anyio.trie
        from genlm_anyio.trie import TokenCharacterTrie
        print('torch' in sys.modules)
    """
    assert _run(script) == "False"


def test_the_rust_trie_round_trip_runs_without_torch():
    script = """
        import sys
        import numpy as np
        from genlm_anyio.trie import AsyncTokenCharacterTrie, TokenCharacterTrie
        trie = TokenCharacterTrie([b"a", b"ab", b"b"])
        masses = trie.weight_sum(np.array([0.25, 0.5, 0.25]))
        print(masses[trie.node_of(b"a")], AsyncTokenCharacterTrie.from_vocab([b"a"], backend="sequential").trie.__class__.__name__, 'torch' in sys.modules)
    """
    assert _run(script) == "0.75 TokenCharacterTrie False"


def test_the_torch_names_load_on_first_use():
    script = """
        import sys
        import genlm_anyio.trie as trie
        assert 'torch' not in sys.modules
        from genlm_anyio.trie import ParallelTokenCharacterTrie
        import genlm_anyio
        print(ParallelTokenCharacterTrie.__module__, genlm_anyio.ParallelTokenCharacterTrie is ParallelTokenCharacterTrie, 'torch' in sys.modules, sorted(set(trie.__all__) - set(dir(trie))))
    """
    assert _run(script) == "genlm_anyio.trie.parallel True True []"


def test_an_unknown_name_is_an_attribute_error():
    script = """
        import genlm_anyio.trie
        try:
            genlm_anyio.trie.NoSuchTrie
        except AttributeError as e:
            print(e)
    """
    assert _run(script) == "module 'genlm_anyio.trie' has no attribute 'NoSuchTrie'"
