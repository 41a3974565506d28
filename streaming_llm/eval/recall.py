"""Recall vs distance: what eviction loses.

A fact ("The pass code of the blue door is 4817.") is planted inside filler text, a controlled
number of tokens before a question about it. Within the window the model can read the fact; beyond
it plain streaming has forgotten it (by design); hybrid memory keeps what its summary keeps.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..memory import HybridMemory
from ..session import StreamingSession

COLORS = ("blue", "red", "green", "yellow", "white", "black", "orange", "purple")
LEAD_TOKENS = 64  # filler before the fact, so the fact is never one of the pinned start tokens
ANSWER_TOKENS = 32  # room for a sentence around the code (digits are single tokens)


@dataclass(frozen=True)
class RecallTrial:
    method: str
    window: int
    distance: int  # tokens between the end of the fact and the question
    code: str
    answer: str
    correct: bool


def _filler(tokenizer: PreTrainedTokenizerBase, text: str, start: int, count: int) -> str:
    ids = tokenizer(text[start : start + 12 * count + 1000], add_special_tokens=False)["input_ids"][:count]
    return tokenizer.decode(ids)


def run_trial(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, filler: str, method: str, window: int, distance: int,
    rng: random.Random, memory: HybridMemory | None = None,
) -> RecallTrial:  # fmt: skip
    code, color = f"{rng.randrange(1000, 10000)}", rng.choice(COLORS)
    offset = rng.randrange(0, max(1, len(filler) - 12 * (distance + LEAD_TOKENS) - 2000))
    document = (
        _filler(tokenizer, filler, offset, LEAD_TOKENS) + f"\nThe pass code of the {color} door is {code}.\n"
        + _filler(tokenizer, filler, offset + 8 * LEAD_TOKENS, distance)
    )  # fmt: skip
    session = StreamingSession(
        model, tokenizer, "You are a helpful assistant.", recent_size=window,
        memory=memory if method == "hybrid" else None,
    )  # fmt: skip
    session.ingest(document, progress=False)
    answer = session.chat(f"What is the pass code of the {color} door? Answer with the number only.", ANSWER_TOKENS)
    return RecallTrial(method, window, distance, code, answer.strip(), code in answer)


def recall_vs_distance(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    filler: str,
    distances: list[int],
    windows: list[int],
    methods: tuple[str, ...] = ("streaming", "hybrid"),
    trials: int = 10,
    seed: int = 0,
    memory: HybridMemory | None = None,
    progress: bool = True,
    hybrid_windows: list[int] | None = None,
    hybrid_trials: int | None = None,
) -> list[dict]:
    """Accuracy trials for every (method, window, distance); ``dense`` ignores ``windows`` and keeps
    everything the model can hold. Hybrid memory is slow (it summarises with the model), so it can
    run fewer trials on fewer windows."""
    rng = random.Random(seed)
    plan = []
    for method in methods:
        if method == "dense":
            method_windows, count = [model.config.max_position_embeddings - 8], trials
        elif method == "hybrid":
            method_windows, count = hybrid_windows or windows, hybrid_trials or trials
        else:
            method_windows, count = windows, trials
        for window in method_windows:
            plan += [(method, window, d) for d in distances for _ in range(count)]
    rows = []
    for method, window, distance in tqdm(plan, desc="recall", disable=not progress):
        trial = run_trial(model, tokenizer, filler, method, window, distance, rng, memory or HybridMemory())
        rows.append(asdict(trial))
    return rows


def accuracy_table(rows: list[dict]) -> list[dict]:
    """Accuracy per (method, window, distance)."""
    groups: dict[tuple, list[bool]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["window"], row["distance"]), []).append(row["correct"])
    return [
        {"method": m, "window": w, "distance": d, "accuracy": sum(v) / len(v), "trials": len(v)}
        for (m, w, d), v in sorted(groups.items())
    ]
