"""Draw docs/img/trie.svg: the trie of a five-token vocabulary with each node's mass.

The picture is made from the real trie (genlm_anyio.TokenCharacterTrie, the Rust
core): its public node numbering, its children, and ``weight_sum`` of the token
probabilities below, so each node's mass is the sum of the probabilities of the
tokens under it. docs/trie.md shows it, beside a block that computes the same masses.

    python scripts/trie_figure.py [OUT]     # default: docs/img/trie.svg
"""

from __future__ import annotations

import sys
from html import escape
from pathlib import Path

import numpy as np

from genlm_anyio import Token, TokenCharacterTrie

TOKENS = [b"the", b"then", b"they", b"to", b"a"]
PROBS = [0.30, 0.10, 0.15, 0.25, 0.20]

SLOT = 120  # horizontal room per leaf
LEVEL = 78  # vertical distance between depths
MARGIN = 40
R = 27  # radius of a prefix node


def layout(trie: TokenCharacterTrie) -> tuple[dict[int, tuple[float, int]], list[tuple[int, int, str]]]:
    """Each node's (x slot, depth), and the edges (parent, child, label; "" for a leaf edge)."""
    place: dict[int, tuple[float, int]] = {}
    edges: list[tuple[int, int, str]] = []
    next_slot = 0

    def visit(node: int, depth: int) -> float:
        nonlocal next_slot
        children = trie.children[node]
        if not children:
            place[node] = (next_slot, depth)
            next_slot += 1
            return place[node][0]
        xs = []
        for key, child in children.items():
            edges.append((node, child, "" if isinstance(key, tuple) else chr(key)))
            xs.append(visit(child, depth + 1))
        place[node] = ((min(xs) + max(xs)) / 2, depth)
        return place[node][0]

    visit(trie.root, 0)
    return place, edges


def svg(trie: TokenCharacterTrie, mass: np.ndarray) -> str:
    place, edges = layout(trie)
    leaves = {int(trie.idx_to_leaf[i, 1]): i for i in range(len(TOKENS))}
    width = MARGIN * 2 + SLOT * (1 + max(x for x, _ in place.values()))
    height = MARGIN * 2 + LEVEL * max(d for _, d in place.values()) + 20

    def at(node: int) -> tuple[float, float]:
        x, depth = place[node]
        return MARGIN + SLOT / 2 + x * SLOT, MARGIN + depth * LEVEL

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="13">',
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
    ]
    for parent, child, label in edges:
        (x1, y1), (x2, y2) = at(parent), at(child)
        dash = ' stroke-dasharray="4 3"' if not label else ""
        out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#777"{dash}/>')
        if label:
            out.append(
                f'<text x="{(x1 + x2) / 2 + 8:.1f}" y="{(y1 + y2) / 2 + 4:.1f}" fill="#b00" '
                f'font-family="monospace" font-weight="bold">{escape(label)}</text>'
            )
    for node in place:
        x, y = at(node)
        if node in leaves:
            i = leaves[node]
            out.append(
                f'<rect x="{x - 50:.1f}" y="{y - 18:.1f}" width="100" height="36" rx="4" fill="#eef5ff" stroke="#4a78b5"/>'
            )
            out.append(
                f'<text x="{x:.1f}" y="{y - 3:.1f}" text-anchor="middle">token {i} {escape(repr(TOKENS[i])[1:])}</text>'
            )
            out.append(f'<text x="{x:.1f}" y="{y + 12:.1f}" text-anchor="middle">p = {mass[node]:.2f}</text>')
        else:
            prefix = '""' if node == trie.root else escape(repr(trie.prefix(node))[1:])
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{R}" fill="#fff7e0" stroke="#c08a00"/>')
            out.append(
                f'<text x="{x:.1f}" y="{y - 3:.1f}" text-anchor="middle" font-family="monospace">{prefix}</text>'
            )
            out.append(
                f'<text x="{x:.1f}" y="{y + 12:.1f}" text-anchor="middle" font-weight="bold">{mass[node]:.2f}</text>'
            )
        out.append(
            f'<text x="{x - R - 4:.1f}" y="{y - R + 6:.1f}" text-anchor="end" fill="#999" font-size="10">{node}</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "docs" / "img" / "trie.svg"
    trie = TokenCharacterTrie([Token(i, t) for i, t in enumerate(TOKENS)])
    mass = trie.weight_sum(np.array(PROBS))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(svg(trie, mass), encoding="utf-8")
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
