"""Batched decode of independent streams (SlotCache): total tokens/s and per-stream ms/token.

At 1, 8, 32 and 64 live streams, each past 32k tokens, one batched step per token of every stream
(captured CUDA graph per bucket on CUDA). Random weights (speed does not depend on them):
Llama-3-8B-shaped in bf16 on CUDA; SmolLM2-135M-shaped (``--smollm2``) or tiny (``--tiny``) in fp32 on CPU.

How the streams get past 32k: row 0 streams ``--stream-limit`` random tokens for real (chunked
prefill), then its counters are fast-forwarded (``streaming_llm.eval.benchmark.fast_forward``: same kept
tokens, slots and positions as a real stream that long), then its state is restored into every
other row (``SlotCache.assign(b, state=...)``). So all rows hold the same kept tokens; each step
still writes, turns and attends per row exactly as for distinct streams.

Baseline: one stream alone on a plain ``StreamingCache`` (restored from row 0's state) with the
single-stream ``Decoder``.
Every timed step is synchronised and reads every row's greedy token back (as a server does).

On CUDA a check runs first: 4 streams at different lengths (fresh, filling sinks, 2k, one that
rebases during the check) decode 256 greedy steps batched+captured, and each alone on a
single-stream cache; it reports whether the greedy tokens are identical and the logit difference.

    python benchmarks/batched_decode.py --out benchmarks/results/batched_decode_gpu            # CUDA
    python benchmarks/batched_decode.py --device cpu --smollm2 --streams 1 8 --decode 16 \\
        --stream-limit 4200 --out benchmarks/results/batched_decode_cpu                         # CPU
    python benchmarks/batched_decode.py --device cpu --tiny --streams 1 8 --recent-size 252 \\
        --stream-limit 600 --decode 8 --out /tmp/bd                                            # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming_llm import StreamingCache, install  # noqa: E402
from streaming_llm.core.decode import Decoder  # noqa: E402
from streaming_llm.core.slots import BatchedDecoder, SlotCache  # noqa: E402
from streaming_llm.eval.benchmark import fast_forward, percentile, sync  # noqa: E402
from streaming_llm.eval.shapes import LLAMA3_8B, SMOLLM2_135M, TINY  # noqa: E402
from streaming_llm.runtime.generation import prefill  # noqa: E402


def summary(times: list[float], streams: int) -> dict:
    mean = sum(times) / len(times)
    return {
        "per_stream_ms_per_token": 1000 * mean, "p50_ms": 1000 * percentile(times, 0.5),
        "p99_ms": 1000 * percentile(times, 0.99), "total_tokens_per_s": streams / mean,
    }  # fmt: skip


@torch.no_grad()
def timed(step, first: torch.Tensor, decode: int, warmup: int = 3) -> list[float]:
    """Run ``step(tokens) -> logits (n, vocab)`` greedily; time each step with the tokens read back."""
    tokens, times = first, []
    for i in range(warmup + decode):
        sync(first.device)
        began = time.perf_counter()
        tokens = step(tokens).argmax(-1)
        tokens.tolist()
        if i >= warmup:
            times.append(time.perf_counter() - began)
    return times


@torch.no_grad()
def single_stream(model, args, state, first: torch.Tensor) -> dict:
    """One stream alone on a plain StreamingCache (restored from the same state as the rows)."""
    cache = StreamingCache.from_state(model.config, *state)
    decoder = Decoder(model, cache)
    times = timed(lambda t: decoder(t.reshape(1))[None], first.reshape(1), args.decode)
    return {"method": "single-stream", "streams": 1, "context": cache.seen_tokens,
            "graph_replays": decoder.replays, **summary(times, 1), "cache_mib": cache.nbytes / 2**20}  # fmt: skip


@torch.no_grad()
def batched(model, args, context: int) -> list[dict]:
    rows = max(args.streams)
    device = model.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cache = SlotCache(model.config, rows, args.start_size, args.recent_size, dtype=model.dtype, device=device)
    cache.assign(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.stream_limit), device=device)
    sync(device)
    began = time.perf_counter()
    logits = prefill(model, cache.row(0), ids, args.chunk)
    sync(device)
    prefill_s = time.perf_counter() - began
    fast_forward(cache.row(0), context - args.stream_limit)
    state = cache.row(0).state()
    out = [single_stream(model, args, state, logits.argmax(-1))]
    print(json.dumps(out[-1]), flush=True)
    for b in range(1, rows):
        cache.assign(b, state=state)
    one_stream = StreamingCache.from_state(model.config, *state).nbytes
    memory = {
        "method": "memory",
        "rows": rows,
        "slot_cache_mib": cache.nbytes / 2**20,
        "one_stream_mib": one_stream / 2**20,
        "exactly_rows_x_one_stream": cache.nbytes == rows * one_stream,
    }
    print(json.dumps(memory), flush=True)
    decoder = BatchedDecoder(model, cache)
    out.append(memory)
    for n in args.streams:
        first = logits.argmax(-1).reshape(1).expand(n).clone()
        step = lambda t, n=n: decoder(dict(enumerate(t.tolist())))[:n]  # noqa: E731
        times = timed(step, first, args.decode)
        out.append({
            "method": "batched", "streams": n, "context": cache.row(0).seen_tokens,
            "graph_replays": decoder.replays, **summary(times, n), "cache_mib": cache.nbytes / 2**20 * n / rows,
            "prefill_tokens_per_s": args.stream_limit / prefill_s,
        })  # fmt: skip
        print(json.dumps(out[-1]), flush=True)
    return out


@torch.no_grad()
def check(model, args, steps: int = 256) -> dict:
    """Batched (captured) greedy decode of 4 streams at different lengths vs each stream alone."""
    lengths = [1, 3, 2000, 2 * (args.start_size + args.recent_size) - steps // 2]
    vocab, device = model.config.vocab_size, model.device
    prompts = [torch.randint(0, vocab, (1, n), device=device) for n in lengths]
    alone_tokens, alone_logits = [], []
    for p in prompts:
        cache = StreamingCache(model.config, args.start_size, args.recent_size)
        token = prefill(model, cache, p, args.chunk).argmax(-1)
        decoder, tokens, logits = Decoder(model, cache), [], []
        for _ in range(steps):
            out = decoder(token)
            logits.append(out.float().clone())
            token = out.argmax(-1)
            tokens.append(int(token))
        alone_tokens.append(tokens)
        alone_logits.append(torch.stack(logits))
    cache = SlotCache(model.config, 4, args.start_size, args.recent_size, dtype=model.dtype, device=device)
    firsts = []
    for b, p in enumerate(prompts):
        cache.assign(b)
        firsts.append(int(prefill(model, cache.row(b), p, args.chunk).argmax(-1)))
    decoder = BatchedDecoder(model, cache)
    tokens, got, shifts = dict(enumerate(firsts)), [[] for _ in prompts], set()
    logits = []
    for _ in range(steps):
        out = decoder(tokens)
        logits.append(out.float().clone())
        tokens = dict(enumerate(out.argmax(-1).tolist()))
        for b in range(len(prompts)):
            got[b].append(tokens[b])
        shifts.add(cache.row(3).main.shift)
    logits = torch.stack(logits, dim=1)
    identical = [got[b] == alone_tokens[b] for b in range(len(prompts))]
    agree = [next((i for i, (x, y) in enumerate(zip(got[b], alone_tokens[b], strict=True)) if x != y), steps)
             for b in range(len(prompts))]  # fmt: skip
    diff = max((logits[b, : agree[b] + 1] - alone_logits[b][: agree[b] + 1]).abs().max().item() for b in range(4))
    return {
        "method": "check", "steps": steps, "stream_lengths": lengths, "rebases_in_row_3": len(shifts) - 1,
        "graph_replays": decoder.replays, "greedy_tokens_identical": identical, "steps_identical": agree,
        "max_abs_logit_diff_until_divergence": diff, "logit_scale": logits.abs().max().item(),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--context", type=int, default=32768 + 4097 * 2, help="tokens per stream before decoding")
    parser.add_argument("--stream-limit", type=int, default=8192, help="tokens streamed for real (row 0)")
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--start-size", type=int, default=4)
    parser.add_argument("--recent-size", type=int, default=4092)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-shaped model (CPU run)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (torch.set_num_threads); 0: default")
    parser.add_argument("--no-check", action="store_true", help="skip the batched-vs-alone greedy check")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bf16 on CUDA")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (a quick float32 check)")
    parser.add_argument("--check-only", action="store_true", help="run the batched-vs-alone check and stop")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.stream_limit <= args.start_size + args.recent_size:
        parser.error("--stream-limit must exceed start-size + recent-size (fast-forward needs a full ring)")

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shape, name = (TINY, "tiny") if args.tiny else (SMOLLM2_135M, "SmolLM2-135M-shaped") if args.smollm2 else (
        LLAMA3_8B, "Llama-3-8B-shaped")  # fmt: skip
    if args.layers:
        shape, name = {**shape, "num_hidden_layers": args.layers}, f"{name}, {args.layers} layers"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).eval()
    install(model)
    began = time.perf_counter()
    rows = []
    if device.type == "cuda" and not args.no_check:
        rows.append(check(model, args))
        print(json.dumps(rows[-1]), flush=True)
    if args.check_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": "python " + " ".join(sys.argv), "model": name, "dtype": str(dtype)}
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return
    rows += batched(model, args, args.context)
    single = next(r for r in rows if r["method"] == "single-stream")
    one = next((r for r in rows if r["method"] == "batched" and r["streams"] == 1), None)
    ratios = {}
    for r in rows:
        if r["method"] == "batched" and one is not None and r["streams"] > 1:
            n = r["streams"]
            ratios[f"total tok/s {n} streams / 1 stream (batched)"] = (
                r["total_tokens_per_s"] / one["total_tokens_per_s"]
            )
            ratios[f"total tok/s {n} streams / single-stream cache"] = (
                r["total_tokens_per_s"] / single["total_tokens_per_s"]
            )
            ratios[f"per-stream ms {n} streams / single-stream cache"] = (
                r["per_stream_ms_per_token"] / single["per_stream_ms_per_token"]
            )
    print(f"\n{'method':>14} | {'streams':>7} | {'ms/token/stream':>15} | {'p99 ms':>7} | {'total tok/s':>11}")
    for r in rows:
        if "p50_ms" in r:
            print(f"{r['method']:>14} | {r['streams']:>7} | {r['per_stream_ms_per_token']:15.2f} | "
                  f"{r['p99_ms']:7.2f} | {r['total_tokens_per_s']:11.1f}")  # fmt: skip
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    import transformers

    meta = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
        "model": f"{name}, random weights", "cache": f"{args.start_size}+{args.recent_size} per stream",
        "wall_s": time.perf_counter() - began, "threads": torch.get_num_threads(),
        "note": f"row 0 streams {args.stream_limit} tokens for real, is fast-forwarded to {args.context} "
        "(fast_forward) and restored into every other row; each timed step reads every row's token back",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2))
    plot(rows, args.out.with_suffix(".png"), meta)
    print(f"saved {args.out.with_suffix('.json')} and .png ({meta['wall_s']:.0f} s)")


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r["streams"], r["total_tokens_per_s"], r["per_stream_ms_per_token"]) for r in rows
                 if r["method"] == "batched")  # fmt: skip
    single = next(r for r in rows if r["method"] == "single-stream")
    streams, total, per = zip(*pts, strict=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(streams, total, marker="o", label="batched (SlotCache)")
    ideal = [single["total_tokens_per_s"] * s for s in streams]
    a.plot(streams, ideal, ls=":", color="gray", label="ideal (n x single)")
    a.axhline(single["total_tokens_per_s"], color="red", ls="--", label="single-stream cache")
    a.set(xscale="log", yscale="log", xlabel="live streams", ylabel="total tokens/s")
    b.plot(streams, per, marker="o", label="batched (SlotCache)")
    b.axhline(single["per_stream_ms_per_token"], color="red", ls="--", label="single-stream cache")
    b.set(xscale="log", xlabel="live streams", ylabel="ms per token, per stream (mean)")
    for ax in (a, b):
        ax.minorticks_off()
        ax.set_xticks(streams, [str(s) for s in streams])
        ax.legend(fontsize=8)
    fig.suptitle(f"Batched decode, each stream past {rows[-1]['context']} tokens: {meta['model']} on "
                 f"{meta['device']}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
