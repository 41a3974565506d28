"""CPU decode speed and memory vs tokens streamed: StreamingCache vs transformers' DynamicCache.

Both methods stream the same Shakespeare text through SmolLM2-135M (fp32, CPU): the text is fed in
chunks of 512 up to each checkpoint, then 32 greedy tokens are decoded one by one and timed. Each
method runs in its own fresh process (so peak RSS is its own); the parent prints the ratios.

    python benchmarks/cpu_decode.py                      # writes benchmarks/results/cpu_decode.*
    python benchmarks/cpu_decode.py --checkpoints 512 1024 --decode 8   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ("streaming", "streaming-compiled", "dynamic")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(method: str, checkpoints: list[int], decode: int, threads: int) -> list[dict]:
    import torch
    from transformers import DynamicCache

    from streaming_llm import StreamingCache, install
    from streaming_llm.core.compat import cache_kwargs
    from streaming_llm.core.stepper import Stepper
    from streaming_llm.eval.benchmark import cache_bytes, rss_mib
    from streaming_llm.runtime.generation import prefill
    from streaming_llm.runtime.loading import load_model

    torch.set_num_threads(threads)
    model, tokenizer = load_model(device="cpu", dtype="float32")
    from streaming_llm.data import read_text

    text = read_text()[:400_000]
    ids = torch.tensor(tokenizer(text)["input_ids"][: max(checkpoints) + 1])
    streaming = method.startswith("streaming")
    if streaming:
        install(model)
        cache = StreamingCache(model.config, start_size=4, recent_size=2000)
        decoder = Stepper(model, cache, compile=method == "streaming-compiled")
    else:
        cache = DynamicCache(config=model.config)

    def step(token: torch.Tensor) -> torch.Tensor:
        if streaming:
            return decoder.decode({0: int(token)})[0].argmax(-1)
        out = model(input_ids=token.reshape(1, 1), use_cache=True, **cache_kwargs(model, cache))
        return out.logits[0, -1].argmax(-1)

    base_rss = rss_mib()
    rows, fed = [], 0
    with torch.no_grad():
        for checkpoint in checkpoints:
            while fed < checkpoint:  # stream the text up to the checkpoint
                chunk = ids[fed : min(checkpoint, fed + 512)][None]
                if streaming:
                    prefill(model, cache, chunk, 512)
                else:
                    model(input_ids=chunk, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
                fed += chunk.shape[1]
            token = ids[fed]
            for _ in range(2):  # warm-up (compiles the steady step once for "streaming-compiled")
                token = step(token)
            start = time.perf_counter()
            for _ in range(decode):
                token = step(token)
            elapsed = time.perf_counter() - start
            fed += decode + 2
            rows.append({
                "method": method, "tokens_streamed": checkpoint, "ms_per_token": 1000 * elapsed / decode,
                "tokens_per_s": decode / elapsed, "rss_mib": rss_mib(), "rss_above_model_mib": rss_mib() - base_rss,
                "peak_rss_mib": peak_rss_mib(), "cache_mib": cache_bytes(cache) / 2**20,
            })  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--decode", type=int, default=32, help="tokens decoded (timed) at each checkpoint")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cpu_decode")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpoints, args.decode, args.threads)))
        return

    began = time.time()
    rows = []
    for method in METHODS:
        command = [sys.executable, __file__, "--worker", method, "--decode", str(args.decode),
                   "--threads", str(args.threads), "--checkpoints", *map(str, args.checkpoints)]  # fmt: skip
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        rows += json.loads(result.stdout.strip().splitlines()[-1])
    write(rows, args, time.time() - began)


def write(rows: list[dict], args: argparse.Namespace, seconds: float) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    by = {(r["method"], r["tokens_streamed"]): r for r in rows}
    ratios = []
    print(
        f"\n{'tokens':>8} | {'ms/tok ours':>11} | {'ms/tok HF':>9} | {'speedup':>7} | {'RSS ours':>8} | {'RSS HF':>7}"
    )
    for n in args.checkpoints:
        ours, hf = by[("streaming", n)], by[("dynamic", n)]
        speedup = hf["ms_per_token"] / ours["ms_per_token"]
        compiled = by[("streaming-compiled", n)]
        ratios.append({
            "tokens_streamed": n, "speedup": speedup, "speedup_compiled": hf["ms_per_token"] / compiled["ms_per_token"],
            "rss_ratio": hf["peak_rss_mib"] / ours["peak_rss_mib"],
        })  # fmt: skip
        print(f"{n:>8} | {ours['ms_per_token']:>11.1f} | {hf['ms_per_token']:>9.1f} | {speedup:>6.2f}x | "
              f"{ours['peak_rss_mib']:>7.0f}M | {hf['peak_rss_mib']:>6.0f}M")  # fmt: skip
    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "threads": args.threads, "decode_tokens_per_checkpoint": args.decode, "seconds": round(seconds),
        "model": "SmolLM2-135M-Instruct fp32 (embedded)", "cache": "StreamingCache 4+2000 vs DynamicCache",
    }  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2))
    plot(rows, args.out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for method, label in (
        ("streaming", "StreamingCache 4+2000"), ("streaming-compiled", "StreamingCache, compiled step"),
        ("dynamic", "DynamicCache (full)"),
    ):  # fmt: skip
        mine = [r for r in rows if r["method"] == method]
        xs = [r["tokens_streamed"] for r in mine]
        speed.plot(xs, [r["ms_per_token"] for r in mine], marker="o", label=label)
        memory.plot(xs, [r["peak_rss_mib"] for r in mine], marker="o", label=label)
    for ax, ylabel in ((speed, "decode ms / token"), (memory, "peak RSS (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens streamed")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M on CPU: decode cost and memory vs tokens streamed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
