"""Byte vocabulary and trie: genlm-anyio beside genlm-backend, same process.

    PYTHONPATH=. python benches/bench_vocab_trie.py [--repeats 3]

Workload (the issue's): the qwen2 tokenizer (151,936 ids) from llama.cpp's
vocabulary files; decode_vocab, trie construction, one weight_sum, a batch of
32 weight_sums, and the same for weight_max. Each operation runs on both
libraries the same way: one warm-up call each, then ``--repeats`` alternated
samples, each sample the mean of the same number of back-to-back calls; figures
are the best and the median. genlm-backend's modules are checked to be its own
files. Writes ``benches/results/vocab_trie.json``.
"""

from __future__ import annotations

import argparse

import numpy as np
from common import MIN_REPEATS, Report, alternate, best_median, genlm_backend_module, ratio

from tools import assets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    import genlm_anyio

    anchor_tokenization = genlm_backend_module("genlm.backend.tokenization")
    anchor_trie = genlm_backend_module("genlm.backend.trie")

    tok = AutoTokenizer.from_pretrained(assets.tokenizer_dir("qwen2"))
    vocab, _ = genlm_anyio.decode_vocab(tok)
    anchor_vocab, _ = anchor_tokenization.decode_vocab(tok)
    trie = genlm_anyio.TokenCharacterTrie(vocab)
    anchor = anchor_trie.TokenCharacterTrie(anchor_vocab)
    parallel = anchor_trie.ParallelTokenCharacterTrie(anchor_vocab, device="cpu")
    rng = np.random.default_rng(0)
    ws = rng.random(len(vocab)).astype(np.float32)
    batch = rng.random((32, len(vocab))).astype(np.float32)

    # Same layout and numbering as genlm-backend's, so whole arrays compare.
    assert trie.num_nodes == len(anchor.children)
    np.testing.assert_allclose(trie.weight_sum(ws), anchor.weight_sum(ws), rtol=1e-5)
    np.testing.assert_allclose(trie.batch_weight_max(batch), anchor.batch_weight_max(batch), rtol=1e-6)

    report = Report("vocab_trie", "Byte vocabulary and trie")
    table = report.table(
        f"qwen2 vocabulary ({len(tok)} ids, trie of {trie.num_nodes} nodes), CPU (best / median)",
        ["operation", "genlm-anyio", "genlm-backend", "speed-up", "calls per sample", "target"],
        notes=[
            f"Both libraries in one process, one warm-up call each, {args.repeats} alternated samples per "
            "operation, a sample being the mean of the stated number of calls; speed-up = genlm-backend's best "
            "/ genlm-anyio's best. The torch-sparse row is genlm-backend's ParallelTokenCharacterTrie on the CPU.",
        ],
    )
    # (operation, ours, theirs, calls per sample, target in seconds)
    cases = [
        (
            "decode_vocab",
            lambda: genlm_anyio.decode_vocab(tok),
            lambda: anchor_tokenization.decode_vocab(tok),
            1,
            0.050,
        ),
        (
            "trie build",
            lambda: genlm_anyio.TokenCharacterTrie(vocab),
            lambda: anchor_trie.TokenCharacterTrie(anchor_vocab),
            1,
            0.150,
        ),
        ("weight_sum", lambda: trie.weight_sum(ws), lambda: anchor.weight_sum(ws), 20, 0.0008),
        ("weight_max", lambda: trie.weight_max(ws), lambda: anchor.weight_max(ws), 20, None),
        (
            "batch_weight_sum (32)",
            lambda: trie.batch_weight_sum(batch),
            lambda: anchor.batch_weight_sum(batch),
            2,
            0.015,
        ),
        (
            "... vs its torch-sparse trie",
            lambda: trie.batch_weight_sum(batch),
            lambda: parallel.batch_weight_sum(batch),
            2,
            0.015,
        ),
        (
            "batch_weight_max (32)",
            lambda: trie.batch_weight_max(batch),
            lambda: anchor.batch_weight_max(batch),
            2,
            None,
        ),
    ]
    for what, ours, theirs, number, target in cases:
        results = alternate({"genlm-anyio": ours, "genlm-backend": theirs}, repeats=args.repeats, number=number)
        for name, samples in results.items():
            report.measure(f"{what}/{name}", samples)
        mine, ref = results["genlm-anyio"], results["genlm-backend"]
        goal = "-" if target is None else f"< {target * 1e3:g} ms: {'met' if mine.best < target else 'missed'}"
        table.add(what, best_median(mine), best_median(ref), ratio(ref.best, mine.best), number, goal)

    logs = np.log(ws)
    results = alternate({"genlm-anyio": lambda: trie.weight_logsumexp(logs)}, repeats=args.repeats, number=20)
    report.measure("weight_logsumexp/genlm-anyio", results["genlm-anyio"])
    table.add("weight_logsumexp", best_median(results["genlm-anyio"]), "(none)", "-", 20, "-")
    report.write()


if __name__ == "__main__":
    main()
