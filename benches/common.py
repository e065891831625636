"""Timing helpers shared by the benchmarks: best-of-n wall times and a table
that puts genlm-anyio beside the anchor with the ratio."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))


def best_of(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """The fastest of ``repeat`` timed calls, in seconds, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:8.2f} s "
    if seconds >= 1e-3:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds * 1e6:8.1f} us"


class Table:
    """Rows of (what, ours, anchor, target) printed with ``anchor / ours``."""

    def __init__(self, title: str, anchor: str):
        self.title, self.anchor = title, anchor
        self.rows: list[tuple[str, float, float | None, float | None]] = []

    def add(self, what: str, ours: float, anchor: float | None, target: float | None = None) -> None:
        self.rows.append((what, ours, anchor, target))
        print(f"  measured {what}", file=sys.stderr, flush=True)

    def print(self) -> None:
        print(f"\n{self.title}")
        print(f"{'':34} {'genlm-anyio':>11} {self.anchor:>14} {'speed-up':>9} {'target':>11}")
        for what, ours, anchor, target in self.rows:
            ratio = f"{anchor / ours:8.1f}x" if anchor else f"{'-':>9}"
            anchor_s = fmt(anchor) if anchor else f"{'-':>11}"
            target_s = ("< " + fmt(target).strip()) if target else "-"
            met = "" if target is None else ("  met" if ours < target else "  MISSED")
            print(f"{what:34} {fmt(ours):>11} {anchor_s:>14} {ratio} {target_s:>11}{met}")
