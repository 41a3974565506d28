"""GPU decode latency and memory vs context: StreamingCache vs transformers' DynamicCache.

A Llama-3-8B-shaped model with random bf16 weights (speed does not depend on the weights) streams
random tokens up to each context length (prefill in chunks), then decodes greedily; decode steps
are timed with CUDA synchronisation. Both caches run in the same process, side by side, at every
context, so the ratios are measured under the same conditions.

    python benchmarks/gpu_decode.py --out benchmarks/results/gpu_decode      # on a CUDA machine
    python benchmarks/gpu_decode.py --tiny --device cpu --contexts 256 512   # a smoke test anywhere
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming_llm import StreamingCache, install  # noqa: E402
from streaming_llm.benchmark import measure_decode  # noqa: E402

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
)  # fmt: skip
TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=8192,
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--start-size", type=int, default=4)
    parser.add_argument("--recent-size", type=int, default=4092)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per context, order rotated; medians kept")
    parser.add_argument("--stock", action="store_true", help="also time DynamicCache with transformers' own sdpa")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    install(model)  # streaming attention: identical to sdpa with the DynamicCache
    methods = {
        "dynamic": lambda: DynamicCache(config=model.config),
        "streaming": lambda: StreamingCache(model.config, args.start_size, args.recent_size),
    }
    if args.stock:  # transformers' own sdpa attention, to check the switched model costs nothing extra
        methods = {"dynamic-stock": methods["dynamic"], **methods}
    rows, runs = [], []
    for context in args.contexts:
        names = list(methods)
        for repeat in range(args.repeats):  # rotate the order: the first run after a change is slow
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for method in order:
                model.set_attn_implementation("sdpa" if method == "dynamic-stock" else "streaming_llm")
                run = {
                    "method": method,
                    "repeat": repeat,
                    **measure_decode(model, methods[method], context, args.decode, args.chunk),
                }  # noqa: E501
                run.pop("tokens")
                runs.append(run)
                print(json.dumps(run), flush=True)
        for method in names:  # the median over repeats
            mine = sorted(
                (r for r in runs if r["method"] == method and r["context"] == context), key=lambda r: r["ms_per_token"]
            )  # noqa: E501
            rows.append(
                {**mine[len(mine) // 2], "repeats": len(mine), "all_ms_per_token": [r["ms_per_token"] for r in mine]}
            )  # noqa: E501
    header = ("context", "HF ms/tok", "ours ms/tok", "HF/ours", "HF cache", "ours cache")
    print("\n" + " | ".join(f"{h:>11}" for h in header))
    ratios = []
    for context in args.contexts:
        hf, ours = (
            next(r for r in rows if r["method"] == m and r["context"] == context) for m in ("dynamic", "streaming")
        )
        ratio = hf["ms_per_token"] / ours["ms_per_token"]
        ratios.append({"context": context, "speedup": ratio, "cache_ratio": hf["cache_mib"] / ours["cache_mib"]})
        cells = (context, f"{hf['ms_per_token']:.2f}", f"{ours['ms_per_token']:.2f}", f"{ratio:.2f}x",
                 f"{hf['cache_mib']:.0f}M", f"{ours['cache_mib']:.0f}M")  # fmt: skip
        print(" | ".join(f"{c:>11}" for c in cells))
    if args.out:
        import transformers

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        meta = {
            "command": "python " + " ".join(sys.argv), "device": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "dtype": str(dtype),
            "model": "tiny" if args.tiny else "Llama-3-8B-shaped, random weights",
            "cache": f"StreamingCache {args.start_size}+{args.recent_size} vs DynamicCache",
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(
            json.dumps({"meta": meta, "rows": rows, "ratios": ratios, "runs": runs}, indent=2)
        )


if __name__ == "__main__":
    main()
