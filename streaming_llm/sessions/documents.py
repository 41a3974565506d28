"""Long documents for :meth:`StreamingSession.ingest`: read lazily, reported as they are fed.

A :class:`Document` is a text file (read in byte blocks through an incremental UTF-8 decoder, so a
block may end inside a character) or a string. :class:`IngestProgress` says where an ingest stands
after every fed chunk; :class:`ProgressBar` shows it (tqdm) in the document's bytes or characters,
with the characters and tokens fed, the rate, the time left, and once, after half a second of
feeding, an estimate of the whole run on this device.
"""

from __future__ import annotations

import codecs
import io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

BLOCK_BYTES = 1 << 16  # bytes read from a file at a time
BLOCK_CHARS = 1 << 16  # characters of a string handed on at a time
ESTIMATE_AFTER = 0.5  # seconds of feeding measured before the estimate of the whole run (none if it ends sooner)


@dataclass(frozen=True)
class IngestProgress:
    """Where an ingest stands (passed to a ``progress`` callable after every fed chunk).

    Attributes:
        done: How much of the document is fed, in ``unit`` (bytes of a file, characters of a string).
        total: The document's size in ``unit``.
        unit: ``"B"`` (a file) or ``"char"`` (a string).
        characters: Characters of the document fed so far.
        tokens: Tokens fed so far (the document with its message markup).
        seconds: Since the ingest began.
    """

    done: int
    total: int
    unit: str
    characters: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class Document:
    """A text file (``os.PathLike``, or a string naming an existing file) or the text itself.

    Raises:
        FileNotFoundError: a path that is not a file.
    """

    def __init__(self, source: str | os.PathLike):
        if isinstance(source, os.PathLike) and not Path(source).is_file():
            raise FileNotFoundError(f"No such file: {source}")
        self.path = Path(source) if isinstance(source, os.PathLike) or _names_a_file(source) else None
        self.text = None if self.path else str(source)
        self.unit = "B" if self.path else "char"
        self.total = self.path.stat().st_size if self.path else len(self.text)

    def size(self, text: str) -> int:
        """``text``'s size in :attr:`unit`."""
        return len(text.encode("utf-8")) if self.path else len(text)

    def blocks(self) -> Iterator[str]:
        """The text in blocks (cut anywhere), read lazily; a file decodes as ``open(path, encoding="utf-8",
        errors="replace")`` would (universal newlines)."""
        if self.text is not None:
            for i in range(0, len(self.text), BLOCK_CHARS):
                yield self.text[i : i + BLOCK_CHARS]
            return
        decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")("replace"), translate=True)
        with open(self.path, "rb") as f:
            while raw := f.read(BLOCK_BYTES):
                if text := decoder.decode(raw):
                    yield text
        if text := decoder.decode(b"", final=True):
            yield text


class ProgressBar:
    """A ``progress`` callable: a tqdm bar over the document, and one estimate line after half a second."""

    def __init__(self, document: Document, device: str = "cpu"):
        self.device = device
        self.estimated = False
        self.bar = tqdm(total=document.total, unit=document.unit, unit_scale=True, desc="ingest", mininterval=0.5)

    def __call__(self, p: IngestProgress) -> None:
        self.bar.set_postfix_str(f"{p.characters:,} chars, {p.tokens:,} tokens, {p.tokens_per_second:,.0f} tok/s",
                                 refresh=False)  # fmt: skip
        self.bar.update(p.done - self.bar.n)
        if not self.estimated and 0 < p.done < p.total and p.seconds >= ESTIMATE_AFTER:
            self.estimated = True
            tokens = p.tokens * p.total / p.done
            self.bar.write(
                f"ingest: about {tokens:,.0f} tokens; about {_duration(tokens / p.tokens_per_second)} at "
                f"{p.tokens_per_second:,.0f} tok/s on {self.device} (from the first {p.tokens:,} tokens)",
                file=sys.stderr,
            )

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _names_a_file(text: str) -> bool:
    if "\n" in text or len(text) > 1024:
        return False
    try:
        return Path(text).is_file()
    except OSError:  # e.g. a sentence too long to be a file name
        return False
