"""Put the benchmarks' figures into the docs, from the results files they wrote.

    python benches/render_docs.py          # rewrite the blocks in docs/*.md
    python benches/render_docs.py --check  # exit 1 where a page does not quote its results file

A docs page quotes ``benches/results/NAME.json`` (see ``benches/common.py``) in a block

    <!-- results: NAME -->
    ...
    <!-- /results: NAME -->

whose content this script writes (a line saying so where the file is missing):
how the figures were made (command, date,
machine, and the ``make bench`` run it belongs to: its ``BENCH_RUN``) and the
file's tables. Prose outside the
blocks is left as it is.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benches" / "results"
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results: (?P=name) -->)", re.S)


def load_results(folder: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """Every results file in ``folder``, by benchmark name."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def _table(table: dict[str, Any]) -> str:
    lines = [f"**{table['title']}**", ""]
    lines.append("| " + " | ".join(table["header"]) + " |")
    lines.append("|" + " --- |" * len(table["header"]))
    lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
    if table["notes"]:
        lines += ["", *table["notes"]]
    return "\n".join(lines)


def render(record: dict[str, Any]) -> str:
    """The Markdown of one results file: where it comes from, then its tables."""
    m = record["machine"]
    versions = ", ".join(f"{k.replace('_', '-')} {m[k]}" for k in ("torch", "transformers", "genlm_backend") if k in m)
    run = f"run {record['run']}" if record.get("run") else "run alone"
    if record.get("stopped"):
        run += f"; {record['stopped']}, so the tables hold only the rows measured before"
    head = (
        f"`{record['command']}` ({run}, {record['started']}, {record['wall_s']:.0f} s; "
        f"{m['cpus']} CPUs, {m['processor']}, Python {m['python']}, {versions})"
    )
    return "\n\n".join([head, *(_table(t) for t in record["tables"])]) + "\n"


def missing(name: str) -> str:
    """The block of a results file that no run has written yet."""
    return f"*Not measured yet: `benches/results/{name}.json` is missing (`make bench` writes it).*\n"


def update(text: str, results: dict[str, dict[str, Any]]) -> str:
    """``text`` with every results block rewritten from ``results``."""

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        body = render(results[name]) if name in results else missing(name)
        return f"{match.group(1)}\n{body}\n{match.group(4)}"

    return BLOCK.sub(fill, text)


def quoted(text: str) -> list[str]:
    """The results files that ``text``'s blocks quote."""
    return [m["name"] for m in BLOCK.finditer(text)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is out of date")
    args = parser.parse_args()
    results = load_results()
    stale = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        new = update(text, results)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    absent = sorted({name for page in DOCS.rglob("*.md") for name in quoted(page.read_text())} - set(results))
    if absent:
        print(f"note: no results file yet for {', '.join(absent)}", file=sys.stderr)
    runs = {r.get("run") for r in results.values()}
    if len(runs) > 1:
        print(f"note: the results files come from different runs: {sorted(map(str, runs))}", file=sys.stderr)
    if args.check and stale:
        raise SystemExit(f"out of date (run python benches/render_docs.py): {', '.join(map(str, stale))}")
    print(f"{'checked' if args.check else 'rendered'} {len(results)} results files into docs ({len(stale)} changed)")


if __name__ == "__main__":
    main()
