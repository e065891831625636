"""The byte vocabulary and trie on a model's tokenizer.

    python examples/vocab_demo.py MODEL_DIR_OR_GGUF
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from genlm_anyio import TokenCharacterTrie, decode_vocab


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = Path(name)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(name)


def main(name: str) -> None:
    tok = load_tokenizer(name)
    start = time.perf_counter()
    vocab, strs = decode_vocab(tok)
    decoded = time.perf_counter() - start
    start = time.perf_counter()
    trie = TokenCharacterTrie(vocab)
    built = time.perf_counter() - start
    print(f"{name}: {len(vocab)} tokens decoded in {decoded * 1e3:.1f} ms; "
          f"trie of {trie.num_nodes} nodes built in {built * 1e3:.1f} ms")

    text = "Montreal is"
    ids = tok.encode(text, add_special_tokens=False)
    print(f"\n{text!r} -> {[(i, bytes(vocab[i])) for i in ids]}")
    assert b"".join(vocab[i] for i in ids) == text.encode()

    # A uniform distribution over tokens: the mass of every continuation prefix.
    probs = np.full(len(vocab), 1.0 / len(vocab))
    mass = trie.weight_sum(probs)
    print("\nshare of the vocabulary under some byte prefixes:")
    for prefix in (b" M", b" Mont", b" Montreal", b"\n", b" is"):
        node = trie.node_of(prefix)
        share = 0.0 if node is None else mass[node]
        print(f"  {prefix!r:12} {share:8.5f}  ({trie.mask_startswith(prefix).sum()} tokens)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpt2")
