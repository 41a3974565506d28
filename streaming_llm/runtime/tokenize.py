"""Tokenizing a text that arrives in blocks exactly as if it were tokenized whole, in bounded memory.

Cutting a text into blocks and tokenizing each alone changes the tokens at every cut (``' war'``
becomes ``' '``, ``'war'``; ``'\\n\\n'`` becomes ``'\\n'``, ``'\\n'``; a character split into bytes loses
its merge). :func:`stream_tokens` instead keeps the unfinished tail and re-tokenizes an overlap:

1. the text not yet emitted is tokenized together with some already emitted text before it (its
   *left context*, ``context`` characters ending at a token boundary, whose tokens are dropped);
2. only tokens that do not change when the last ``margin`` characters are cut off are emitted
   (the tokenizer has seen enough text to their right), up to a boundary between two tokens;
3. the rest waits for the next block.

The left context lets tokenizers that treat the start of a text specially (a prefix space, a
SentencePiece ``▁``) and byte-level merges across the cut see what they would see in the whole
text. The left context's re-tokenization must reproduce the ids already emitted for its last tokens:
if it does not (a tokenizer whose tokens depend on text further back), a ``RuntimeWarning`` says the
ids may differ from tokenizing the whole text. Memory: one block plus ``context + margin`` characters
and their tokens. Needs a fast tokenizer (offsets); a slow one is tokenized whole at the end, with a
warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

MARGIN = 512  # characters at the end of the buffer whose tokens may still change
CONTEXT = 256  # characters of emitted text re-tokenized before the next ones
SYNC = 8  # last tokens of the left context that must come out as they were emitted
HOLD = 4  # tokens of the stable prefix held back all the same


@dataclass(frozen=True)
class TokenPiece:
    """Token ids and the text they cover: the pieces' ``text`` concatenates to the whole text, their ``ids`` to
    ``tokenizer(whole_text, add_special_tokens=False)["input_ids"]``."""

    ids: list[int]
    text: str


def stream_token_ids(tokenizer: PreTrainedTokenizerBase, blocks: Iterable[str]) -> Iterator[list[int]]:
    """The ids of :func:`stream_tokens`, piece by piece (see there)."""
    for piece in stream_tokens(tokenizer, blocks):
        yield piece.ids


def stream_tokens(
    tokenizer: PreTrainedTokenizerBase,
    blocks: Iterable[str],
    *,
    margin: int = MARGIN,
    context: int = CONTEXT,
    min_chars: int = 4096,
) -> Iterator[TokenPiece]:
    """Tokenize the concatenation of ``blocks`` incrementally, exactly as one ``tokenizer(text)`` call would.

    Args:
        tokenizer: A Hugging Face tokenizer (fast: it must return offsets; else the text is tokenized whole).
        blocks: The text in pieces of any size, cut anywhere (mid-word, mid-line; they are str, so never
            mid-character).
        margin: Characters at the buffer's end whose tokens are not emitted yet.
        context: Characters of emitted text re-tokenized in front of new text.
        min_chars: New characters gathered before a tokenization (amortises the overlap).

    Yields:
        :class:`TokenPiece` s, in order; ids without special tokens added (``add_special_tokens=False``).
    """
    if not getattr(tokenizer, "is_fast", False):
        warnings.warn(
            "A slow tokenizer gives no offsets, so the text is tokenized whole (memory grows with it).",
            RuntimeWarning,
            stacklevel=2,
        )
        text = "".join(blocks)
        if text:
            yield TokenPiece(_encode(tokenizer, text, offsets=False)[0], text)
        return
    left, left_ids, pending = "", [], ""  # emitted text kept as left context (and its ids); text not yet emitted
    warned = False
    for block in blocks:
        pending += block
        if len(pending) < min_chars + margin:
            continue
        ids, spans = _encode(tokenizer, left + pending)
        start, synced = _boundary(ids, spans, len(left), left_ids)
        if not synced and not warned:
            warned = _warn_unsynced()
        end = _stable_end(tokenizer, left + pending, ids, spans, start, margin)
        if end is None:  # nothing stable yet (e.g. one huge token): wait for more text
            continue
        cut = spans[end - 1][1]
        yield TokenPiece(ids[start:end], (left + pending)[len(left) : cut])
        first = _context_start(spans, end, context)
        text = left + pending
        left, left_ids, pending = text[spans[first][0] : cut], ids[first:end], text[cut:]
    if pending:
        ids, spans = _encode(tokenizer, left + pending)
        start, synced = _boundary(ids, spans, len(left), left_ids)
        if not synced and not warned:
            _warn_unsynced()
        yield TokenPiece(ids[start:], pending)


def _encode(tokenizer, text: str, offsets: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    return list(encoded["input_ids"]), [tuple(s) for s in encoded["offset_mapping"]] if offsets else []


def _contiguous(spans: list[tuple[int, int]], i: int) -> bool:
    """Whether a cut between token ``i - 1`` and token ``i`` is a clean cut of the text (no shared character)."""
    return 0 < i < len(spans) and spans[i - 1][1] == spans[i][0]


def _boundary(ids: list[int], spans, chars: int, left_ids: list[int]) -> tuple[int, bool]:
    """Index of the first token after the left context (``chars`` long) and whether the context re-tokenized
    as it was emitted (its last :data:`SYNC` ids, ending exactly at ``chars``)."""
    if chars == 0:
        return 0, True
    for i in range(len(ids) + 1):
        if i == len(ids) or spans[i][0] >= chars:
            break
    clean = i == len(ids) or (i > 0 and spans[i - 1][1] == chars)
    tail = min(SYNC, len(left_ids))
    return i, clean and i >= tail and ids[i - tail : i] == left_ids[-tail:]


def _stable_end(tokenizer, text: str, ids: list[int], spans, start: int, margin: int) -> int | None:
    """The end (exclusive) of the tokens from ``start`` that stay the same when the last ``margin`` characters
    are cut off, minus :data:`HOLD`, moved back to a clean cut; None when there is none."""
    cut = len(text) - margin
    short_ids, short_spans = _encode(tokenizer, text[:cut])
    same = 0
    for a, b, sa, sb in zip(ids, short_ids, spans, short_spans, strict=False):
        if a != b or sa != sb:
            break
        same += 1
    end = same - HOLD
    while end > start and not (_contiguous(spans, end) and spans[end - 1][1] <= cut):
        end -= 1
    return end if end > start else None


def _context_start(spans, end: int, context: int) -> int:
    """The token at which the next left context starts: at a clean cut, at least ``context`` characters back."""
    first = end - 1
    while first > 0 and (spans[end - 1][1] - spans[first][0] < context or not _contiguous(spans, first)):
        first -= 1
    return first


def _warn_unsynced() -> bool:
    warnings.warn(
        "This tokenizer's tokens depend on text far before a block boundary; the ids may differ slightly "
        "from tokenizing the whole text at once.",
        RuntimeWarning,
        stacklevel=3,
    )
    return True
