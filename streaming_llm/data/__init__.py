"""Text shipped with the package, so evaluation and tests work after ``pip install`` with nothing else.

``shakespeare.txt.gz``: the 42 plays and poems of William Shakespeare, plain text from Project
Gutenberg (public domain; the Gutenberg header and licence boilerplate are not included),
concatenated in file-name order. 5,057,282 characters, about 1.3M tokens with the SmolLM2
tokenizer; 1.9 MB compressed.
"""

from __future__ import annotations

import gzip
import os
from importlib import resources
from pathlib import Path

SHAKESPEARE = "shakespeare.txt.gz"


def shakespeare_path() -> Path:
    """Path of the packaged (gzip-compressed) Shakespeare text."""
    return Path(str(resources.files(__name__) / SHAKESPEARE))


def read_text(path: str | os.PathLike | None = None) -> str:
    """Read a text file as UTF-8 (undecodable bytes replaced); ``.gz`` files are decompressed.

    Args:
        path: A text file; None for the packaged Shakespeare.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
    """
    path = Path(path).expanduser() if path is not None else shakespeare_path()
    if not path.is_file():
        raise FileNotFoundError(f"No text file at {path}; pass --text with a UTF-8 text file (or a .gz of one).")
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    return path.read_text(encoding="utf-8", errors="replace")
