"""Quantized KV decode speed (H200): bf16 vs int8 vs float8_e4m3 KV, Llama-3-8B shape, 4+4092, 1 and 32 rows.

One process, one Llama-3-8B-shaped model (random bf16 weights: speed does not depend on them). For each KV
dtype a cache of ``max(--rows)`` rows is filled the same way (one row streams ``--stream`` random tokens for
real, its snapshot is restored into every row), then the captured decode step (``Stepper``) is timed at each
row count, every step's greedy tokens read back. Reports tokens/s, the ratio to bf16 KV in the same run, and
the cache bytes per row. Targets (issue 27): 32 rows int8 >= 1.25x bf16; 1 row no slower than bf16 by > 5%.

    python benchmarks/kv_quant_gpu.py --out benchmarks/results/kv_quant_gpu      # (bash benchmarks/device_kvquant.sh)
    python benchmarks/kv_quant_gpu.py --tiny --device cpu --rows 1 2 --decode 3 --recent-size 60 --stream 80 \\
        --out /tmp/kvg                                                             # smoke test (CPU)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming_llm import StreamingCache, install  # noqa: E402
from streaming_llm.core.stepper import Stepper  # noqa: E402
from streaming_llm.eval.benchmark import sync  # noqa: E402
from streaming_llm.eval.shapes import LLAMA3_8B, TINY  # noqa: E402


@torch.no_grad()
def measure(model, kv: str, args) -> list[dict]:
    dtype_kv = None if kv == "bfloat16" else kv
    n_max = max(args.rows)
    one = StreamingCache(model.config, args.start_size, args.recent_size, rows=1, dtype=model.dtype,
                         device=model.device, kv_dtype=dtype_kv)  # fmt: skip
    stepper = Stepper(model, one)
    ids = torch.randint(0, model.config.vocab_size, (args.stream,), generator=torch.Generator().manual_seed(0))
    for piece in ids.to(model.device).split(args.chunk):
        logits = stepper.prefill(0, piece)
    first = int(logits.argmax())
    state = one.row_state(0)
    del stepper, one
    cache = StreamingCache(model.config, args.start_size, args.recent_size, rows=n_max, dtype=model.dtype,
                           device=model.device, kv_dtype=dtype_kv)  # fmt: skip
    for b in range(n_max):
        cache.assign(b, state=state)
    stepper = Stepper(model, cache)
    out = []
    for n in args.rows:
        rows = list(range(n))
        tokens, times = dict.fromkeys(rows, first), []
        for i in range(args.warmup + args.decode):
            sync(model.device)
            began = time.perf_counter()
            logits = stepper.decode(tokens)
            tokens = dict(zip(rows, logits[rows].argmax(-1).tolist(), strict=True))
            if i >= args.warmup:
                times.append(time.perf_counter() - began)
        mean = statistics.fmean(times)
        out.append({"kv_dtype": kv, "rows": n, "context": cache.row(0).seen_tokens, "ms_per_step": 1000 * mean,
                    "tokens_per_s": n / mean, "cache_mib_per_row": cache.row_bytes / 2**20,
                    "graph_replays": stepper.replays})  # fmt: skip
        print(json.dumps(out[-1]), flush=True)
    del stepper, cache
    torch.cuda.empty_cache() if model.device.type == "cuda" else None
    return out


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--kv", default="bfloat16,int8,float8_e4m3")
    parser.add_argument("--decode", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--stream", type=int, default=4200, help="tokens streamed for real (past the 4+4092 window)")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--start-size", type=int, default=4)
    parser.add_argument("--recent-size", type=int, default=4092)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))).to(dtype).eval()
    install(model)
    rows = []
    for kv in args.kv.split(","):
        try:
            rows += measure(model, kv, args)
        except Exception as error:  # one dtype failing (e.g. no fp8 support) must not lose the others
            rows.append({"kv_dtype": kv, "error": f"{type(error).__name__}: {error}"})
            print(json.dumps(rows[-1]), flush=True)
    base = {r["rows"]: r["tokens_per_s"] for r in rows if r.get("kv_dtype") == "bfloat16" and "tokens_per_s" in r}
    for r in rows:
        if "tokens_per_s" in r and r["rows"] in base:
            r["ratio_to_bf16"] = r["tokens_per_s"] / base[r["rows"]]
    meta = {
        "command": "python " + " ".join(["benchmarks/kv_quant_gpu.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "shape": "tiny" if args.tiny else "Llama-3-8B (random bf16 weights)",
        "cache": f"{args.start_size}+{args.recent_size}",
        "targets": {"32 rows int8 / bf16": ">= 1.25", "1 row int8 / bf16": ">= 0.95"},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
