"""Recall vs distance: what eviction loses, and what memory gets back.

Each trial plants one fact (a pass code, a name or a date: three templates, in turn) after a short
lead of filler text, then streams filler. At every checkpoint distance the session is forked (the
cache is small: ``StreamingCache.state()`` / ``from_state()``) and the question is asked on the
fork, so one long stream per trial serves every distance. Methods:

* ``dense``: a window as large as the model's trained length (distances that fit only).
* ``streaming:W``: sinks + a rolling window of ``W`` tokens.
* ``retrieval:W``: the same stream with :class:`~streaming_llm.sessions.retrieval.RetrievalMemory` indexing what
  is evicted; before the question the best passages are pinned after the sinks. While no segment is
  pinned the cache predicts exactly as plain streaming (tested), so ``streaming:W`` and
  ``retrieval:W`` share one stream.
* ``hybrid:W``: :class:`~streaming_llm.sessions.memory.HybridMemory` (the model summarises evicted text).

Trials are appended to a JSONL file as they finish, so a run can be stopped (``max_seconds``) and
resumed. Accuracy comes with a Wilson 95% interval; the cost of the question turn (retrieval lookup
and segment encoding included) and of streaming the filler are recorded next to it.
"""

from __future__ import annotations

import copy
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..sessions.memory import HybridMemory
from ..sessions.retrieval import RetrievalMemory
from ..sessions.session import StreamingSession

SYSTEM = "You are a helpful assistant."
LEAD_TOKENS = 64  # filler before the fact, so the fact is never one of the pinned start tokens
ANSWER_TOKENS = 24  # room for a sentence around the answer ("The pass code of the red door is 4817.")
QUESTION_ROOM = 256  # tokens kept free in the dense window for the question and answer

COLORS = ("blue", "red", "green", "yellow", "white", "black", "orange", "purple")
SHIPS = ("Valdora", "Kestrel", "Morwenna", "Halcyon", "Tessaly", "Orlanth", "Zephyrine", "Caradoc")
FIRST = ("Maria", "James", "Aiko", "Omar", "Lena", "Tomas", "Priya", "Victor")
LAST = ("Okonkwo", "Lindqvist", "Tanaka", "Moreau", "Kowalski", "Fernandes", "Haddad", "Novak")
TOWNS = ("Brimsby", "Quellford", "Ostrava", "Lanmere", "Dunholt", "Vessany", "Pirrow", "Garsden")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October")


@dataclass(frozen=True)
class Fact:
    template: str
    sentence: str
    question: str
    expected: tuple[str, ...]  # every piece must appear in the answer (case-insensitive)
    others: tuple[str, ...] = ()  # more needles, planted before this one (distractors, or the other values)

    def judge(self, answer: str) -> bool:
        return all(piece.lower() in answer.lower() for piece in self.expected)


def _code(rng: random.Random) -> Fact:
    color, code = rng.choice(COLORS), str(rng.randrange(1000, 10000))
    return Fact(
        "code", f"The pass code of the {color} door is {code}.",
        f"What is the pass code of the {color} door? Answer with the number only.", (code,),
    )  # fmt: skip


def _name(rng: random.Random) -> Fact:
    ship, first, last = rng.choice(SHIPS), rng.choice(FIRST), rng.choice(LAST)
    return Fact(
        "name", f"The captain of the ship {ship} is {first} {last}.",
        f"Who is the captain of the ship {ship}? Answer with the name only.", (last,),
    )  # fmt: skip


def _date(rng: random.Random) -> Fact:
    town, month, day = rng.choice(TOWNS), rng.choice(MONTHS), rng.randrange(2, 29)
    return Fact(
        "date", f"The harvest festival of {town} is held on {month} {day}.",
        f"On what date is the harvest festival of {town} held? Answer with the date only.", (month, str(day)),
    )  # fmt: skip


TEMPLATES: dict[str, Callable[[random.Random], Fact]] = {"code": _code, "name": _name, "date": _date}


@dataclass(frozen=True)
class Method:
    """``kind`` is dense, streaming, retrieval or hybrid; ``window`` the recent tokens kept."""

    kind: str
    window: int

    @property
    def label(self) -> str:
        return self.kind if self.kind == "dense" else f"{self.kind}:{self.window}"


def parse_methods(spec: str, dense_window: int) -> list[Method]:
    """``"dense,streaming:256,retrieval:1024"`` -> methods (raises ValueError on unknown ones)."""
    methods = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        kind, _, window = item.partition(":")
        if kind == "dense":
            methods.append(Method("dense", dense_window))
        elif kind in ("streaming", "retrieval", "hybrid") and window.isdigit():
            methods.append(Method(kind, int(window)))
        else:
            raise ValueError(
                f"Unknown recall method {item!r}: use dense, streaming:W, retrieval:W or hybrid:W (W = window tokens)."
            )
    return methods


@dataclass
class Stream:
    """One stream per trial serves the methods that share its cache contents."""

    window: int
    memory: str  # "", "retrieval" or "hybrid"
    methods: list[Method] = field(default_factory=list)
    max_distance: int | None = None


def plan_streams(methods: list[Method], hybrid_max_distance: int | None) -> list[Stream]:
    streams: dict[tuple[int, str], Stream] = {}
    for method in methods:
        if method.kind in ("dense", "streaming", "retrieval"):
            has_retrieval = any(m.kind == "retrieval" and m.window == method.window for m in methods)
            key = (method.window, "retrieval" if has_retrieval else "")
        else:
            key = (method.window, "hybrid")
        stream = streams.setdefault(key, Stream(*key))
        stream.methods.append(method)
        if method.kind == "hybrid":
            stream.max_distance = hybrid_max_distance
    return list(streams.values())


def fork(session: StreamingSession) -> StreamingSession:
    """An independent copy of ``session`` (a snapshot of its state), without memory."""
    return session.fork(keep_memory=False)


def _ask(session: StreamingSession, after: list[int], fact: Fact, retrieval: RetrievalMemory | None) -> dict:
    clone = fork(session)
    clone.feed(after)  # close the document message
    began = time.perf_counter()
    extra = {}
    if retrieval is not None:
        retrieval.recall(clone, fact.question)
        extra = {
            "lookup_s": round(retrieval.last.lookup_seconds, 5), "encode_s": round(retrieval.last.encode_seconds, 5),
            "segment_tokens": retrieval.last.tokens,
            "retrieved": any(all(p.lower() in t.lower() for p in fact.expected) for t in retrieval.last.passages),
        }  # fmt: skip
    answer = clone.chat(fact.question, ANSWER_TOKENS, stop=("\n",))
    return {"answer": answer.strip(), "correct": fact.judge(answer),
            "turn_s": round(time.perf_counter() - began, 5), **extra}  # fmt: skip


def run_trial(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, filler_ids: list[int], trial: int,
    distances: list[int], streams: list[Stream], seed: int = 0, hybrid: HybridMemory | None = None,
    retrieval_settings: dict | None = None,
) -> dict:  # fmt: skip
    """One trial: plant a fact, stream filler once per :class:`Stream`, ask at every distance on a fork."""
    rng = random.Random(f"{seed}-{trial}")
    names = sorted(TEMPLATES)
    fact = TEMPLATES[names[trial % len(names)]](rng)
    longest = max(distances)
    offset = rng.randrange(0, len(filler_ids) - LEAD_TOKENS - longest - 1)
    lead = filler_ids[offset : offset + LEAD_TOKENS]
    body = filler_ids[offset + LEAD_TOKENS : offset + LEAD_TOKENS + longest]
    rows, costs = [], []
    for stream in streams:
        memory = None
        if stream.memory == "retrieval":
            memory = RetrievalMemory(**(retrieval_settings or {}))
        elif stream.memory == "hybrid":
            memory = copy.copy(hybrid or HybridMemory())
        session = StreamingSession(model, tokenizer, SYSTEM, recent_size=stream.window, memory=memory)
        before, after = session.template.split("user")
        after_ids = session._tokens(after)
        planted = session._tokens(before) + lead + session._tokens(f"\n{fact.sentence}\n")
        session.feed(planted)
        fed, stream_s = 0, 0.0
        for distance in sorted(distances):
            if stream.max_distance is not None and distance > stream.max_distance:
                break
            room = distance + len(planted) + QUESTION_ROOM
            fits = [m for m in stream.methods if m.kind != "dense" or room < m.window]
            if not fits:
                continue
            began = time.perf_counter()
            session.feed(body[fed:distance])
            stream_s += time.perf_counter() - began
            fed = distance
            for method in fits:
                use = session.memory if method.kind == "retrieval" else None
                result = _ask(session, after_ids, fact, use)
                rows.append({"trial": trial, "template": fact.template, "method": method.label,
                             "window": method.window, "distance": distance, "expected": " ".join(fact.expected),
                             **result})  # fmt: skip
        costs.append({"stream": f"{stream.memory or 'plain'}:{stream.window}", "tokens": fed, "seconds": stream_s})
        if isinstance(memory, RetrievalMemory):
            memory.close()
    return {"trial": trial, "template": fact.template, "rows": rows, "streams": costs}


def recall_vs_distance(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    filler: str,
    distances: list[int],
    methods: list[Method],
    trials: int = 50,
    seed: int = 0,
    jsonl: Path | None = None,
    max_seconds: float | None = None,
    hybrid: HybridMemory | None = None,
    hybrid_max_distance: int | None = None,
    retrieval_settings: dict | None = None,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> list[dict]:
    """Run (or resume) ``trials`` trials; return every finished trial (one dict each).

    Args:
        filler: Text the filler is drawn from (needs ``max(distances) + 64`` tokens at least).
        distances: Tokens between the fact and the question.
        jsonl: Finished trials are appended here and skipped when the run is resumed.
        max_seconds: Stop (after the trial in progress) once this much time has passed.
        shard: ``(k, n)``: run only trials ``t`` with ``t % n == k`` (for parallel workers).

    Raises:
        ValueError: The filler text is too short for the longest distance.
    """
    longest = max(distances)
    filler_ids = tokenizer(filler[: (longest + 4 * LEAD_TOKENS) * 20], add_special_tokens=False)["input_ids"]
    if len(filler_ids) < longest + 4 * LEAD_TOKENS:
        raise ValueError(
            f"The filler text has {len(filler_ids)} tokens; distance {longest} needs more: pass a longer text."
        )
    streams = plan_streams(methods, hybrid_max_distance)
    done = load_trials(jsonl) if jsonl else []
    finished = {t["trial"] for t in done}
    began = time.time()
    todo = [t for t in range(trials) if t not in finished and t % shard[1] == shard[0]]
    for trial in tqdm(todo, desc="recall trials", disable=not progress):
        if max_seconds is not None and time.time() - began > max_seconds:
            break
        result = run_trial(model, tokenizer, filler_ids, trial, distances, streams, seed, hybrid, retrieval_settings)
        done.append(result)
        if jsonl:
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            with open(jsonl, "a") as f:
                f.write(json.dumps(result) + "\n")
    return done


def load_trials(path: Path) -> list[dict]:
    """Finished trials from a JSONL file (a line cut by an interrupted write is ignored)."""
    if not path.exists():
        return []
    trials = []
    for line in path.read_text().splitlines():
        try:
            trials.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return trials


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); ``(0, 1)`` when ``n == 0``."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_table(trials: list[dict]) -> list[dict]:
    """Accuracy per (method, distance) with its Wilson 95% interval and the median question-turn cost."""
    groups: dict[tuple, list[dict]] = {}
    for trial in trials:
        for row in trial["rows"]:
            groups.setdefault((row["method"], row["window"], row["distance"]), []).append(row)
    table = []
    for (method, window, distance), rows in sorted(groups.items()):
        hits = sum(r["correct"] for r in rows)
        low, high = wilson(hits, len(rows))
        entry = {
            "method": method, "window": window, "distance": distance, "trials": len(rows),
            "accuracy": round(hits / len(rows), 4), "ci_low": round(low, 4), "ci_high": round(high, 4),
            "turn_ms_median": round(1000 * statistics.median(r["turn_s"] for r in rows), 2),
        }  # fmt: skip
        if "retrieved" in rows[0]:
            entry["retrieved"] = round(sum(r["retrieved"] for r in rows) / len(rows), 4)
            entry["lookup_ms_median"] = round(1000 * statistics.median(r["lookup_s"] for r in rows), 3)
            entry["encode_ms_median"] = round(1000 * statistics.median(r["encode_s"] for r in rows), 2)
        table.append(entry)
    return table


def stream_costs(trials: list[dict]) -> list[dict]:
    """Streaming throughput (tokens/s of filler fed) per stream, over all trials."""
    totals: dict[str, list[float]] = {}
    for trial in trials:
        for cost in trial["streams"]:
            total = totals.setdefault(cost["stream"], [0, 0.0])
            total[0] += cost["tokens"]
            total[1] += cost["seconds"]
    return [{"stream": s, "tokens": t, "seconds": round(sec, 2), "tokens_per_s": round(t / max(sec, 1e-9), 1)}
            for s, (t, sec) in sorted(totals.items())]  # fmt: skip


def recall_plot(table: list[dict], path: Path, title: str) -> None:
    """Accuracy vs distance per method, with Wilson 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method in dict.fromkeys(r["method"] for r in table):
        rows = sorted((r for r in table if r["method"] == method), key=lambda r: r["distance"])
        x = [r["distance"] for r in rows]
        y = [r["accuracy"] for r in rows]
        err = [[r["accuracy"] - r["ci_low"] for r in rows], [r["ci_high"] - r["accuracy"] for r in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("tokens between the fact and the question")
    ax.set_ylabel("accuracy (Wilson 95% interval)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
