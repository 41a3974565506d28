"""Retrieval memory (beyond the original method): evicted text indexed per session, recalled per turn.

Plain StreamingLLM forgets whatever leaves the window. With :class:`RetrievalMemory` a session cuts
the tokens it evicts into passages and indexes them in an embedded SQLite database (Python's
standard ``sqlite3``): an FTS5 table for BM25 ranking, and the passages' token ids (and, with a dense
scorer, one pooled hidden-state vector each). Before each user turn the passages that best match the
new message are encoded once at the positions right after the sinks and swapped into the cache's
pinned segment, replacing the previous ones; every later token attends to them as it attends to the
sinks. The segment always holds exactly ``budget`` tokens once anything is indexed (best passages,
then newline padding), so the cache keeps its fixed size and every turn costs the same.

How passages are cut (``split``):

* ``"tokens"``: ``passage_tokens`` tokens each, consecutive ones sharing ``overlap`` tokens (a fact cut
  by a boundary is whole in one of them); chosen neighbours are merged into one span, so the overlap
  is never shown twice.
* ``"sentences"``: cut after the last sentence end (``. ! ?`` or a line break) within the first
  ``passage_tokens`` tokens, so a sentence is never split unless it is longer than a passage.

How passages are ranked (``scorer``):

* ``"bm25"``: SQLite FTS5 BM25 over Porter-stemmed words of the message (stop words dropped). Its
  inverse document frequency is computed over this session's own index, so words common in what
  this session has read weigh little.
* ``"dense"``: cosine similarity between pooled hidden states. The tokens were already processed
  by the model when they were fed, so a forward hook on one decoder layer (``dense_layer``) keeps
  their states and each passage gets the mean of its tokens' states (centred by the index mean at
  query time); the message is encoded once (a forward over the sinks plus the message) to get its
  vector. No extra model.
* ``"fused"``: reciprocal-rank fusion of the two rankings.

When nothing matches, the most recently evicted passages are shown instead.

Cost per user turn: one FTS5 query (sub-millisecond to a few milliseconds for tens of thousands of
passages), for ``dense``/``fused`` one forward over the message and a matrix-vector product over the
index, plus one forward over exactly ``budget`` tokens (the segment). Cost per evicted passage: one
SQLite insert (and, dense, a mean over its tokens' states).

The index lives with the session: :meth:`RetrievalMemory.state` serialises everything (database,
open buffers, counters) into tensors plus JSON settings that :mod:`streaming_llm.sessions.persistence`
writes into the session file, and :meth:`RetrievalMemory.load_state` restores it; nothing else is
needed to continue a session's memory exactly.

Two ways to feed a memory: :meth:`RetrievalMemory.track` (the caller reports every fed token and the
cache's eviction count; the memory keeps its own window of fed ids) or :meth:`RetrievalMemory.observe`
(the session hands over the ids it has seen evicted, :meth:`RetrievalMemory.observe`).
"""

from __future__ import annotations

import functools
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from transformers import DynamicCache

from ..core.compat import cache_kwargs

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..core.cache import StreamingCache
    from ..runtime.engine import CacheView


class SessionLike(Protocol):
    """What the memory reads of a session (:class:`~streaming_llm.sessions.session.StreamingSession`)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cache: CacheView
    sink_ids: list[int]

    def tokenize(self, text: str) -> list[int]: ...


_STOPWORDS = (
    "a an and are as at be but by can could did do does for from had has have he her his how i if in into is it its "
    "me my no not of on or our she so that the their them then there these they this to was we were what when where "
    "which who whom why will with would you your answer only number please tell"
)
STOPWORDS = frozenset(_STOPWORDS.split(" "))
SCHEMA = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS passages USING fts5(text, tokens UNINDEXED, tokenize='porter unicode61')",
    "CREATE TABLE IF NOT EXISTS spans (rowid INTEGER PRIMARY KEY, ids BLOB NOT NULL, vector BLOB)",
)
SPLITS = ("tokens", "sentences")
SCORERS = ("bm25", "dense", "fused")
SEPARATOR = "\n...\n"
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009)


@dataclass
class RecallReport:
    """What the last :meth:`RetrievalMemory.recall` (or :meth:`RetrievalMemory.segment`) did.

    Attributes:
        query: The message searched for.
        passages: Passage texts pinned, oldest first (merged neighbours are one text).
        matched: Whether the passages came from the ranking (False: nothing matched, the most recent
            passages were shown).
        tokens: Tokens in the pinned segment (frame and padding included).
        lookup_seconds: Time ranking the index (FTS5 query, dense scoring, encoding the message).
        encode_seconds: Time encoding the segment (one forward over ``tokens`` tokens).
    """

    query: str = ""
    passages: list[str] = field(default_factory=list)
    matched: bool = False
    tokens: int = 0
    lookup_seconds: float = 0.0
    encode_seconds: float = 0.0


class LayerTap:
    """A forward hook on one decoder layer that keeps its output hidden states.

    Only forwards on ``cache`` are kept (all when ``cache`` is None). A hook on a module is a public
    PyTorch extension point; :meth:`close` removes it.

    Args:
        model: A transformers causal LM (its decoder's ``layers``).
        layer: Index of the decoder layer whose output is kept.
        cache: Keep only forwards whose cache is this object.
    """

    def __init__(self, model: PreTrainedModel, layer: int, cache: object | None = None):
        layers = model.get_decoder().layers
        if not 0 <= layer < len(layers):
            raise ValueError(f"dense_layer must be in 0..{len(layers) - 1}, got {layer}.")
        self.cache = cache
        self.captured: list[torch.Tensor] = []  # (batch, tokens, hidden) per forward, float32 on the CPU
        self._handle = layers[layer].register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if self.cache is not None and cache is not self.cache:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        self.captured.append(hidden.detach().float().cpu())

    def take(self) -> torch.Tensor | None:
        """Everything captured since the last call, ``(batch, tokens, hidden)``; None if nothing."""
        if not self.captured:
            return None
        states = torch.cat(self.captured, dim=1)
        self.captured = []
        return states

    def close(self) -> None:
        self._handle.remove()
        self.captured = []


class RetrievalMemory:
    """Index evicted text and pin the best-matching passages before each user turn.

    Args:
        budget: Tokens pinned after the sinks (the cache's segment capacity), frame and padding included.
        passage_tokens: Tokens per indexed passage (the most, with ``split="sentences"``).
        overlap: Tokens a passage shares with the previous one (``split="tokens"`` only).
        max_passages: Passages kept in the index; the oldest are pruned first.
        frame: How the passages are shown to the model; ``{passages}`` is replaced by them.
        split: ``"tokens"`` or ``"sentences"`` (see the module docstring).
        scorer: ``"bm25"``, ``"dense"`` or ``"fused"``.
        dense_layer: Decoder layer whose hidden states are pooled (``dense``/``fused``); None: the middle one.
        candidates: Best passages considered per turn (before packing them into the budget).

    Raises:
        ValueError: On settings that cannot work (e.g. a passage larger than the budget).
    """

    kind = "retrieval"

    def __init__(
        self,
        budget: int = 256,
        passage_tokens: int = 64,
        overlap: int = 16,
        max_passages: int = 16384,
        frame: str = "(Earlier text that may be relevant:\n{passages})\n",
        split: str = "tokens",
        scorer: str = "bm25",
        dense_layer: int | None = None,
        candidates: int = 32,
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
        if max_passages < 1 or candidates < 1:
            raise ValueError(f"max_passages and candidates must be >= 1, got {max_passages} and {candidates}.")
        if frame.count("{passages}") != 1:
            raise ValueError("frame must contain '{passages}' once.")
        if split not in SPLITS or scorer not in SCORERS:
            raise ValueError(f"split must be one of {SPLITS} and scorer one of {SCORERS}; got {split!r}, {scorer!r}.")
        self.budget, self.passage_tokens, self.max_passages, self.frame = budget, passage_tokens, max_passages, frame
        self.overlap = overlap if split == "tokens" else 0
        self.split, self.scorer, self.dense_layer, self.candidates = split, scorer, dense_layer, candidates
        self.buffer: list[int] = []  # evicted ids not yet in a passage (the overlap included)
        self.buffer_states: torch.Tensor | None = None  # their hidden states (dense), (len(buffer), hidden)
        self.window: list[int] = []  # track(): fed ids not evicted yet (sinks excluded)
        self.window_states: torch.Tensor | None = None  # their hidden states (dense)
        self.seen = 0  # track(): tokens reported fed (sinks included)
        self.evicted = 0  # track(): tokens reported evicted
        self.received = 0  # evicted tokens handed to the index (either way of feeding)
        self.last = RecallReport()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.tap: LayerTap | None = None
        self._ends: frozenset[int] | None = None  # ids of tokens that end a sentence
        self._vector_rows: list[int] = []  # the dense index in memory: rowids and their vectors (float16)
        self._vectors: list[torch.Tensor] = []
        self._stacked: torch.Tensor | None = None
        self._pending: tuple[int, torch.Tensor] | None = None  # while searching: the buffer's passage and vector
        self.db = self._connect()

    # HybridMemory compatibility: the session sizes the pinned segment from ``max_tokens``.
    @property
    def max_tokens(self) -> int:
        return self.budget

    @property
    def dense(self) -> bool:
        """Whether this memory ranks with hidden states (and so needs them for every evicted token)."""
        return self.scorer != "bm25"

    @staticmethod
    def _connect(data: bytes | None = None) -> sqlite3.Connection:
        db = sqlite3.connect(":memory:", check_same_thread=False)
        if data:
            db.deserialize(data)
        for statement in SCHEMA:
            db.execute(statement)
        return db

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

    # -- attaching to a model -----------------------------------------------------------------------
    def attach(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cache: object | None = None) -> None:
        """Use ``tokenizer`` to decode passages; for a dense scorer, hook ``dense_layer`` of ``model``.

        Args:
            cache: The hook keeps only forwards on this cache (None: every forward; pass the states
                to :meth:`track` yourself when the model runs other streams too).
        """
        self.tokenizer = tokenizer
        if self.dense and self.tap is None:
            if self.dense_layer is None:
                self.dense_layer = model.config.num_hidden_layers // 2
            self.tap = LayerTap(model, self.dense_layer, cache)

    def close(self) -> None:
        """Remove the hook (if any) and close the database."""
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        self.db.close()

    # -- indexing -------------------------------------------------------------------------------------
    def track(self, ids: Sequence[int], cache: StreamingCache | CacheView, states: torch.Tensor | None = None) -> None:
        """Report that ``ids`` were just fed to ``cache``; index whatever the cache has evicted since.

        The memory keeps the fed ids (and, dense, their states) until the cache evicts them, so it needs
        every fed token, in order, sinks included. Call after each forward (or chunk of forwards).

        Args:
            states: Hidden states of ``ids`` at ``dense_layer``, ``(len(ids), hidden)``; None takes
                them from the hook (dense scorers), or none are needed (bm25).

        Raises:
            ValueError: ``states`` (or what the hook caught) does not have one row per id.
        """
        ids = list(ids)
        skip = max(0, min(len(ids), cache.start_size - self.seen))  # sinks are never evicted
        self.seen += len(ids)
        if self.dense:
            states = self._states_for(ids, states)[skip:]
            self.window_states = _append(self.window_states, states)
        self.window.extend(ids[skip:])
        gone = cache.evicted_tokens - self.evicted
        if gone <= 0:
            return
        self.evicted += gone
        evicted, self.window = self.window[:gone], self.window[gone:]
        evicted_states = None
        if self.dense:
            evicted_states, self.window_states = self.window_states[:gone], self.window_states[gone:]
        self._index_evicted(evicted, evicted_states)

    def observe(self, session: SessionLike, evicted: list[int]) -> None:
        """Index ``evicted``, the ids the session's window just evicted (its own list, handed over: the session
        clears it), as full passages.

        With a dense scorer the hook's states of every token fed to ``session.cache`` are kept in order
        (tokens fed before the memory first saw the session get zero vectors).
        """
        if self.tokenizer is None or (self.dense and self.tap is None):
            self.attach(session.model, session.tokenizer, session.cache.forward_cache)
        if self.dense:
            self._observe_states(session, len(evicted))
        if not evicted:
            return
        evicted = list(evicted)
        evicted_states = None
        if self.dense:
            evicted_states, self.window_states = self.window_states[: len(evicted)], self.window_states[len(evicted) :]
        self._index_evicted(evicted, evicted_states)

    def _observe_states(self, session: SessionLike, pending: int) -> None:
        self.tap.cache = session.cache.forward_cache  # a restored or replaced cache: follow it
        captured = self.tap.take()
        fed = max(0, session.cache.seen_tokens - session.cache.start_size)  # non-sink tokens fed so far
        if captured is not None:
            self.window_states = _append(self.window_states, captured[0])
        held = 0 if self.window_states is None else self.window_states.shape[0]
        expected = fed - (session.cache.evicted_tokens - pending)  # tokens still in the window
        if held < expected:  # fed before the hook existed: no states
            hidden = session.model.config.hidden_size
            self.window_states = _append(torch.zeros(expected - held, hidden), self.window_states)
        elif held > expected:  # the sinks' states
            self.window_states = self.window_states[held - expected :]

    def _states_for(self, ids: list[int], states: torch.Tensor | None) -> torch.Tensor:
        if states is None:
            captured = self.tap.take() if self.tap is not None else None
            states = captured[0] if captured is not None else None
        if states is None or states.shape[0] != len(ids):
            got = None if states is None else states.shape[0]
            raise ValueError(f"A dense retrieval memory needs one hidden state per fed token: {len(ids)} ids, {got}.")
        return states.detach().float().cpu()

    def _index_evicted(self, ids: list[int], states: torch.Tensor | None) -> None:
        if self.tokenizer is None:
            raise ValueError("attach() the memory to a tokenizer before feeding it.")
        self.buffer.extend(ids)
        self.received += len(ids)
        if states is not None:
            self.buffer_states = _append(self.buffer_states, states)
        added = False
        while len(self.buffer) >= self.passage_tokens:
            length = self._passage_length()
            vector = None
            if self.buffer_states is not None:
                vector = self.buffer_states[:length].mean(dim=0)
            self.add(self.tokenizer.decode(self.buffer[:length], skip_special_tokens=True), self.buffer[:length],
                     vector, prune=False)  # fmt: skip
            step = length - self.overlap
            del self.buffer[:step]
            if self.buffer_states is not None:
                self.buffer_states = self.buffer_states[step:]
            added = True
        if added:
            self._prune()

    def _passage_length(self) -> int:
        if self.split == "tokens":
            return self.passage_tokens
        ends = self._sentence_ends()
        for i in range(self.passage_tokens - 1, self.passage_tokens // 4 - 1, -1):
            if self.buffer[i] in ends:
                return i + 1
        return self.passage_tokens

    def _sentence_ends(self) -> frozenset[int]:
        if self._ends is None:
            self._ends = sentence_ends(self.tokenizer)
        return self._ends

    def add(self, text: str, ids: Sequence[int] | int, vector: torch.Tensor | None = None, prune: bool = True) -> None:
        """Index one passage (called when tokens are evicted; usable directly).

        Args:
            text: The passage text (what BM25 matches).
            ids: Its token ids (what is shown to the model); an int (a token count) stores no ids, and
                the text is tokenized again when the passage is shown.
            vector: Its pooled hidden state (dense scorers).
        """
        if not text.strip():
            return
        stored = _pack(ids) if not isinstance(ids, int) else b""
        tokens = ids if isinstance(ids, int) else len(ids)
        row = self.db.execute("INSERT INTO passages(text, tokens) VALUES (?, ?)", (text, tokens)).lastrowid
        blob = None
        if vector is not None:
            vector = vector.detach().to(torch.float16).cpu()
            blob = vector.numpy().tobytes()
            self._vector_rows.append(row)
            self._vectors.append(vector)
            self._stacked = None
        self.db.execute("INSERT INTO spans(rowid, ids, vector) VALUES (?, ?, ?)", (row, stored, blob))
        if prune:
            self._prune()

    def _prune(self) -> None:
        newest = self.db.execute("SELECT max(rowid) FROM passages").fetchone()[0]
        if newest is not None and newest > self.max_passages:
            oldest = newest - self.max_passages
            for table in ("passages", "spans"):
                self.db.execute(f"DELETE FROM {table} WHERE rowid <= ?", (oldest,))
            dropped = sum(1 for row in self._vector_rows if row <= oldest)
            if dropped:
                del self._vector_rows[:dropped], self._vectors[:dropped]
                self._stacked = None

    def _load_vectors(self) -> None:
        rows = self.db.execute("SELECT rowid, vector FROM spans WHERE vector IS NOT NULL ORDER BY rowid").fetchall()
        self._vector_rows = [row for row, _ in rows]
        self._vectors = [torch.frombuffer(bytearray(blob), dtype=torch.float16) for _, blob in rows]
        self._stacked = None

    # -- ranking ----------------------------------------------------------------------------------------
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

    def dense_search(self, query: torch.Tensor, limit: int = 32) -> list[int]:
        """Rowids of the passages whose pooled states are nearest ``query`` (cosine, index-centred), best first."""
        rowids = list(self._vector_rows)
        if self._stacked is None and self._vectors:
            self._stacked = torch.stack(self._vectors).float()
        matrix = self._stacked if self._vectors else torch.zeros(0, query.shape[-1])
        if self._pending is not None:  # the evicted tokens not yet in a passage
            rowids.append(self._pending[0])
            matrix = torch.cat([matrix, self._pending[1][None].float()])
        if not rowids:
            return []
        centre = matrix.mean(dim=0)
        keys = torch.nn.functional.normalize(matrix - centre, dim=-1)
        scores = keys @ torch.nn.functional.normalize(query.float().cpu() - centre, dim=-1)
        best = scores.topk(min(limit, len(rowids))).indices.tolist()
        return [rowids[i] for i in best]

    def rank(self, message: str, query: torch.Tensor | None = None) -> list[int]:
        """Rowids of the best passages for ``message``, best first (``query``: its vector, dense scorers)."""
        lexical = [row for row, _, _ in self.search(message, self.candidates)] if self.scorer != "dense" else []
        if self.scorer == "bm25":
            return lexical
        if query is None:
            raise ValueError(f"The {self.scorer!r} scorer needs the message's vector (see query_vectors).")
        nearest = self.dense_search(query, self.candidates)
        if self.scorer == "dense":
            return nearest
        fused: dict[int, float] = {}
        for ranking in (lexical, nearest):
            for place, row in enumerate(ranking):
                fused[row] = fused.get(row, 0.0) + 1.0 / (RRF_K + place + 1)
        return sorted(fused, key=lambda row: -fused[row])[: self.candidates]

    # -- the segment ------------------------------------------------------------------------------------
    def segment(self, message: str, tokenize: Callable[[str], list[int]], query: torch.Tensor | None = None,
                newline: int | None = None) -> list[int]:  # fmt: skip
        """Token ids of the segment for ``message``: exactly ``budget`` tokens, or none if nothing is indexed.

        The best passages that fit, in the order they were read (chosen neighbours merged), inside the
        frame; the rest of the budget is newline padding before the frame. Fills :attr:`last`.

        Args:
            tokenize: Text to token ids (no special tokens), as the session tokenizes.
            query: The message's vector (dense scorers; see :func:`query_vectors`).
            newline: Padding token id (default: ``tokenize("\\n")``).
        """
        if not self.received:
            self.last = RecallReport(query=message)
            return []
        began = time.perf_counter()
        pending = self._insert_pending()  # the evicted tokens not yet in a passage are searchable too
        try:
            ranked = self.rank(message, query)
            matched = bool(ranked)
            if not ranked:  # nothing matches: show what was evicted last
                ranked = [r for (r,) in self.db.execute("SELECT rowid FROM spans ORDER BY rowid DESC LIMIT 64")]
            self.last = RecallReport(query=message, matched=matched, lookup_seconds=time.perf_counter() - began)
            head, tail = (tokenize(part) for part in self.frame.split("{passages}"))
            spans = self._pack(ranked, len(head) + len(tail), tokenize)
            special = set(self.tokenizer.all_special_ids) if self.tokenizer is not None else set()
            spans = [[i for i in span if i not in special] for span in spans]  # no chat markup inside the memory
        finally:
            if pending is not None:
                for table in ("passages", "spans"):
                    self.db.execute(f"DELETE FROM {table} WHERE rowid = ?", (pending,))
                self._pending = None
        body = [i for k, span in enumerate(spans) for i in (tokenize(SEPARATOR) if k else []) + span]
        ids = (head + body + tail)[: self.budget]
        pad = newline if newline is not None else tokenize("\n")[0]
        self.last.passages = [self.tokenizer.decode(span).strip() if self.tokenizer else "" for span in spans]
        self.last.tokens = self.budget
        return [pad] * (self.budget - len(ids)) + ids

    def _insert_pending(self) -> int | None:
        """Index the buffer's tokens that no passage holds yet as a temporary passage; its rowid (or None)."""
        carried = self.overlap if self.received > len(self.buffer) else 0  # the last passage's tail opens the buffer
        if len(self.buffer) <= carried:
            return None
        text = self.tokenizer.decode(self.buffer, skip_special_tokens=True) if self.tokenizer else ""
        if not text.strip():
            return None
        row = (self.db.execute("SELECT max(rowid) FROM passages").fetchone()[0] or 0) + 1
        self.db.execute("INSERT INTO passages(rowid, text, tokens) VALUES (?, ?, ?)", (row, text, len(self.buffer)))
        self.db.execute("INSERT INTO spans(rowid, ids) VALUES (?, ?)", (row, _pack(self.buffer)))
        if self.buffer_states is not None and self.dense:
            self._pending = (row, self.buffer_states.mean(dim=0))
        return row

    def _pack(self, ranked: list[int], frame: int, tokenize: Callable[[str], list[int]]) -> list[list[int]]:
        """Chosen passages (best first while they fit), as merged spans of ids in reading order."""
        separator = len(tokenize(SEPARATOR))
        ids = {row: self._ids(row, text, tokenize) for row, text in self._texts(ranked)}
        chosen: list[int] = []
        for row in ranked:
            if row in ids and self._cost(sorted([*chosen, row]), ids, separator) + frame <= self.budget:
                chosen.append(row)
        return self._spans(sorted(chosen), ids)

    def _texts(self, rows: list[int]) -> list[tuple[int, str]]:
        marks = ",".join("?" * len(rows))
        return self.db.execute(f"SELECT rowid, text FROM passages WHERE rowid IN ({marks})", rows).fetchall()

    def _ids(self, row: int, text: str, tokenize: Callable[[str], list[int]]) -> list[int]:
        blob = self.db.execute("SELECT ids FROM spans WHERE rowid = ?", (row,)).fetchone()
        return _unpack(blob[0]) if blob and blob[0] else tokenize(text.strip())

    def _spans(self, rows: list[int], ids: dict[int, list[int]]) -> list[list[int]]:
        spans: list[list[int]] = []
        for k, row in enumerate(rows):
            if k and row == rows[k - 1] + 1 and self.overlap < len(ids[row]):  # a neighbour: drop the shared part
                spans[-1].extend(ids[row][self.overlap :])
            else:
                spans.append(list(ids[row]))
        return spans

    def _cost(self, rows: list[int], ids: dict[int, list[int]], separator: int) -> int:
        spans = self._spans(rows, ids)
        return sum(len(s) for s in spans) + separator * (len(spans) - 1)

    def recall(self, session: SessionLike, message: str) -> None:
        """Pin the passages that best match ``message`` after the sinks of ``session``'s cache."""
        if self.tokenizer is None:
            self.tokenizer = session.tokenizer
        cache = session.cache
        if cache.seen_tokens < cache.start_size or (not self.received and not cache.segment_len):
            self.last = RecallReport(query=message)
            return  # nothing evicted yet (or no sinks to pin after): nothing to do
        began = time.perf_counter()
        query = None
        if self.dense and self.received:
            query = query_vectors(session.model, session.sink_ids, [session.tokenize(message)], self.dense_layer)[0]
        lookup = time.perf_counter() - began
        ids = self.segment(message, session.tokenize, query)
        self.last.lookup_seconds += lookup
        began = time.perf_counter()
        install_segment(session.model, session.cache, session.sink_ids, ids)
        self.last.encode_seconds = time.perf_counter() - began

    # -- persistence ----------------------------------------------------------------------------------
    def settings(self) -> dict:
        return {
            "kind": self.kind, "budget": self.budget, "passage_tokens": self.passage_tokens, "overlap": self.overlap,
            "max_passages": self.max_passages, "frame": self.frame, "split": self.split, "scorer": self.scorer,
            "dense_layer": self.dense_layer, "candidates": self.candidates,
        }  # fmt: skip

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, meta)``: the SQLite database as a uint8 tensor, the open buffers (ids and states) and
        counters as tensors; the settings as JSON. Everything :meth:`from_state` needs."""
        self.db.execute("INSERT INTO passages(passages) VALUES ('optimize')")
        self.db.commit()
        self.db.execute("VACUUM")
        data = self.db.serialize()
        tensors = {
            "index": torch.frombuffer(bytearray(data), dtype=torch.uint8),
            "buffer": torch.tensor(self.buffer, dtype=torch.int64),
            "window": torch.tensor(self.window, dtype=torch.int64),
            "counters": torch.tensor([self.seen, self.evicted, self.received], dtype=torch.int64),
        }
        for name in ("buffer_states", "window_states"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).clone()
        return tensors, self.settings()

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> RetrievalMemory:
        """Rebuild a memory saved with :meth:`state` (attach it to the model again for a dense scorer).

        Raises:
            ValueError: ``meta`` is not a retrieval memory's, or the index bytes are not a valid index.
        """
        if meta.get("kind") != cls.kind:
            raise ValueError(f"Not a retrieval memory state (kind {meta.get('kind')!r}).")
        memory = cls(**{k: v for k, v in meta.items() if k != "kind"})
        memory.load_state(tensors)
        return memory

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace this memory's index, open buffers and counters with saved ones (settings are kept)."""
        try:
            db = self._connect(tensors["index"].cpu().numpy().tobytes())
            db.execute("SELECT count(*) FROM passages").fetchone()
        except (sqlite3.DatabaseError, KeyError) as error:
            raise ValueError(f"The saved retrieval index is unreadable: {error}") from None
        self.db.close()
        self.db = db
        self._load_vectors()
        self.buffer = tensors["buffer"].tolist() if "buffer" in tensors else []
        self.window = tensors["window"].tolist() if "window" in tensors else []
        counters = tensors["counters"].tolist() if "counters" in tensors else [0, 0]
        self.seen, self.evicted = counters[:2]
        # (a state saved before `received` existed: everything indexed or buffered was received)
        self.received = counters[2] if len(counters) > 2 else len(self) + len(self.buffer)
        self.buffer_states = tensors["buffer_states"].float().cpu() if "buffer_states" in tensors else None
        self.window_states = tensors["window_states"].float().cpu() if "window_states" in tensors else None


@functools.lru_cache(maxsize=4)
def sentence_ends(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of the tokens that end a sentence (``. ! ?``, maybe followed by quotes or brackets) or hold a
    line break; computed once per tokenizer."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    texts = [tokenizer.convert_tokens_to_string([p]) if p is not None else "" for p in pieces]
    return frozenset(i for i, text in enumerate(texts) if re.search(r"[.!?][\"')\]]*\s*$|\n", text))


def _append(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return torch.cat([a, b])


def _pack(ids: Sequence[int]) -> bytes:
    return torch.tensor(list(ids), dtype=torch.int32).numpy().tobytes()


def _unpack(blob: bytes) -> list[int]:
    return torch.frombuffer(bytearray(blob), dtype=torch.int32).tolist()


@torch.no_grad()
def encode_segments(
    model: PreTrainedModel, sink_ids: list[int], rows: list[list[int]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, keys/values ``(len(rows), kv_heads, n, head_dim)`` of each row of ids (all of length
    ``n``) placed right after the sinks ``sink_ids`` (positions ``len(sink_ids) ..``), attending to the
    sinks and themselves, on a scratch ``DynamicCache`` (nothing of a streaming cache is read)."""
    scratch = DynamicCache(config=model.config)
    input_ids = torch.tensor([list(sink_ids) + list(row) for row in rows], device=model.device)
    model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, scratch))
    start = len(sink_ids)
    keys = [layer.keys[:, :, start:] for layer in scratch.layers]
    return keys, [layer.values[:, :, start:] for layer in scratch.layers]


@torch.no_grad()
def query_vectors(model: PreTrainedModel, sink_ids: list[int], rows: list[list[int]], layer: int) -> torch.Tensor:
    """Mean hidden state at the output of decoder layer ``layer`` (what :class:`LayerTap` keeps) over each row's
    tokens (all rows of equal length), read after the sinks: ``(len(rows), hidden)``, float32 on the CPU."""
    input_ids = torch.tensor([list(sink_ids) + list(row) for row in rows], device=model.device)
    tap = LayerTap(model, layer)
    try:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        states = tap.take()
    finally:
        tap.close()
    return states[:, len(sink_ids) :].mean(dim=1)


def install_segment(model: PreTrainedModel, cache: CacheView, sink_ids: list[int], ids: list[int]) -> None:
    """Encode ``ids`` right after the sinks ``sink_ids`` and make them the pinned segment of a session's cache
    row (empty ``ids`` clears it)."""
    if ids:
        cache.set_segment(*encode_segments(model, sink_ids, [ids]))
    else:
        cache.clear_segment()
