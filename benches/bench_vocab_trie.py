"""Byte vocabulary and trie: genlm-anyio beside genlm-backend 0.3.1, same process.

Workload (the issue's): the qwen2 tokenizer (151,936 ids) from llama.cpp's
vocabulary files; decode_vocab, trie construction, one weight_sum, a batch of
32 weight_sums, and the same for weight_max.
"""

from __future__ import annotations

import assets
import numpy as np
from common import Table, best_of


def main() -> None:
    from genlm.backend.tokenization import decode_vocab as anchor_decode_vocab
    from genlm.backend.trie import ParallelTokenCharacterTrie
    from genlm.backend.trie import TokenCharacterTrie as AnchorTrie
    from transformers import AutoTokenizer

    import genlm_anyio

    tok = AutoTokenizer.from_pretrained(assets.tokenizer_dir("qwen2"))
    table = Table(f"qwen2 vocabulary ({len(tok)} ids), CPU", "genlm-backend")

    ours_decode = best_of(lambda: genlm_anyio.decode_vocab(tok), repeat=5)
    anchor_decode = best_of(lambda: anchor_decode_vocab(tok), repeat=1, warmup=0)
    table.add("decode_vocab", ours_decode, anchor_decode, 0.050)

    vocab, _ = genlm_anyio.decode_vocab(tok)
    anchor_vocab, _ = anchor_decode_vocab(tok)
    ours_build = best_of(lambda: genlm_anyio.TokenCharacterTrie(vocab), repeat=5)
    anchor_build = best_of(lambda: AnchorTrie(anchor_vocab), repeat=1, warmup=0)
    table.add("trie build", ours_build, anchor_build, 0.150)

    trie = genlm_anyio.TokenCharacterTrie(vocab)
    anchor = AnchorTrie(anchor_vocab)
    rng = np.random.default_rng(0)
    ws = rng.random(len(vocab)).astype(np.float32)
    batch = rng.random((32, len(vocab))).astype(np.float32)

    # Same layout and numbering as genlm-backend's, so whole arrays compare.
    assert trie.num_nodes == len(anchor.children)
    np.testing.assert_allclose(trie.weight_sum(ws), anchor.weight_sum(ws), rtol=1e-5)
    table.add("weight_sum", best_of(lambda: trie.weight_sum(ws), 50), best_of(lambda: anchor.weight_sum(ws), 5), 0.0008)
    table.add("weight_max", best_of(lambda: trie.weight_max(ws), 50), best_of(lambda: anchor.weight_max(ws), 5))
    table.add("weight_logsumexp", best_of(lambda: trie.weight_logsumexp(np.log(ws)), 20), None)
    table.add(
        "batch_weight_sum (32)",
        best_of(lambda: trie.batch_weight_sum(batch), 10),
        best_of(lambda: anchor.batch_weight_sum(batch), 2),
        0.015,
    )

    parallel = ParallelTokenCharacterTrie(anchor_vocab, device="cpu")
    table.add(
        "  vs its torch-sparse trie",
        best_of(lambda: trie.batch_weight_sum(batch), 10),
        best_of(lambda: parallel.batch_weight_sum(batch), 2),
        0.015,
    )
    table.add(
        "batch_weight_max (32)",
        best_of(lambda: trie.batch_weight_max(batch), 10),
        best_of(lambda: anchor.batch_weight_max(batch), 1),
    )
    table.print()
    print(f"\n(trie: {trie.num_nodes} nodes; best of n wall times; genlm-backend 0.3.1 in the same process)")


if __name__ == "__main__":
    main()
