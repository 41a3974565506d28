"""How often the lexical retrievers put the needle into the pinned segment: no model needed.

Builds exactly the rows the batched recall evaluation streams (same families, seeds and filler),
feeds each row's tokens to a :class:`RetrievalMemory` as a cache of ``--window`` tokens would evict
them, and asks for the segment at every distance. "hit" means the segment holds every expected piece
(all three numbers for multivalue): the ``retrieved`` column of the evaluation, without the model's
answer. Dense scorers need the model's hidden states and are measured by the evaluation itself.

    python benchmarks/retrieval_hits.py --out results/retrieval-hits-cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from streaming_llm.data import read_text
from streaming_llm.eval.recall import wilson
from streaming_llm.eval.recall_batch import LEAD_TOKENS, Prompt, build_rows
from streaming_llm.runtime.loading import resolve
from streaming_llm.sessions.retrieval import RetrievalMemory

VARIANTS = {"retrieval": {}, "retrieval-sent": {"split": "sentences"}}


@dataclass
class Counters:
    """What :meth:`RetrievalMemory.track` reads from a cache: sinks and how many tokens left the window."""

    start_size: int
    window: int
    seen_tokens: int = 0

    @property
    def evicted_tokens(self) -> int:
        return max(0, self.seen_tokens - self.start_size - self.window)


def hits(tokenizer, rows, prompt: Prompt, window: int, distances: list[int], settings: dict) -> dict[int, list[bool]]:
    found: dict[int, list[bool]] = {d: [] for d in distances}
    for row in rows:
        memory = RetrievalMemory(**settings)
        memory.tokenizer = tokenizer
        cache = Counters(prompt.start_size, window)
        stream = prompt.opening + prompt.before + row.block
        fed = 0
        for distance in sorted(distances):
            piece = stream + row.body[fed:distance] if fed == 0 else row.body[fed:distance]
            for start in range(0, len(piece), 2048):
                cache.seen_tokens += len(piece[start : start + 2048])
                memory.track(piece[start : start + 2048], cache)
            fed = distance
            segment = memory.segment(row.question, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"])
            found[distance].append(bool(segment) and row.fact.judge("\n".join(memory.last.passages)))
        memory.close()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="single,multikey,multivalue")
    parser.add_argument("--distances", default="1024,4096,16384,65536")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--passage-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/retrieval-hits-cpu"))
    args = parser.parse_args()
    began = time.time()
    tokenizer = AutoTokenizer.from_pretrained(resolve(None))
    distances = [int(d) for d in args.distances.split(",")]
    need = max(distances) + 2 * max(LEAD_TOKENS.values()) + 256
    filler_ids = tokenizer(read_text()[: need * 12], add_special_tokens=False)["input_ids"]
    prompt = Prompt.build(tokenizer)
    table = []
    for family in args.families.split(","):
        rows = build_rows(family, args.trials, args.seed, tokenizer, filler_ids, max(distances))
        for variant, extra in VARIANTS.items():
            settings = {"budget": args.budget, "passage_tokens": args.passage_tokens, **extra}
            for distance, found in hits(tokenizer, rows, prompt, args.window, distances, settings).items():
                low, high = wilson(sum(found), len(found))
                table.append({"family": family, "method": f"{variant}:{args.window}", "distance": distance,
                              "trials": len(found), "hit": round(sum(found) / len(found), 4),
                              "ci_low": round(low, 4), "ci_high": round(high, 4)})  # fmt: skip
                print(table[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "machine": platform.platform(),
            "seconds": round(time.time() - began, 1)}  # fmt: skip
    (args.out / "retrieval_hits.json").write_text(json.dumps({"meta": meta, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
