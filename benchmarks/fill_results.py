"""Put the generated tables into docs/RESULTS.md, between their markers (``<!-- NAME:begin -->`` / ``:end``).

    python benchmarks/fill_results.py            # every table whose source exists
    python benchmarks/fill_results.py --check    # exit 1 if docs/RESULTS.md is not up to date

Sources: the GPU run of issue 29 (``results/h200-issue29/recall/recall.md``, ``results/h200-issue29/seed/
seed_table.md``) and the CPU retrieval studies (``results/retrieval-hits-cpu``, ``results/dense-hits-cpu``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "RESULTS.md"


def _hits(path: Path, key: str, label: str) -> str | None:
    """A hit-rate table (rows: retriever per family; columns: distances) from a study's JSON."""
    if not path.exists():
        return None
    rows = json.loads(path.read_text())["table"]
    distances = sorted({r["distance"] for r in rows})
    lines = [f"| family | {label} | " + " | ".join(f"d={d:,}" for d in distances) + " |",
             "|---|---|" + "---|" * len(distances)]  # fmt: skip
    cells = {(r["family"], r[key], r["distance"]): r for r in rows}
    for family, name in dict.fromkeys((r["family"], r[key]) for r in rows):
        entries = []
        for d in distances:
            c = cells.get((family, name, d))
            entries.append("–" if c is None else f"{100 * c['hit']:.0f}% ({c['trials']}) "
                           f"[{100 * c['ci_low']:.0f}–{100 * c['ci_high']:.0f}]")  # fmt: skip
        lines.append(f"| {family} | {name} | " + " | ".join(entries) + " |")
    return "\n".join(lines) + "\n"


def _file(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


SOURCES = {
    "recall-table": lambda: _file(ROOT / "results/h200-issue29/recall/recall.md"),
    "seed-table": lambda: _file(ROOT / "results/h200-issue29/seed/seed_table.md"),
    "retrieval-hits": lambda: _hits(ROOT / "results/retrieval-hits-cpu/retrieval_hits.json", "method", "retriever"),
    "dense-hits": lambda: _hits(ROOT / "results/dense-hits-cpu/dense_hits.json", "retriever", "retriever"),
}


def fill(text: str) -> str:
    for name, source in SOURCES.items():
        content = source()
        if content is None:
            continue
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        text = pattern.sub(lambda m, c=content: m.group(1) + c.rstrip("\n") + "\n" + m.group(2), text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the document is not up to date")
    args = parser.parse_args()
    text = DOC.read_text()
    filled = fill(text)
    if args.check:
        return int(filled != text)
    DOC.write_text(filled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
