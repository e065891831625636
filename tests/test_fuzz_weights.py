"""The trie's weight functions through the public API
(``genlm_anyio.TokenCharacterTrie(vocab).weight_sum(...)`` and kin) under
hypothesis: random vocabularies and weights of every float dtype, checked
against a direct computation over the tokens under each node.

Each call runs in a child process under a 2 GiB address-space limit
(:mod:`fuzz_sandbox`), so a crash is a failing test. Each fuzz test prints how
many cases it tried (``pytest -s``).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from fuzz_sandbox import Sandbox
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import genlm_anyio

FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox()
    yield box
    box.close()
    print(f"\n[fuzz] {__name__}: {box.calls} calls in the memory-limited child")


@pytest.mark.parametrize("dtype", [">f8", np.longdouble])
def test_non_native_float64_weights_are_not_narrowed(dtype):
    """Big-endian float64 and longdouble were narrowed to float32: 1e-300 summed to 0.0."""
    trie = genlm_anyio.TokenCharacterTrie([genlm_anyio.Token(i, b) for i, b in enumerate([b"a", b"ab", b"b"])])
    ws = np.full(3, 1e-300, dtype=dtype)
    sums = trie.weight_sum(ws)
    assert sums[trie.root] == pytest.approx(3e-300, rel=1e-12)
    assert sums[trie.node_of(b"a")] == pytest.approx(2e-300, rel=1e-12)
    assert trie.weight_max(ws)[trie.root] == 1e-300
    assert trie.batch_weight_sum(np.stack([ws, ws]))[1, trie.root] == pytest.approx(3e-300, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_widen_exactly(dtype):
    trie = genlm_anyio.TokenCharacterTrie([genlm_anyio.Token(i, b) for i, b in enumerate([b"a", b"ab", b"b"])])
    ws = torch.tensor([0.1, 0.2, 0.3], dtype=dtype)
    want = ws.double().numpy()
    assert trie.weight_sum(ws)[trie.root] == want.sum()
    assert trie.weight_max(ws)[trie.node_of(b"a")] == want[:2].max()


# Weights: ordinary values, ones that float32 cannot hold, and the special values.
VALUES = (
    st.floats(-1e6, 1e6, allow_nan=False)
    | st.sampled_from([1e-300, -1e-300, 1e300, 0.0, -0.0])
    | st.sampled_from([float("inf"), float("-inf"), float("nan")])
)
DTYPES = [
    ("numpy", "float32"),
    ("numpy", "float64"),
    ("numpy", ">f8"),
    ("numpy", ">f4"),
    ("numpy", "float16"),
    ("numpy", "longdouble"),
    ("torch", "float32"),
    ("torch", "float64"),
    ("torch", "float16"),
    ("torch", "bfloat16"),
]
METHODS = ["weight_sum", "weight_max", "weight_logsumexp"]
METHODS += ["batch_" + m for m in METHODS]


def as_sent(kind: str, dtype: str, values: list[float]) -> np.ndarray:
    """The float64 values the trie receives for ``values`` sent as ``dtype``."""
    if kind == "torch":
        return torch.tensor(values, dtype=torch.float64).to(getattr(torch, dtype)).double().numpy()
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float64).astype(dtype).astype(np.float64)


@np.errstate(invalid="ignore")
def reference(method: str, ws: np.ndarray) -> float:
    """``method``'s value at one node from the weights of the tokens under it (never empty)."""
    if method.endswith("weight_sum"):
        return float(np.sum(ws))
    if method.endswith("weight_max"):
        return float(np.max(ws))
    return float(np.logaddexp.reduce(ws))


@st.composite
def cases(draw):
    vocab = draw(st.lists(st.binary(max_size=4).map(lambda b: bytes(c % 3 + 97 for c in b)), min_size=1, max_size=16))
    method = draw(st.sampled_from(METHODS))
    row = st.lists(VALUES, min_size=len(vocab), max_size=len(vocab))
    values = draw(st.lists(row, min_size=1, max_size=3)) if method.startswith("batch_") else draw(row)
    return vocab, values, draw(st.sampled_from(DTYPES)), method


def test_fuzz_weight_functions(sandbox):
    count = 0

    @settings(FUZZ, max_examples=300)
    @given(cases())
    def case(c):
        nonlocal count
        count += 1
        vocab, values, (kind, dtype), method = c
        reply = sandbox.call("trie", vocab, method, (kind, values, dtype))
        sent = np.atleast_2d(as_sent(kind, dtype, values))
        if np.isnan(sent).any():
            # A NaN weight is refused, named by its position (and its row, in a batch).
            assert reply[:2] == ("error", "ValueError"), reply
            named = re.search(r"(?:row (\d+), )?token (\d+)", reply[2])
            assert named, reply
            row, token = int(named.group(1) or 0), int(named.group(2))
            assert np.flatnonzero(np.isnan(sent[row]))[0] == token, reply
            return
        assert reply[0] == "ok", reply
        out, prefixes, leaves = reply[1]
        # genlm-backend's layout: a node per distinct prefix, plus a leaf per entry.
        inner = [p for n, p in enumerate(prefixes) if n not in set(leaves)]
        assert sorted(inner) == sorted({t[:k] for t in vocab for k in range(len(t) + 1)})
        assert len(set(leaves)) == len(vocab) and [prefixes[n] for n in leaves] == vocab
        assert out.shape == ((len(sent),) if method.startswith("batch_") else ()) + (len(prefixes),)
        entry_of = {node: i for i, node in enumerate(leaves)}
        for row, got in zip(sent, np.atleast_2d(out)):
            for node, prefix in enumerate(prefixes):
                if node in entry_of:
                    under = row[[entry_of[node]]]
                else:
                    under = row[[i for i, t in enumerate(vocab) if t.startswith(prefix)]]
                want = reference(method, under)
                scale = np.sum(np.abs(under[np.isfinite(under)]))
                assert got[node] == pytest.approx(want, rel=1e-9, abs=1e-12 * scale, nan_ok=True), (
                    prefix,
                    method,
                    under,
                )

    case()
    print(f"\n[fuzz] trie weight functions: {count} cases")
