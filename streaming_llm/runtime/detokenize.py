"""Turning a token stream into text as it comes: no broken UTF-8, no lost spaces, constant memory.

Tokenizers cannot decode tokens one by one (a character may span tokens; a leading space depends on
the previous token), so text is decoded over a short sliding span: the new text is the decoding of
``tokens[prefix:]`` minus the decoding of ``tokens[prefix:read]``, emitted only once it no longer ends
in an incomplete character. The span is dropped as soon as it is emitted.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the text they add."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix = 0  # tokens[prefix:read] is already emitted, kept as left context
        self.read = 0

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append a token; return the new text it completes ('' if still incomplete)."""
        self.tokens.append(token_id)
        before = self._decode(self.tokens[self.prefix : self.read])
        after = self._decode(self.tokens[self.prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        new_text = after[len(before) :]
        # Keep only the last emitted token(s) as context for the next one.
        self.tokens = self.tokens[self.read :]
        self.prefix, self.read = 0, len(self.tokens)
        return new_text

    def flush(self) -> str:
        """Text of tokens still held back (e.g. an incomplete character at the end)."""
        before = self._decode(self.tokens[self.prefix : self.read])
        after = self._decode(self.tokens[self.prefix :])
        self.tokens, self.prefix, self.read = [], 0, 0
        return after[len(before) :]


class StopMatcher:
    """Holds back text that might be the start of a stop string; reports when one appears."""

    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = tuple(stops)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return ``(text safe to emit, stopped)``. After a stop, the stop string and
        anything after it are dropped."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((_overlap(self.pending, s) for s in self.stops), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
