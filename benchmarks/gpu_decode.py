"""GPU decode benchmark: the streaming cache (eager and CUDA-graph captured) against the strongest baselines.

One process, one model (Llama-3-8B-shaped, random bf16 weights: speed does not depend on the
weights), side by side:

* the weight-read floor: weight bytes / measured device copy bandwidth;
* transformers ``StaticCache`` + ``torch.compile(mode="reduce-overhead", fullgraph=True)``;
* transformers ``DynamicCache``, eager;
* ours, eager and captured, after 4k / 32k / 256k / 1M streamed tokens;
* sliding-window recomputation at cache 4096 (one forward over 4096 tokens per token).

Every step is timed on its own (synchronised, the token read back as a text stream does), so p50 and
p99 include frame-rebase steps. Past ``--stream-limit`` tokens the streaming cache is fast-forwarded
(``StreamingCache.fast_forward``: same kept tokens, same slots, same positions as a real
stream), which is stated in the output. A correctness check runs first: captured and eager decode
give identical greedy tokens over 512 steps across frame rebases.

    python benchmarks/gpu_decode.py --out benchmarks/results/gpu_decode   # on a CUDA machine
    python benchmarks/gpu_decode.py --tiny --device cpu --contexts 256 --no-static --out /tmp/x  # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming_llm import StreamingCache, install  # noqa: E402
from streaming_llm.core.stepper import Stepper  # noqa: E402
from streaming_llm.eval.benchmark import measure_decode, percentile, sync  # noqa: E402
from streaming_llm.eval.shapes import LLAMA3_8B, TINY  # noqa: E402
from streaming_llm.runtime.generation import prefill  # noqa: E402


def copy_bandwidth(device: torch.device, nbytes: int = 4 << 30) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus written (median of 10)."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    times = []
    for _ in range(13):
        sync(device)
        began = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - began)
    del x, y
    return 2 * (nbytes // 2) * 2 / percentile(times[3:], 0.5)


@torch.no_grad()
def static_compiled(model, context: int, decode: int, chunk: int) -> dict:
    """transformers' StaticCache + torch.compile(reduce-overhead): prefill eagerly, then time compiled steps."""
    device = model.device
    model.set_attn_implementation("sdpa")
    cache = StaticCache(config=model.config, max_cache_len=context + decode + 16)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    for i in range(0, context, chunk):
        out = model(input_ids=ids[:, i : i + chunk], cache=cache, use_cache=True, logits_to_keep=1)
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    token = out.logits[:, -1:].argmax(-1)
    began = time.perf_counter()
    for _ in range(3):  # compile + warm-up (not timed)
        token = forward(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1).clone()
    sync(device)
    compile_s = time.perf_counter() - began
    times = []
    for _ in range(decode):
        sync(device)
        began = time.perf_counter()
        token = forward(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1).clone()
        int(token)
        times.append(time.perf_counter() - began)
    model.set_attn_implementation("streaming_llm")
    return {"method": "static+compile", "context": context, "compile_s": compile_s, **summary(times)}


def summary(times: list[float]) -> dict:
    mean = sum(times) / len(times)
    return {
        "ms_per_token": 1000 * mean,
        "p50_ms": 1000 * percentile(times, 0.5),
        "p99_ms": 1000 * percentile(times, 0.99),
    }


@torch.no_grad()
def recompute_cost(model, window: int, repeats: int = 5) -> dict:
    """Sliding-window recomputation: each token re-encodes the last ``window`` tokens (one dense forward)."""
    ids = torch.randint(0, model.config.vocab_size, (1, window), device=model.device)
    times = []
    for _ in range(repeats + 1):
        sync(model.device)
        began = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        sync(model.device)
        times.append(time.perf_counter() - began)
    return {"method": "recompute", "context": window, **summary(times[1:])}


@torch.no_grad()
def captured_equals_eager(model, steps: int, start: int, recent: int) -> dict:
    """Captured vs eager decode over ``steps`` steps from the same state, across frame rebases.

    Teacher-forced (both fed the eager run's greedy tokens), so one near-tie flipped by rounding cannot
    make every later step differ: reports the largest logit difference per step, and how often the two
    greedy choices agree. Also runs both free (each on its own greedy tokens) and reports where they
    first part.
    """
    ids = torch.randint(0, model.config.vocab_size, (1, start + recent + 64), device=model.device)
    result = {"steps": steps, "cache": f"{start}+{recent}"}
    forced = None
    for mode in ("free", "forced"):
        runs = []
        for graphs in (False, True):
            cache = StreamingCache(model.config, start, recent)
            logits = prefill(model, cache, ids, 256)
            decoder = Stepper(model, cache, cuda_graphs=graphs)
            token, tokens, outs, shifts = logits.argmax(-1), [], [], set()
            for i in range(steps):
                out = decoder.decode({0: int(token if forced is None or i == 0 else forced[i])})[0]
                outs.append(out.float().clone())
                token = out.argmax(-1)
                tokens.append(int(token))
                shifts.add(cache.main.rows[0].shift)
            runs.append((tokens, torch.stack(outs), len(shifts) - 1, decoder.replays))
        (eager_tokens, eager_logits, rebases, _), (graph_tokens, graph_logits, _, replays) = runs
        if mode == "free":
            parted = next((i for i, (a, b) in enumerate(zip(eager_tokens, graph_tokens, strict=True)) if a != b), None)
            result.update(free_tokens_identical=parted is None, free_first_difference=parted, rebases=rebases,
                          graph_replays=replays)  # fmt: skip
            forced = [None, *eager_tokens[:-1]]  # the eager run's inputs, step by step
        else:
            diff = (eager_logits - graph_logits).abs().amax(-1)
            result.update(
                forced_max_abs_logit_diff=diff.max().item(), forced_median_abs_logit_diff=diff.median().item(),
                logit_scale=eager_logits.abs().max().item(),
                forced_greedy_agreement=(eager_logits.argmax(-1) == graph_logits.argmax(-1)).float().mean().item(),
            )  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="*", default=[4096, 32768, 262144, 1048576])
    parser.add_argument("--hf-contexts", type=int, nargs="*", default=[4096, 32768])
    parser.add_argument("--no-recompute", action="store_true")
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--start-size", type=int, default=4)
    parser.add_argument("--recent-size", type=int, default=4092)
    parser.add_argument("--stream-limit", type=int, default=32768, help="stream for real at most this many tokens")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument("--no-static", action="store_true", help="skip StaticCache + torch.compile")
    parser.add_argument("--no-check", action="store_true", help="skip the captured-vs-eager check")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    install(model)
    rows = []

    def emit(row: dict) -> None:
        row.pop("tokens", None)
        rows.append(row)
        print(json.dumps(row), flush=True)

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    floor = {"method": "floor", "weights_gb": weights / 1e9}
    if device.type == "cuda":
        bandwidth = copy_bandwidth(device)
        floor.update(bandwidth_tb_s=bandwidth / 1e12, ms_per_token=1000 * weights / bandwidth)
    emit(floor)
    if device.type == "cuda" and not args.no_check:
        emit({"method": "check", "dtype": "bfloat16", **captured_equals_eager(model, 512, args.start_size, 508)})
        # The same in float32 on a 4-layer model of the same shape: rounding differences vanish, a bug would not.
        with torch.device(device):
            small = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 4})).float().eval()
        install(small)
        emit({"method": "check", "dtype": "float32", **captured_equals_eager(small, 512, args.start_size, 508)})
        del small
    streaming = lambda: StreamingCache(model.config, args.start_size, args.recent_size)  # noqa: E731
    for context in args.contexts:
        for graphs in (False, True):
            name = "ours-captured" if graphs else "ours-eager"
            run = measure_decode(
                model, streaming, context, args.decode, args.chunk, cuda_graphs=graphs,
                stream_for_real=args.stream_limit,
            )  # fmt: skip
            emit({"method": name, **run})
    for context in args.hf_contexts:
        model.set_attn_implementation("sdpa")  # transformers' own attention: the strongest eager baseline
        run = measure_decode(model, lambda: DynamicCache(config=model.config), context, args.decode, args.chunk)
        model.set_attn_implementation("streaming_llm")
        emit({"method": "dynamic-eager", **run})
        if not args.no_static:
            emit(static_compiled(model, context, args.decode, args.chunk))
    if not args.no_recompute:
        emit(recompute_cost(model, args.start_size + args.recent_size))

    by = {(r["method"], r.get("context")): r for r in rows}
    print(f"\n{'method':>16} | {'context':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'cache MiB':>9}")
    for r in rows:
        if "p50_ms" in r:
            print(f"{r['method']:>16} | {r['context']:>8} | {r['p50_ms']:7.2f} | {r['p99_ms']:7.2f} | "
                  f"{r.get('cache_mib') or 0:9.0f}")  # fmt: skip
    ratios = {}
    ours4k = by.get(("ours-captured", 4096))
    if ours4k:
        for (method, context), r in by.items():
            if method in ("static+compile", "dynamic-eager", "recompute") and "p50_ms" in r:
                ratios[f"{method}@{context} / ours-captured@4096"] = r["p50_ms"] / ours4k["p50_ms"]
        if "ms_per_token" in floor:
            ratios["ours-captured@4096 / floor"] = ours4k["p50_ms"] / floor["ms_per_token"]
        longest = max(c for m, c in by if m == "ours-captured")  # noqa: C401
        ratios[f"ours-captured@{longest} / ours-captured@4096"] = (
            by[("ours-captured", longest)]["p50_ms"] / ours4k["p50_ms"]
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    import transformers

    meta = {
        "command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else platform.processor(), "torch": torch.__version__,
        "transformers": transformers.__version__, "dtype": str(dtype),
        "model": "tiny" if args.tiny else "Llama-3-8B-shaped, random weights",
        "note": f"streaming contexts past {args.stream_limit} tokens are fast-forwarded (see fast_forward)",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2))
    plot(rows, args.out.with_suffix(".png"), meta)


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in ("ours-captured", "ours-eager", "dynamic-eager", "static+compile"):
        pts = sorted((r["context"], r["p50_ms"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    for r in rows:
        if r["method"] == "floor" and "ms_per_token" in r:
            ax.axhline(r["ms_per_token"], color="gray", ls="--", label="weight-read floor")
        if r["method"] == "recompute":
            ax.axhline(r["p50_ms"], color="red", ls=":", label=f"recompute @{r['context']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens streamed before decoding")
    ax.set_ylabel("ms per token (p50)")
    ax.set_title(f"Decode, batch 1: {meta['model']} on {meta['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
