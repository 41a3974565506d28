"""Writes the README's support matrix from the cases tests/test_architectures.py proves.

python tests/support_matrix.py        # rewrite the table between the README markers
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
BEGIN, END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"


def render() -> str:
    sys.path.insert(0, str(HERE))
    from test_architectures import CASES

    rows = [
        "| family | transformers config | verified against the slow reference | notes |",
        "|---|---|---|---|",
    ]
    for case in CASES:
        how = "token by token, chunks of " + "/".join(str(c) for c in case.chunks if c > 1)
        how += ", `generate()`" if case.generate else ""
        rows.append(f"| {case.name} | `{case.config.__name__}` | {how} | {case.notes} |")
    return "\n".join(rows)


def section_in_readme() -> str:
    text = README.read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


def main() -> None:
    text = README.read_text()
    before, rest = text.split(BEGIN)
    _, after = rest.split(END)
    README.write_text(f"{before}{BEGIN}\n{render()}\n{END}{after}")


if __name__ == "__main__":
    main()
