"""Quantized KV quality and memory: SmolLM2 perplexity at 4+1020 with bf16 / int8 / float8_e4m3 KV, side by side.

The same tokens (the first ``--tokens`` of the packaged text) stream through SmolLM2-135M (fp32 compute, CPU)
once per KV dtype; ``bfloat16`` stores keys/values in bf16 (read back in fp32), ``int8``/``float8_e4m3``
quantize them with one float32 scale per token and kv head (core/quant.py); the float32 KV run is the
reference the others are compared with. Memory: ``StreamingCache.nbytes`` (scales and the canonical pinned
keys included) for SmolLM2 at 4+1020 and the Llama-3-8B shape at 4+4092, against bf16 KV.

    python benchmarks/kv_quant.py --tokens 8192     # what fits in ~10 minutes on 2 shared cores
    python benchmarks/kv_quant.py --tokens 65536    # the issue's target: the first 64k tokens

Writes benchmarks/results/kv_quant.{json,csv,png} (the command is in the JSON).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KV = ("float32", "bfloat16", "int8", "float8_e4m3")
TARGETS = {"int8": 1.01, "float8_e4m3": 1.02}  # ppl ratio to bf16 KV


def memory_ratios() -> list[dict]:
    import torch
    from transformers import LlamaConfig

    from streaming_llm import StreamingCache
    from streaming_llm.runtime.loading import load_model

    smol = load_model(device="cpu", dtype="float32")[0].config
    llama3 = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0)  # fmt: skip
    rows = []
    for name, config, recent in (("SmolLM2-135M", smol, 1020), ("Llama-3-8B shape", llama3, 4092)):
        sizes = {kv: StreamingCache(config, 4, recent, rows=1, dtype=torch.bfloat16, device="meta",
                                    kv_dtype=kv).nbytes for kv in ("bfloat16", "int8", "float8_e4m3")}  # fmt: skip
        for kv, n in sizes.items():
            rows.append({"model": name, "cache": f"4+{recent}", "kv_dtype": kv, "bytes_per_session": n,
                         "ratio_to_bf16": n / sizes["bfloat16"]})  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--kv", default=",".join(KV))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "kv_quant")
    args = parser.parse_args()
    import torch

    from streaming_llm.data import read_text
    from streaming_llm.eval.perplexity import perplexity, streaming_nll
    from streaming_llm.runtime.loading import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(device="cpu", dtype="float32")
    ids = torch.tensor(tokenizer(read_text(None)[: args.tokens * 8])["input_ids"][: args.tokens])
    runs, nll = [], {}
    for kv in args.kv.split(","):
        began = time.perf_counter()
        with torch.no_grad():
            nll[kv] = streaming_nll(model, ids, 4, 1020, args.chunk_size, kv_dtype=kv)
        runs.append({"kv_dtype": kv, "tokens": len(ids), "ppl": perplexity(nll[kv]),
                     "seconds": time.perf_counter() - began})  # fmt: skip
        print(f"{kv}: ppl {runs[-1]['ppl']:.4f} ({runs[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    base = next((r["ppl"] for r in runs if r["kv_dtype"] == "bfloat16"), None)
    for r in runs:
        r["ratio_to_bf16"] = r["ppl"] / base if base else None
        target = TARGETS.get(r["kv_dtype"])
        r["target"] = target
        r["meets_target"] = None if target is None or base is None else r["ratio_to_bf16"] <= target
    memory = memory_ratios()
    out = {
        "command": "python " + " ".join(["benchmarks/kv_quant.py", *sys.argv[1:]]),
        "model": "SmolLM2-135M-Instruct (embedded), fp32 compute, CPU", "cache": "4+1020",
        "text": "packaged Shakespeare, first tokens", "runs": runs, "memory": memory,
        "memory_target": "KV bytes per session <= 0.53x bf16 (scales included)",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    with args.out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kv, values in nll.items():
        running = values.cumsum(0) / torch.arange(1, len(values) + 1)
        ax.plot(running.exp().numpy(), label=f"{kv} KV (ppl {perplexity(values):.3f})")
    ax.set(xlabel="token", ylabel="running perplexity", title=f"SmolLM2 4+1020, {len(ids):,} tokens, KV dtypes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
