"""Does a dense score from the model's own hidden states find the needle as often as BM25? (CPU, small.)

Streams rows of the batched recall evaluation through the real model (no questions asked, so no
decoding), with one forward hook per probed decoder layer, and feeds each row's evicted tokens to
BM25, sentence-BM25, dense and fused memories. At each distance it asks every memory for its segment
and counts a hit when the segment holds the expected answer. Small by necessity on a 2-core CPU;
the GPU evaluation measures the kept variants at full size.

    python benchmarks/dense_hits.py --out results/dense-hits-cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from streaming_llm.core.attention import install
from streaming_llm.core.cache import StreamingCache
from streaming_llm.data import read_text
from streaming_llm.eval.recall import wilson
from streaming_llm.eval.recall_batch import LEAD_TOKENS, Prompt, _forward, build_rows
from streaming_llm.runtime.loading import load_model
from streaming_llm.sessions.retrieval import LayerTap, RetrievalMemory, query_vectors


def variants(layers: list[int]) -> dict[str, dict]:
    found = {"bm25": {}, "bm25-sentences": {"split": "sentences"}}
    for layer in layers:
        found[f"dense@{layer}"] = {"scorer": "dense", "dense_layer": layer}
        found[f"fused@{layer}"] = {"scorer": "fused", "dense_layer": layer}
    return found


@torch.no_grad()
def run_group(model, tokenizer, prompt: Prompt, rows, window, distances, layers, settings, chunk) -> dict:
    cache = StreamingCache(model.config, prompt.start_size, window, segment_capacity=settings["budget"])
    taps = {layer: LayerTap(model, layer, cache) for layer in layers}
    kinds = variants(layers)
    memories = {name: [RetrievalMemory(**settings, **extra) for _ in rows] for name, extra in kinds.items()}
    for group in memories.values():
        for memory in group:
            memory.tokenizer = tokenizer
    hits = {(name, d): [] for name in kinds for d in distances}
    sinks = prompt.opening[: prompt.start_size]
    questions = [tokenizer(r.question, add_special_tokens=False)["input_ids"] for r in rows]

    def feed(pieces):
        ids = torch.tensor(pieces)
        for start in range(0, ids.shape[1], chunk):
            part = ids[:, start : start + chunk]
            _forward(model, cache, part)
            states = {layer: tap.take() for layer, tap in taps.items()}
            for name, group in memories.items():
                layer = kinds[name].get("dense_layer")
                for r, memory in enumerate(group):
                    memory.track(part[r].tolist(), cache, states[layer][r] if layer is not None else None)

    feed([prompt.opening + prompt.before + row.block for row in rows])
    fed = 0
    for distance in sorted(distances):
        feed([row.body[fed:distance] for row in rows])
        fed = distance
        vectors = {layer: query_vectors(model, sinks, questions, layer) for layer in layers}
        for name, group in memories.items():
            layer = kinds[name].get("dense_layer")
            for r, memory in enumerate(group):
                query = vectors[layer][r] if layer is not None else None
                memory.segment(rows[r].question, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], query)
                hits[(name, distance)].append(rows[r].fact.judge("\n".join(memory.last.passages)))
    for tap in taps.values():
        tap.close()
    return hits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="single:9,multikey:6", help="family:trials,...")
    parser.add_argument("--distances", default="1024,4096")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--layers", default="8,15,22")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--passage-tokens", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("results/dense-hits-cpu"))
    args = parser.parse_args()
    began = time.time()
    model, tokenizer = load_model(device="cpu", dtype="float32")
    install(model)
    distances = [int(d) for d in args.distances.split(",")]
    layers = [int(x) for x in args.layers.split(",")]
    need = max(distances) + 2 * max(LEAD_TOKENS.values()) + 256
    filler_ids = tokenizer(read_text()[: need * 12], add_special_tokens=False)["input_ids"]
    prompt = Prompt.build(tokenizer)
    settings = {"budget": args.budget, "passage_tokens": args.passage_tokens}
    table = []
    for spec in args.families.split(","):
        family, _, trials = spec.partition(":")
        rows = build_rows(family, int(trials), 0, tokenizer, filler_ids, max(distances))
        groups: dict[int, list] = {}
        for row in rows:
            groups.setdefault(len(prompt.question(tokenizer, row.question)), []).append(row)
        merged: dict[tuple, list[bool]] = {}
        for group in groups.values():
            for key, found in run_group(model, tokenizer, prompt, group, args.window, distances, layers, settings,
                                        args.chunk).items():  # fmt: skip
                merged.setdefault(key, []).extend(found)
            print(f"{family}: {len(group)} rows done, {time.time() - began:.0f} s", file=sys.stderr, flush=True)
        for (name, distance), found in sorted(merged.items()):
            low, high = wilson(sum(found), len(found))
            table.append({"family": family, "retriever": name, "distance": distance, "trials": len(found),
                          "hit": round(sum(found) / len(found), 4), "ci_low": round(low, 4),
                          "ci_high": round(high, 4)})  # fmt: skip
            print(table[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "machine": platform.platform(), "window": args.window,
            "seconds": round(time.time() - began, 1)}  # fmt: skip
    (args.out / "dense_hits.json").write_text(json.dumps({"meta": meta, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
