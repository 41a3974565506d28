"""Ingestion benchmark: exact chunked streaming ingestion vs transformers' prefill, side by side.

Ours: a StreamingCache (4 + 4092 by default) fed in chunks, timed per segment up to each checkpoint
(32k / 256k / 1M tokens), with peak device memory after the first chunk. Baseline in the same run:
transformers' prefill with a DynamicCache and its own sdpa attention, as one dense forward on the GPU
(8k and 32k tokens, while memory lasts) or in chunks on the CPU (where it slows as its cache grows).

    python benchmarks/ingest.py --out benchmarks/results/ingest_gpu                     # CUDA, 8B-shaped
    python benchmarks/ingest.py --device cpu --smollm --checkpoints 2048 8192 --baseline 2048 8192 \\
        --chunk 512 --recent-size 2044 --out benchmarks/results/ingest_cpu             # CPU, SmolLM2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming_llm import StreamingCache, install  # noqa: E402
from streaming_llm.core.compat import cache_kwargs  # noqa: E402
from streaming_llm.eval.benchmark import rss_mib, sync  # noqa: E402
from streaming_llm.eval.shapes import LLAMA3_8B, TINY  # noqa: E402
from streaming_llm.runtime.generation import prefill  # noqa: E402


def memory_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mib()


@torch.no_grad()
def ours(model, ids: torch.Tensor, checkpoints: list[int], chunk: int, start: int, recent: int) -> list[dict]:
    device = model.device
    cache = StreamingCache(model.config, start, recent)
    rows, fed, began = [], 0, time.perf_counter()
    first_chunk_memory = None
    segment_began, segment_start = began, 0
    for checkpoint in checkpoints:
        while fed < checkpoint:
            n = min(chunk, checkpoint - fed)
            prefill(model, cache, ids[fed : fed + n] if ids.numel() >= fed + n else ids[:n], n)
            fed += n
            if first_chunk_memory is None:
                sync(device)
                first_chunk_memory = memory_mib(device)
        sync(device)
        now = time.perf_counter()
        rate = (checkpoint - segment_start) / (now - segment_began)
        rows.append({
            "method": "ours", "tokens": checkpoint, "tokens_per_s": rate,
            "cumulative_tokens_per_s": checkpoint / (now - began), "peak_mib": memory_mib(device),
            "peak_after_first_chunk_mib": first_chunk_memory, "cache_mib": cache.nbytes / 2**20, "chunk": chunk,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        segment_began, segment_start = now, checkpoint
    return rows


@torch.no_grad()
def baseline(model, ids: torch.Tensor, tokens: int, chunk: int | None) -> dict:
    """transformers' prefill (sdpa, DynamicCache): one forward (chunk None) or chunked."""
    device = model.device
    model.set_attn_implementation("sdpa")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cache = DynamicCache(config=model.config)
    sync(device)
    began = time.perf_counter()
    step = chunk or tokens
    try:
        for i in range(0, tokens, step):
            model(input_ids=ids[None, i : i + step], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        sync(device)
        row = {"tokens_per_s": tokens / (time.perf_counter() - began), "peak_mib": memory_mib(device)}
    except torch.OutOfMemoryError:
        row = {"tokens_per_s": None, "error": "out of memory"}
    finally:
        model.set_attn_implementation("streaming_llm")
    del cache
    return {"method": "dense" if chunk is None else f"dynamic-chunked-{chunk}", "tokens": tokens, **row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[32768, 262144, 1048576])
    parser.add_argument("--baseline", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--baseline-chunk", type=int, default=None, help="chunk the baseline (CPU)")
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--start-size", type=int, default=4)
    parser.add_argument("--recent-size", type=int, default=4092)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--smollm", action="store_true", help="the embedded SmolLM2 on real text (CPU)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.smollm:
        from streaming_llm.runtime.loading import load_model

        model, tokenizer = load_model(device=str(device), dtype="float32")
        from streaming_llm.data import read_text

        text = read_text()
        ids = torch.tensor(tokenizer(text[: 6 * max(args.checkpoints + args.baseline)])["input_ids"], device=device)
    else:
        config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
        ids = torch.randint(0, config.vocab_size, (max(args.checkpoints + args.baseline),), device=device)
    install(model)
    rows = [baseline(model, ids, n, args.baseline_chunk) for n in args.baseline]
    for row in rows:
        print(json.dumps(row), flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rows += ours(model, ids, args.checkpoints, args.chunk, args.start_size, args.recent_size)
    best = max((r["tokens_per_s"] or 0) for r in rows if r["method"] != "ours")
    print(f"\n{'method':>22} | {'tokens':>8} | {'tok/s':>9} | {'vs best baseline':>16} | {'peak MiB':>8}")
    for r in rows:
        ratio = (r["tokens_per_s"] or 0) / best if best else float("nan")
        print(f"{r['method']:>22} | {r['tokens']:>8} | {r['tokens_per_s'] or 0:9.0f} | {ratio:16.2f} | "
              f"{r.get('peak_mib') or 0:8.0f}")  # fmt: skip
    import transformers

    meta = {
        "command": "python " + " ".join(sys.argv), "torch": torch.__version__, "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "model": "SmolLM2-135M (embedded)" if args.smollm else ("tiny" if args.tiny else "Llama-3-8B-shaped, random"),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, args.out.with_suffix(".png"), meta)


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    mine = [r for r in rows if r["method"] == "ours"]
    ax.plot([r["tokens"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label="ours (exact, streamed)")
    for r in rows:
        if r["method"] != "ours" and r["tokens_per_s"]:
            ax.scatter([r["tokens"]], [r["tokens_per_s"]], marker="x", s=60, label=f"{r['method']} {r['tokens']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens ingested")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"Ingestion: {meta['model']} on {meta['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
