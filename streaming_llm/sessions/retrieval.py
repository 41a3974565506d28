"""Retrieval memory (beyond the original method): evicted text indexed in SQLite FTS5, recalled per turn.

Plain StreamingLLM forgets whatever leaves the window. With :class:`RetrievalMemory` a session cuts
the tokens it evicts into overlapping passages and indexes them in an embedded SQLite FTS5 table
(Python's standard ``sqlite3``). Before each user turn the passages that best match the new message
(BM25 ranking) are encoded once at the positions right after the sinks and swapped into the cache's
pinned segment, replacing the previous ones; every later token attends to them as it attends to the
sinks. The segment is bounded by ``budget`` tokens, so the cache keeps its fixed size.

Cost per user turn: one FTS5 query (sub-millisecond to a few milliseconds for tens of thousands of
passages) plus one forward over at most ``budget`` tokens (the segment), on top of plain streaming.
Cost per evicted passage: one SQLite insert.

Limits: matching is lexical (BM25 over Porter-stemmed words): a question that shares no word with
the evicted passage that answers it will not find it; only ``budget`` tokens of passages are shown
per turn; the index keeps the newest ``max_passages`` passages and prunes the oldest first.

The index lives with the session: :meth:`RetrievalMemory.state` serialises the SQLite database into
bytes that :mod:`streaming_llm.sessions.persistence` writes into the session file, and
:meth:`RetrievalMemory.load_state` restores it, so it is saved, restored and deleted with the session.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .memory import encode_segment

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .session import CacheView, StreamingSession

_STOPWORDS = (
    "a an and are as at be but by can could did do does for from had has have he her his how i if in into is it its "
    "me my no not of on or our she so that the their them then there these they this to was we were what when where "
    "which who whom why will with would you your answer only number please tell"
)
STOPWORDS = frozenset(_STOPWORDS.split(" "))
SCHEMA = "CREATE VIRTUAL TABLE IF NOT EXISTS passages USING fts5(text, tokens UNINDEXED, tokenize='porter unicode61')"


@dataclass
class RecallReport:
    """What the last :meth:`RetrievalMemory.recall` did.

    Attributes:
        query: The words searched for.
        passages: Passage texts pinned, oldest first.
        tokens: Tokens in the pinned segment (frame included).
        lookup_seconds: Time in the FTS5 query.
        encode_seconds: Time encoding the segment (one forward over ``tokens`` tokens).
    """

    query: str = ""
    passages: list[str] = field(default_factory=list)
    tokens: int = 0
    lookup_seconds: float = 0.0
    encode_seconds: float = 0.0


class RetrievalMemory:
    """Index evicted text in SQLite FTS5 and pin the best-matching passages before each user turn.

    Args:
        budget: Most tokens pinned after the sinks (the cache's segment capacity), frame included.
        passage_tokens: Tokens per indexed passage.
        overlap: Tokens a passage shares with the previous one (so a fact cut by a boundary is whole in one).
        max_passages: Passages kept in the index; the oldest are pruned first.
        frame: How the passages are shown to the model; ``{passages}`` is replaced by them.

    Raises:
        ValueError: On sizes that cannot work (e.g. a passage larger than the budget).
    """

    kind = "retrieval"

    def __init__(
        self,
        budget: int = 256,
        passage_tokens: int = 64,
        overlap: int = 16,
        max_passages: int = 16384,
        frame: str = "(Earlier text that may be relevant:\n{passages})\n",
    ):
        if passage_tokens < 1 or not 0 <= overlap < passage_tokens:
            raise ValueError(
                f"passage_tokens must be >= 1 and 0 <= overlap < passage_tokens; got {passage_tokens} and {overlap}."
            )
        if budget < passage_tokens + 16:
            raise ValueError(
                f"budget={budget} cannot hold one passage of {passage_tokens} tokens plus its frame; "
                f"use a budget of at least {passage_tokens + 16} or smaller passages."
            )
        if max_passages < 1:
            raise ValueError(f"max_passages must be >= 1, got {max_passages}.")
        if "{passages}" not in frame:
            raise ValueError("frame must contain '{passages}'.")
        self.budget, self.passage_tokens, self.overlap = budget, passage_tokens, overlap
        self.max_passages, self.frame = max_passages, frame
        self.buffer: list[int] = []  # evicted ids not yet in a passage (the overlap included)
        self.last = RecallReport()
        self.db = self._connect()

    # HybridMemory compatibility: the session sizes the pinned segment from ``max_tokens``.
    @property
    def max_tokens(self) -> int:
        return self.budget

    @staticmethod
    def _connect(data: bytes | None = None) -> sqlite3.Connection:
        db = sqlite3.connect(":memory:", check_same_thread=False)
        if data:
            db.deserialize(data)
        db.execute(SCHEMA)
        return db

    # -- indexing ---------------------------------------------------------------------------------
    def observe(self, session: StreamingSession) -> None:
        """Take the session's evicted-but-unindexed ids (``session.pending_ids``) and index full passages."""
        if not session.pending_ids:
            return
        self.buffer.extend(session.pending_ids)
        session.pending_ids = []
        step = self.passage_tokens - self.overlap
        added = False
        while len(self.buffer) >= self.passage_tokens:
            ids = self.buffer[: self.passage_tokens]
            self.add(session.tokenizer.decode(ids, skip_special_tokens=True), len(ids), prune=False)
            del self.buffer[:step]
            added = True
        if added:
            self._prune()

    def add(self, text: str, tokens: int, prune: bool = True) -> None:
        """Index one passage of ``tokens`` tokens (called by :meth:`observe`; usable directly)."""
        if text.strip():
            self.db.execute("INSERT INTO passages(text, tokens) VALUES (?, ?)", (text, tokens))
        if prune:
            self._prune()

    def _prune(self) -> None:
        newest = self.db.execute("SELECT max(rowid) FROM passages").fetchone()[0]
        if newest is not None and newest > self.max_passages:
            self.db.execute("DELETE FROM passages WHERE rowid <= ?", (newest - self.max_passages,))

    def __bool__(self) -> bool:  # a memory is set even while its index is empty
        return True

    def __len__(self) -> int:
        """Passages in the index."""
        return self.db.execute("SELECT count(*) FROM passages").fetchone()[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the SQLite index (pages in use times the page size)."""
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        return pages * self.db.execute("PRAGMA page_size").fetchone()[0]

    # -- recall -------------------------------------------------------------------------------------
    def search(self, message: str, limit: int = 32) -> list[tuple[int, str, int]]:
        """Best BM25 matches for ``message``: ``(rowid, text, tokens)``, best first."""
        words = [w for w in re.findall(r"\w+", message.lower()) if w not in STOPWORDS]
        words = list(dict.fromkeys(words))  # FTS5 is given quoted terms: no query syntax from the user
        if not words:
            return []
        query = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        return self.db.execute(
            "SELECT rowid, text, tokens FROM passages WHERE passages MATCH ? ORDER BY bm25(passages) LIMIT ?",
            (query, limit),
        ).fetchall()

    def select(self, session: StreamingSession, message: str) -> list[int]:
        """Token ids of the framed segment for ``message`` (empty when nothing matches), within the budget."""
        began = time.perf_counter()
        hits = self.search(message)
        self.last = RecallReport(query=message, lookup_seconds=time.perf_counter() - began)
        tokenize = session._tokens
        overhead = len(tokenize(self.frame.format(passages=""))) + 2
        chosen, used = [], overhead
        for rowid, text, tokens in hits:
            if used + tokens + 1 > self.budget:
                continue
            chosen.append((rowid, text))
            used += tokens + 1
        if not chosen:
            return []
        passages = [text.strip() for _, text in sorted(chosen)]  # oldest first, as they were read
        self.last.passages = passages
        return tokenize(self.frame.format(passages="\n...\n".join(passages)))[: self.budget]

    def recall(self, session: StreamingSession, message: str) -> None:
        """Pin the passages that best match ``message`` after the sinks of ``session``'s cache."""
        if session.cache.seen_tokens < session.cache.start_size or (not len(self) and not session.cache.segment_len):
            self.last = RecallReport(query=message)
            return  # nothing indexed yet (or no sinks to pin after): nothing to do
        ids = self.select(session, message)
        began = time.perf_counter()
        install_segment(session.model, session.cache, session.sink_ids, ids)
        self.last.tokens, self.last.encode_seconds = len(ids), time.perf_counter() - began

    # -- persistence ----------------------------------------------------------------------------------
    def settings(self) -> dict:
        return {
            "kind": self.kind, "budget": self.budget, "passage_tokens": self.passage_tokens, "overlap": self.overlap,
            "max_passages": self.max_passages, "frame": self.frame,
        }  # fmt: skip

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, meta)``: the SQLite database as a uint8 tensor and the pending ids; settings as JSON."""
        self.db.execute("INSERT INTO passages(passages) VALUES ('optimize')")
        self.db.commit()
        self.db.execute("VACUUM")
        data = self.db.serialize()
        tensors = {
            "index": torch.frombuffer(bytearray(data), dtype=torch.uint8),
            "buffer": torch.tensor(self.buffer, dtype=torch.int64),
        }
        return tensors, self.settings()

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> RetrievalMemory:
        """Rebuild a memory saved with :meth:`state`.

        Raises:
            ValueError: ``meta`` is not a retrieval memory's, or the index bytes are not a valid index.
        """
        if meta.get("kind") != cls.kind:
            raise ValueError(f"Not a retrieval memory state (kind {meta.get('kind')!r}).")
        memory = cls(**{k: v for k, v in meta.items() if k != "kind"})
        memory.load_state(tensors)
        return memory

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace this memory's index and pending ids with saved ones (settings are kept)."""
        try:
            db = self._connect(tensors["index"].cpu().numpy().tobytes())
            db.execute("SELECT count(*) FROM passages").fetchone()
        except (sqlite3.DatabaseError, KeyError) as error:
            raise ValueError(f"The saved retrieval index is unreadable: {error}") from None
        self.db.close()
        self.db = db
        self.buffer = tensors["buffer"].tolist() if "buffer" in tensors else []

    def close(self) -> None:
        self.db.close()


def install_segment(model: PreTrainedModel, cache: CacheView, sink_ids: list[int], ids: list[int]) -> None:
    """Encode ``ids`` right after the sinks ``sink_ids`` and make them the pinned segment of a session's cache
    row (empty ``ids`` clears it)."""
    if ids:
        cache.set_segment(*encode_segment(model, sink_ids, ids))
    else:
        cache.clear_segment()
