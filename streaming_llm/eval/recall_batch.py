"""Recall vs distance at scale: RULER-style needle families, many trials as the rows of one batch.

The per-trial evaluation in :mod:`streaming_llm.eval.recall` runs one session per trial; at 50 trials
per cell and 64k-token distances that is hours of eager forwards. Here the trials of a family that
share a question length are the rows of one batched :class:`StreamingCache` (all rows at the same
positions): one stream of filler per group of rows and window serves every distance and every method
that shares that cache, and each question is asked of all rows at once on a copy of the cache.

Families of facts (``FAMILIES``):

* ``single``: one needle, three templates in turn (a pass code, a captain's name, a festival date).
* ``multikey`` (RULER's multi-key): "One of the special magic numbers for {key} is: {value}." with three
  distractor needles of the same form and other keys planted at random points in the 2,048 tokens
  before the target; asked for the target key's number.
* ``multivalue`` (RULER's multi-value): three needles with the same key and different numbers, the
  last one at the distance; correct only if all three numbers come back.

Each row is exactly what a :class:`~streaming_llm.sessions.session.StreamingSession` sees when it is
given the document as one user message and then asked the question (same chat-template tokens, same
pinned system prompt, same greedy decoding, same :class:`~streaming_llm.sessions.retrieval.RetrievalMemory`
fed with the row's evicted tokens); ``tests/test_eval.py`` checks a row against the session path.
Rows of different lengths cannot share positions, so filler absorbs the needles' length differences
and trials are grouped by the length of their question.

Methods: ``dense``, ``streaming:W``, ``hybrid`` is left to the per-trial path, and the retrieval variants
of ``VARIANTS`` (``retrieval:W``, ``retrieval-sent:W``, ``retrieval-dense:W``, ``retrieval-fused:W``), which
share the stream of ``streaming:W`` (while no segment is pinned the cache predicts exactly as plain
streaming). Cells are appended to a JSONL file as each distance is reached, so a run can be stopped
(``max_seconds``) and resumed; a unit (one group of rows on one window) that finished is skipped.
"""

from __future__ import annotations

import collections
import copy
import functools
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..core.attention import install
from ..core.cache import StreamingCache
from ..core.compat import cache_kwargs
from ..runtime.generation import eos_ids
from ..sessions.chat_template import IncrementalChatTemplate
from ..sessions.retrieval import LayerTap, RetrievalMemory, encode_segments, query_vectors
from .recall import COLORS, FIRST, LAST, MONTHS, QUESTION_ROOM, SHIPS, SYSTEM, TOWNS, Fact, wilson

FAMILIES = ("single", "multikey", "multivalue")
VARIANTS: dict[str, dict] = {
    "retrieval": {},
    "retrieval-sent": {"split": "sentences"},
    "retrieval-dense": {"scorer": "dense"},
    "retrieval-fused": {"scorer": "fused"},
}
ANSWER_TOKENS = {"single": 24, "multikey": 24, "multivalue": 64}  # single and multikey answers end at a line break
LEAD_TOKENS = {"single": 64, "multikey": 2048, "multivalue": 2048}  # filler around the needles before the target
# Single tokens for SmolLM2 (any tokenizer works: questions are grouped by their length).
# fmt: off
ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "keen", "lively",
              "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "golden", "silver", "bitter", "sweet")
NOUNS = ("falcon", "lantern", "meadow", "harbor", "violin", "walnut", "comet", "orchid", "canyon", "kettle",
         "glacier", "beacon", "sparrow", "quarry", "anchor", "river", "castle", "forest", "garden", "hammer")
# fmt: on
NEEDLE = "One of the special magic numbers for {} is: {}."


# -- facts ------------------------------------------------------------------------------------------
def _modal(options: list, render: Callable[[object], str], tokenizer: PreTrainedTokenizerBase) -> list:
    """The options whose rendering has the most common token length (so questions batch together)."""
    lengths = [len(tokenizer(render(o), add_special_tokens=False)["input_ids"]) for o in options]
    mode = collections.Counter(lengths).most_common(1)[0][0]
    return [o for o, n in zip(options, lengths, strict=True) if n == mode]


@functools.lru_cache(maxsize=4)
def vocabulary(tokenizer: PreTrainedTokenizerBase) -> dict[str, list]:
    """Word lists restricted to the choices whose questions have one token length for ``tokenizer``."""
    keys = [f"{a}-{n}" for a in ADJECTIVES for n in NOUNS]
    return {
        "colors": _modal(list(COLORS), lambda c: f"What is the pass code of the {c} door?", tokenizer),
        "ships": _modal(list(SHIPS), lambda s: f"Who is the captain of the ship {s}?", tokenizer),
        "towns": _modal(list(TOWNS), lambda t: f"On what date is the harvest festival of {t} held?", tokenizer),
        "keys": _modal(keys, lambda k: f"What is the special magic number for {k} mentioned in the text?", tokenizer),
    }


def _code(rng: random.Random, words: dict[str, list]) -> Fact:
    color, code = rng.choice(words["colors"]), str(rng.randrange(1000, 10000))
    question = f"What is the pass code of the {color} door? Answer with the number only."
    return Fact("code", f"The pass code of the {color} door is {code}.", question, (code,))


def _name(rng: random.Random, words: dict[str, list]) -> Fact:
    ship, first, last = rng.choice(words["ships"]), rng.choice(FIRST), rng.choice(LAST)
    question = f"Who is the captain of the ship {ship}? Answer with the name only."
    return Fact("name", f"The captain of the ship {ship} is {first} {last}.", question, (last,))


def _date(rng: random.Random, words: dict[str, list]) -> Fact:
    town, month, day = rng.choice(words["towns"]), rng.choice(MONTHS), rng.randrange(2, 29)
    question = f"On what date is the harvest festival of {town} held? Answer with the date only."
    return Fact("date", f"The harvest festival of {town} is held on {month} {day}.", question, (month, str(day)))


def _multikey(rng: random.Random, words: dict[str, list]) -> Fact:
    keys = rng.sample(words["keys"], 4)
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), 4)]
    question = f"What is the special magic number for {keys[0]} mentioned in the text? Answer with the number only."
    others = tuple(NEEDLE.format(k, v) for k, v in zip(keys[1:], values[1:], strict=True))
    return Fact("multikey", NEEDLE.format(keys[0], values[0]), question, (values[0],), others)


def _multivalue(rng: random.Random, words: dict[str, list]) -> Fact:
    key = rng.choice(words["keys"])
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), 3)]
    question = f"What are all the special magic numbers for {key} mentioned in the text? Answer with the numbers only."
    others = tuple(NEEDLE.format(key, v) for v in values[1:])
    return Fact("multivalue", NEEDLE.format(key, values[0]), question, tuple(values), others)


def make_fact(family: str, trial: int, rng: random.Random, words: dict[str, list]) -> Fact:
    """The fact of ``trial`` of ``family`` (``single`` rotates code, date, name), random choices from ``rng``.

    Raises:
        ValueError: An unknown family.
    """
    if family == "single":
        return (_code, _date, _name)[trial % 3](rng, words)
    if family == "multikey":
        return _multikey(rng, words)
    if family == "multivalue":
        return _multivalue(rng, words)
    raise ValueError(f"Unknown family {family!r}; choose from {', '.join(FAMILIES)}.")


# -- rows -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One trial: its fact and its document tokens (needles in filler, then the filler that follows)."""

    family: str
    trial: int
    fact: Fact
    block: list[int]  # filler with the needles, the target last (same length for every row of a family)
    body: list[int]  # filler after the target (longest distance)
    question: str


def build_rows(
    family: str, trials: int, seed: int, tokenizer: PreTrainedTokenizerBase, filler_ids: list[int], longest: int
) -> list[Row]:
    """``trials`` rows of ``family``: needles spliced into filler at random offsets of ``filler_ids``."""
    words = vocabulary(tokenizer)
    lead = LEAD_TOKENS[family]
    encode = functools.partial(_encode, tokenizer)
    facts, needles = [], []
    for trial in range(trials):
        rng = random.Random(f"{seed}-{family}-{trial}")
        fact = make_fact(family, trial, rng, words)
        facts.append((fact, rng))
        needles.append(sum(len(encode(f"\n{s}\n")) for s in (*fact.others, fact.sentence)))
    block_len = lead + max(needles)
    rows = []
    for trial, ((fact, rng), needle_len) in enumerate(zip(facts, needles, strict=True)):
        offset = rng.randrange(0, len(filler_ids) - block_len - longest - 1)
        region = filler_ids[offset : offset + block_len - needle_len]
        cuts = sorted(rng.sample(range(len(region) + 1), len(fact.others)))
        block, last = [], 0
        for cut, other in zip(cuts, fact.others, strict=True):
            block += region[last:cut] + encode(f"\n{other}\n")
            last = cut
        block += region[last:] + encode(f"\n{fact.sentence}\n")
        body = filler_ids[offset + len(region) : offset + len(region) + longest]
        rows.append(Row(family, trial, fact, block, body, fact.question))
    return rows


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


@dataclass(frozen=True)
class Prompt:
    """The chat-template pieces every row shares, tokenized as a session tokenizes them."""

    opening: list[int]  # the system message (pinned with the sinks)
    before: list[int]  # opens the document's user message
    after: list[int]  # closes it
    start_size: int

    @classmethod
    def build(cls, tokenizer: PreTrainedTokenizerBase, system: str = SYSTEM, start_size: int = 4) -> Prompt:
        template = IncrementalChatTemplate(tokenizer)
        opening = _encode(tokenizer, template.add("system", system))
        before, after = template.split("user")
        return cls(opening, _encode(tokenizer, before), _encode(tokenizer, after), max(start_size, len(opening)))

    def question(self, tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
        """Tokens of ``text`` as the next user message (with the assistant header), after the document."""
        template = IncrementalChatTemplate(tokenizer)
        template.add("system", SYSTEM)
        template.split("user")
        return _encode(tokenizer, template.add("user", text, generation_prompt=True))


# -- planning -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """``kind``: dense, streaming or a retrieval variant (a key of ``VARIANTS``); ``window``: recent tokens."""

    kind: str
    window: int

    @property
    def label(self) -> str:
        return self.kind if self.kind == "dense" else f"{self.kind}:{self.window}"


def parse_methods(spec: str, dense_window: int) -> list[Method]:
    """``"dense,streaming:256,retrieval:1024,retrieval-dense:1024"`` -> methods.

    Raises:
        ValueError: An unknown method (hybrid runs in the per-trial path only).
    """
    methods = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        kind, _, window = item.partition(":")
        if kind == "dense" and not window:
            methods.append(Method("dense", dense_window))
        elif (kind == "streaming" or kind in VARIANTS) and window.isdigit():
            methods.append(Method(kind, int(window)))
        else:
            raise ValueError(
                f"Unknown batched recall method {item!r}: use dense, streaming:W or one of "
                f"{', '.join(f'{v}:W' for v in VARIANTS)} (hybrid:W runs per trial, see --per-trial)."
            )
    return methods


@dataclass
class Unit:
    """One stream: a group of rows (equal question lengths) on one window, serving ``methods``."""

    family: str
    rows: list[Row]
    window: int
    methods: list[Method]
    timed: bool = False  # also time row 0's question alone (one session's turn) at every distance

    @property
    def name(self) -> str:
        return f"{self.family}/{self.rows[0].trial}-{self.rows[-1].trial}/w{self.window}"


def plan_units(
    families: list[str], trials: int, methods: list[Method], distances: list[int], tokenizer: PreTrainedTokenizerBase,
    filler_ids: list[int], seed: int = 0, batch_rows: int = 64, timed_families: tuple[str, ...] = ("single",),
    max_slots: int = 131072,
) -> list[Unit]:  # fmt: skip
    """Units in the order they should run: the windows with a memory first (every family), then dense, then the
    other windows (plain-streaming baselines), so what a cut run loses first is the cheapest to argue about.

    A unit holds at most ``batch_rows`` rows, and at most ``max_slots // window`` (the cache of a unit, and its
    copy while a question is asked, hold ``rows x window`` token slots per layer).
    """
    prompt = Prompt.build(tokenizer)
    dense = _dense(methods)
    windows = sorted({m.window for m in methods}, key=lambda w: (not _has_memory(methods, w), w != dense))
    groups: dict[str, list[list[Row]]] = {}
    for family in families:
        by_length: dict[int, list[Row]] = {}
        for row in build_rows(family, trials, seed, tokenizer, filler_ids, max(distances)):
            by_length.setdefault(len(prompt.question(tokenizer, row.question)), []).append(row)
        groups[family] = list(by_length.values())
    units = []
    for window in windows:
        served = [m for m in methods if m.window == window]
        size = max(1, min(batch_rows, max_slots // window))
        for family in families:
            timed = family in timed_families
            for group in groups[family]:
                for start in range(0, len(group), size):
                    units.append(Unit(family, group[start : start + size], window, served, timed))
                    timed = False
    return units


def _dense(methods: list[Method]) -> int | None:
    return next((m.window for m in methods if m.kind == "dense"), None)


def _has_memory(methods: list[Method], window: int) -> bool:
    return any(m.kind in VARIANTS and m.window == window for m in methods)


# -- running one unit ---------------------------------------------------------------------------------
@torch.no_grad()
def _forward(model: PreTrainedModel, cache: StreamingCache, ids: torch.Tensor) -> torch.Tensor:
    """Feed ``ids`` ``(rows, n)``; the next-token logits ``(rows, vocab)``."""
    positions = cache.position_ids(ids.shape[1], ids.device)
    out = model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    return out.logits[:, -1]


def copy_cache(model: PreTrainedModel, cache: StreamingCache, rows: list[int] | None = None) -> StreamingCache:
    """An independent copy of ``cache`` (only batch ``rows`` if given), through ``state()``/``from_state()``."""
    tensors, counters = cache.state()
    if rows is not None:
        index = torch.tensor(rows, device=next(iter(tensors.values())).device)
        tensors = {k: v.index_select(1, index) for k, v in tensors.items()}  # (layers, batch, ...)
    return StreamingCache.from_state(model.config, tensors, copy.deepcopy(counters))


@functools.lru_cache(maxsize=4)
def newline_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of the tokens whose text holds a line break (where a reply stopped at ``"\\n"`` ends)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    texts = [tokenizer.convert_tokens_to_string([p]) if p is not None else "" for p in pieces]
    return frozenset(i for i, text in enumerate(texts) if "\n" in text)


@torch.no_grad()
def greedy_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cache: StreamingCache, logits: torch.Tensor,
    max_new_tokens: int, one_line: bool = True,
) -> list[str]:  # fmt: skip
    """Greedy replies of every row from ``logits`` ``(rows, vocab)``, each cut at end-of-turn and (``one_line``) at
    a line break: what a session's ``chat(question, max_new_tokens, stop=("\\n",))`` (or ``stop=()``) returns."""
    stops = eos_ids(model, tokenizer)
    breaks = newline_ids(tokenizer) if one_line else frozenset()
    tokens: list[list[int]] = [[] for _ in range(logits.shape[0])]
    done = [False] * logits.shape[0]
    for step in range(max_new_tokens):
        chosen = logits.argmax(dim=-1)
        for r, token in enumerate(chosen.tolist()):
            if not done[r]:
                done[r] = token in stops
                if not done[r]:
                    tokens[r].append(token)
                    done[r] = token in breaks
        if all(done) or step == max_new_tokens - 1:
            break
        logits = _forward(model, cache, chosen[:, None])
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return [(text.split("\n")[0] if one_line else text).strip() for text in texts]


@dataclass
class Runner:
    """Runs units for one model and tokenizer; cells go to ``jsonl`` as they are measured."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    jsonl: Path | None = None
    retrieval_settings: dict = field(default_factory=dict)
    dense_layer: int | None = None
    chunk_tokens: int = 32768  # tokens per batched forward (rows x chunk)
    done: set[tuple] = field(default_factory=set)  # (family, trial, method, distance) already measured

    def __post_init__(self):
        install(self.model)
        self.prompt = Prompt.build(self.tokenizer)
        if self.dense_layer is None:
            self.dense_layer = self.model.config.num_hidden_layers // 2
        self.tokenize = functools.partial(_encode, self.tokenizer)

    def missing(self, unit: Unit, distances: list[int]) -> list[int]:
        """Distances of ``unit`` with a cell not yet measured (those that fit the window, for dense)."""
        return [d for d in distances if any(
            (unit.family, row.trial, m.label, d) not in self.done for row in unit.rows for m in self._fits(unit, d)
        )]  # fmt: skip

    def _fits(self, unit: Unit, distance: int) -> list[Method]:
        """The methods of ``unit`` that can be asked at ``distance`` (dense: while everything fits its window)."""
        room = distance + len(self.prompt.opening) + len(self.prompt.before) + len(unit.rows[0].block) + QUESTION_ROOM
        return [m for m in unit.methods if m.kind != "dense" or room < m.window]

    def run(
        self, unit: Unit, distances: list[int], deadline: float | None = None, clock: Callable[[], float] = time.time
    ) -> dict:
        """Stream ``unit``'s rows, ask at every distance; returns the stream's cost record."""
        rows, window = unit.rows, unit.window
        variants = sorted({m.kind for m in unit.methods if m.kind in VARIANTS})
        memories = {v: [self._memory(v) for _ in rows] for v in variants}
        segment_capacity = memories[variants[0]][0].budget if variants else 0
        cache = StreamingCache(self.model.config, self.prompt.start_size, window, segment_capacity=segment_capacity)
        tap = None  # the stream's hidden states (dense scorers); forwards on copies and scratch caches are ignored
        if any(VARIANTS[v].get("scorer", "bm25") != "bm25" for v in variants):
            tap = LayerTap(self.model, self.dense_layer, cache)
        device = self.model.device
        prefix = [self.prompt.opening + self.prompt.before + row.block for row in rows]
        began, index_s, fed = time.perf_counter(), 0.0, 0
        index_s += self._feed(cache, prefix, memories, tap)
        for distance in sorted(distances):
            if not self._fits(unit, distance):
                break
            index_s += self._feed(cache, [row.body[fed:distance] for row in rows], memories, tap)
            fed = distance
            if distance in self.missing(unit, distances):
                self._ask_all(unit, cache, distance, memories)
            if deadline is not None and clock() > deadline:
                break
        if tap is not None:
            tap.close()
        for memory in itertools.chain.from_iterable(memories.values()):
            memory.close()
        seconds = time.perf_counter() - began
        record = {"kind": "stream", "unit": unit.name, "family": unit.family, "window": window, "rows": len(rows),
                  "tokens": fed + len(prefix[0]), "seconds": round(seconds, 3), "index_seconds": round(index_s, 3),
                  "device": str(device)}  # fmt: skip
        self._write([record])
        return record

    def _memory(self, variant: str) -> RetrievalMemory:
        settings = {**self.retrieval_settings, **VARIANTS[variant]}
        if settings.get("scorer", "bm25") != "bm25":
            settings["dense_layer"] = self.dense_layer
        memory = RetrievalMemory(**settings)
        memory.tokenizer = self.tokenizer  # states come from the runner's own hook
        return memory

    def _feed(self, cache: StreamingCache, pieces: list[list[int]], memories: dict, tap: LayerTap | None) -> float:
        """Feed equal-length ``pieces`` (one per row) in chunks; report them to the memories. Returns the
        seconds spent indexing."""
        length = len(pieces[0])
        chunk = max(64, self.chunk_tokens // len(pieces))
        ids = torch.tensor(pieces, device=self.model.device)
        index_s = 0.0
        for start in range(0, length, chunk):
            part = ids[:, start : start + chunk]
            _forward(self.model, cache, part)
            began = time.perf_counter()
            states = tap.take() if tap is not None else None
            rows = part.tolist()
            for variant, row_memories in memories.items():
                dense = VARIANTS[variant].get("scorer", "bm25") != "bm25"
                for r, memory in enumerate(row_memories):
                    memory.track(rows[r], cache, states[r] if dense else None)
            index_s += time.perf_counter() - began
        return index_s

    def _ask_all(self, unit: Unit, cache: StreamingCache, distance: int, memories: dict) -> None:
        cells = []
        for method in self._fits(unit, distance):
            rows = list(range(len(unit.rows)))
            answers, costs = self._ask(unit, cache, rows, method, memories)
            for r, row in enumerate(unit.rows):
                cells.append({
                    "kind": "cell", "family": unit.family, "trial": row.trial, "template": row.fact.template,
                    "method": method.label, "window": method.window, "distance": distance,
                    "expected": " ".join(row.fact.expected), "answer": answers[r],
                    "correct": row.fact.judge(answers[r]), "rows": len(rows), **_pick(costs, r),
                })  # fmt: skip
            if unit.timed:  # one session's turn: row 0 alone
                alone, alone_costs = self._ask(unit, cache, [0], method, memories)
                cells.append({
                    "kind": "turn", "family": unit.family, "method": method.label, "window": method.window,
                    "distance": distance, "same_answer": alone[0] == answers[0], **_pick(alone_costs, 0),
                })  # fmt: skip
        self._write(cells)

    def _ask(self, unit: Unit, cache: StreamingCache, rows: list[int], method: Method, memories: dict):
        """Ask ``rows`` their question on a copy of ``cache`` (with ``method``'s segment); answers and costs."""
        device = self.model.device
        fork = copy_cache(self.model, cache, rows if len(rows) < len(unit.rows) else None)  # not a session cost
        _sync(device)
        began = time.perf_counter()
        _forward(self.model, fork, torch.tensor([self.prompt.after] * len(rows), device=device))
        costs: dict = {}
        if method.kind in VARIANTS:
            costs = self._pin(unit, fork, rows, memories[method.kind])
        questions = [self.prompt.question(self.tokenizer, unit.rows[r].question) for r in rows]
        logits = _forward(self.model, fork, torch.tensor(questions, device=device))
        one_line = unit.family != "multivalue"  # a list of numbers may come one per line
        answers = greedy_answers(self.model, self.tokenizer, fork, logits, ANSWER_TOKENS[unit.family], one_line)
        _sync(device)
        costs["turn_s"] = round((time.perf_counter() - began) / len(rows), 5)  # per row (amortised over the batch)
        return answers, costs

    def _pin(self, unit: Unit, fork: StreamingCache, rows: list[int], memories: list[RetrievalMemory]) -> dict:
        """Pin each row's best passages after the sinks of ``fork``; per-row lookup costs, batch encode cost."""
        if not memories[rows[0]].received:
            return {"lookup_s": 0.0, "encode_s": 0.0, "segment_tokens": 0, "retrieved": [False] * len(rows),
                    "matched": [False] * len(rows)}  # fmt: skip
        began = time.perf_counter()
        queries = [None] * len(rows)
        if memories[rows[0]].dense:
            messages = [self.tokenize(unit.rows[r].question) for r in rows]
            queries = list(query_vectors(self.model, self.prompt.opening[: self.prompt.start_size], messages,
                                         self.dense_layer))  # fmt: skip
        shared = (time.perf_counter() - began) / len(rows)
        segments, lookups, retrieved, matched = [], [], [], []
        for r, query in zip(rows, queries, strict=True):
            memory, fact = memories[r], unit.rows[r].fact
            segments.append(memory.segment(fact.question, self.tokenize, query))
            lookups.append(round(memory.last.lookup_seconds + shared, 5))
            retrieved.append(fact.judge("\n".join(memory.last.passages)))
            matched.append(memory.last.matched)
        if len({len(s) for s in segments}) != 1:
            raise RuntimeError(f"Rows got segments of different lengths {sorted({len(s) for s in segments})}.")
        began = time.perf_counter()
        keys, values = encode_segments(self.model, self.prompt.opening[: self.prompt.start_size], segments)
        fork.set_segment(keys, values)
        _sync(self.model.device)
        encode = (time.perf_counter() - began) / len(rows)
        return {"lookup_s": lookups, "encode_s": round(encode, 5), "segment_tokens": len(segments[0]),
                "retrieved": retrieved, "matched": matched}  # fmt: skip

    def _write(self, records: list[dict]) -> None:
        for r in records:
            if r["kind"] == "cell":
                self.done.add((r["family"], r["trial"], r["method"], r["distance"]))
        if self.jsonl is not None and records:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            with open(self.jsonl, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)


def _pick(costs: dict, r: int) -> dict:
    """Row ``r``'s costs (per-row lists) next to the batch-wide ones."""
    return {k: (v[r] if isinstance(v, list) else v) for k, v in costs.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the whole run ------------------------------------------------------------------------------------
def run_batched(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, filler: str, families: list[str], distances: list[int],
    methods: list[Method], trials: int = 50, seed: int = 0, jsonl: Path | None = None,
    max_seconds: float | None = None, shard: tuple[int, int] = (0, 1), batch_rows: int = 64,
    retrieval_settings: dict | None = None, dense_layer: int | None = None, chunk_tokens: int = 32768,
    max_slots: int = 131072, done_from: list[Path] = (), log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.time,
) -> list[dict]:  # fmt: skip
    """Run (or resume) the batched recall evaluation; returns the stream cost records of this call.

    Args:
        filler: Text the filler is drawn from (at least ``max(distances)`` + 2,200 tokens).
        jsonl: Cells and cost records are appended here.
        max_seconds: Start no unit that would end after this many seconds (judged from the speed of the units
            run so far), and stop a running one after the distance it is at.
        shard: ``(k, n)``: run only units ``u`` with ``u % n == k`` (parallel workers).
        max_slots: Most ``rows x window`` per unit (bounds the memory of the dense, 8k-window units).
        done_from: JSONL files whose cells count as done (other shards, earlier calls).

    Raises:
        ValueError: The filler text is too short for the longest distance.
    """
    longest = max(distances)
    need = longest + 2 * max(LEAD_TOKENS.values()) + 256
    filler_ids = _encode(tokenizer, filler[: need * 12])
    if len(filler_ids) < need:
        raise ValueError(f"The filler text has {len(filler_ids)} tokens; distance {longest} needs {need}.")
    units = plan_units(
        families, trials, methods, distances, tokenizer, filler_ids, seed, batch_rows, max_slots=max_slots
    )
    runner = Runner(model, tokenizer, jsonl, retrieval_settings or {}, dense_layer, chunk_tokens)
    for path in {*done_from, *([jsonl] if jsonl else [])}:
        cells = [c for c in load_records(path) if c.get("kind") == "cell"]
        runner.done |= {(c["family"], c["trial"], c["method"], c["distance"]) for c in cells}
    began = clock()
    deadline = began + max_seconds if max_seconds is not None else None
    records, streamed, spent = [], 0, 0.0  # row-tokens streamed and seconds taken by the units of this call
    for u, unit in enumerate(units):
        if u % shard[1] != shard[0] or not runner.missing(unit, distances):
            continue
        longest = max((d for d in distances if runner._fits(unit, d)), default=0)
        size = len(unit.rows) * (len(unit.rows[0].block) + longest)
        estimate = size * spent / streamed if streamed else 0.0  # (the first unit: no estimate, it starts)
        if deadline is not None and clock() + estimate > deadline:
            log(f"skipping {unit.name}: it would take ~{estimate:.0f} s, {deadline - clock():.0f} s left")
            continue  # a smaller unit later may still fit
        record = runner.run(unit, distances, deadline, clock)
        streamed, spent = streamed + record["rows"] * record["tokens"], spent + record["seconds"]
        records.append(record)
        log(f"{unit.name}: {record['rows']} rows x {record['tokens']} tokens in {record['seconds']:.1f} s "
            f"(indexing {record['index_seconds']:.1f} s), {clock() - began:.0f} s elapsed")  # fmt: skip
    return records


def load_records(path: Path) -> list[dict]:
    """Every record of a JSONL file (a line cut by an interrupted write is ignored)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# -- tables --------------------------------------------------------------------------------------------
def cell_table(records: list[dict]) -> list[dict]:
    """Accuracy per (family, method, distance) with its Wilson 95% interval, the retrieval hit rate and costs.

    Duplicated cells (a unit re-run after an interruption) count once (the first).
    """
    cells, seen = collections.defaultdict(list), set()
    turns = collections.defaultdict(list)
    for r in records:
        if r.get("kind") == "turn":
            turns[(r["family"], r["method"], r["distance"])].append(r)
        if r.get("kind") != "cell" or (key := (r["family"], r["trial"], r["method"], r["distance"])) in seen:
            continue
        seen.add(key)
        cells[(r["family"], r["method"], r["window"], r["distance"])].append(r)
    table = []
    for (family, method, window, distance), rows in sorted(cells.items()):
        hits = sum(r["correct"] for r in rows)
        low, high = wilson(hits, len(rows))
        entry = {
            "family": family, "method": method, "window": window, "distance": distance, "trials": len(rows),
            "accuracy": round(hits / len(rows), 4), "ci_low": round(low, 4), "ci_high": round(high, 4),
            "batched_turn_ms": round(1000 * statistics.median(r["turn_s"] for r in rows), 2),
        }  # fmt: skip
        timed = turns.get((family, method, distance), [])
        entry["turn_ms"] = round(1000 * statistics.median(t["turn_s"] for t in timed), 2) if timed else None
        if "retrieved" in rows[0]:
            entry["retrieved"] = round(sum(r["retrieved"] for r in rows) / len(rows), 4)
            entry["lookup_ms"] = round(1000 * statistics.median(r["lookup_s"] for r in rows), 3)
            entry["encode_ms"] = round(1000 * statistics.median(r["encode_s"] for r in rows), 2)
            if timed:
                entry["turn_lookup_ms"] = round(1000 * statistics.median(t["lookup_s"] for t in timed), 3)
                entry["turn_encode_ms"] = round(1000 * statistics.median(t["encode_s"] for t in timed), 2)
        table.append(entry)
    return table


def stream_summary(records: list[dict]) -> list[dict]:
    """Filler streamed per (family, window): tokens (all rows), seconds, seconds spent indexing, tokens/s."""
    totals: dict[tuple, list[float]] = {}
    for r in records:
        if r.get("kind") == "stream":
            total = totals.setdefault((r["family"], r["window"]), [0, 0.0, 0.0])
            total[0] += r["tokens"] * r["rows"]
            total[1] += r["seconds"]
            total[2] += r["index_seconds"]
    return [
        {"stream": f"{family}:{window}", "tokens": int(t), "seconds": round(seconds, 1),
         "index_seconds": round(index, 1), "tokens_per_s": round(t / max(seconds, 1e-9))}
        for (family, window), (t, seconds, index) in sorted(totals.items())
    ]  # fmt: skip


def trial_cells(trials: list[dict]) -> list[dict]:
    """Rows of the per-trial path (:func:`streaming_llm.eval.recall.recall_vs_distance`) as cells of the
    ``single`` family (its templates rotate code, date, name as ``single`` does)."""
    return [{"kind": "cell", "family": "single", **row} for trial in trials for row in trial["rows"]]


def markdown(table: list[dict]) -> str:
    """Per family: accuracy (trials) [Wilson 95%] per method and distance; then the cost of the question turn
    (one session's turn where it was timed, the batch's per-row share, and the retrieval hit rate)."""
    lines = []
    for family in dict.fromkeys(r["family"] for r in table):
        rows = [r for r in table if r["family"] == family]
        distances = sorted({r["distance"] for r in rows})
        cells = {(r["method"], r["distance"]): r for r in rows}
        methods = list(dict.fromkeys(r["method"] for r in sorted(rows, key=lambda r: (r["window"], r["method"]))))
        header = ["| method | " + " | ".join(f"d={d:,}" for d in distances) + " |", "|---|" + "---|" * len(distances)]
        for title, entry in (("accuracy (trials) [Wilson 95%]", _accuracy), ("question turn", _cost)):
            lines += [f"**{family}: {title}**", "", *header]
            for method in methods:
                entries = [entry(cells[(method, d)]) if (method, d) in cells else "–" for d in distances]
                lines.append(f"| {method} | " + " | ".join(entries) + " |")
            lines.append("")
    return "\n".join(lines)


def _accuracy(c: dict) -> str:
    return f"{100 * c['accuracy']:.0f}% ({c['trials']}) [{100 * c['ci_low']:.0f}–{100 * c['ci_high']:.0f}]"


def _cost(c: dict) -> str:
    turn = f"{c['turn_ms']:.0f} ms" if c.get("turn_ms") is not None else "–"
    hit = f", hit {100 * c['retrieved']:.0f}%" if "retrieved" in c else ""
    return f"{turn} (batch {c['batched_turn_ms']:.0f}){hit}"
