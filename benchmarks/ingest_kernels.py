"""Speed of the banded attention kernel (a chunk crossing the eviction point), path by path.

One attention call (one layer) for a chunk of Q queries whose windows reach back W keys, with P
attention sinks: the old blocked ``_banded`` algorithm of streaming_llm/attention.py (copied here
as the baseline), each path of streaming_llm.core.kernels.banded_attention, and plain causal SDPA of
the Q queries over the same P + W + Q keys (the dense lower bound: what a chunked dense prefill
does at that cache length). Each path's output is checked against the baseline; times are medians.

    python benchmarks/ingest_kernels.py                    # CPU, SmolLM2 shapes -> results/ingest_kernels_cpu.*
    python benchmarks/ingest_kernels.py --preset llama3-8b # CUDA, Llama-3-8B shapes, bf16, W=4092, Q=4096
    python benchmarks/ingest_kernels.py --softcap 50       # Gemma 2 soft-capping (explicit/flex paths only)
    python benchmarks/ingest_kernels.py --windows 252 --chunks 256 --repeat 3   # a quick look

The llama3-8b preset times a single chunk shape to keep the GPU run short (compiling FlexAttention is
expected to dominate it); add shapes with --chunks. A path that fails there is reported and skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from streaming_llm.core.kernels import banded  # noqa: E402

PRESETS = {
    "smollm2": dict(device="cpu", dtype="float32", heads=9, kv_heads=3, dim=64, sinks=4,
                    windows=[252, 1020, 2044], chunks=[256, 512, 1024, 2048],
                    paths=["explicit", "sdpa_concat", "sdpa_lse"]),
    "llama3-8b": dict(device="cuda", dtype="bfloat16", heads=32, kv_heads=8, dim=128, sinks=4,
                      windows=[4092], chunks=[4096],
                      paths=["explicit", "sdpa_concat", "sdpa_lse", "flex", "flex_concat"]),
}  # fmt: skip


def old_banded(
    query, query_back, pin_k, pin_v, pin_index, rest_k, rest_v, rest_first, query_first, window, scaling, softcap=None
):
    """The blocked algorithm of ``streaming_llm.core.attention._banded`` (before issue 14), on this module's inputs.

    Same loop, block sizes, float32 scores, masked_fill and softmax; the pinned keys are sinks here.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, n_pin, n_rest = rest_k.shape[1], pin_k.shape[-2], rest_k.shape[-2]
    groups = heads // kv_heads
    q = query.reshape(batch, kv_heads, groups, q_len, dim)
    q_back = query_back.reshape(batch, kv_heads, groups, q_len, dim)
    pk, pv, rk, rv = pin_k[:, :, None], pin_v[:, :, None], rest_k[:, :, None], rest_v[:, :, None]
    device = query.device
    out = q.new_empty(q.shape)
    block = {"cpu": 128, "cuda": 1024}.get(device.type, 128)
    for i0 in range(0, q_len, block):
        i1 = min(q_len, i0 + block)
        t = query_first + torch.arange(i0, i1, device=device)
        lo = max(0, query_first + i0 - window - rest_first)
        hi = min(n_rest, query_first + i1 - rest_first)
        u = rest_first + torch.arange(lo, hi, device=device)
        scores = torch.cat(
            (q_back[:, :, :, i0:i1] @ pk.transpose(-1, -2), q[:, :, :, i0:i1] @ rk[:, :, :, lo:hi].transpose(-1, -2)),
            dim=-1,
        ).float()
        scores.mul_(scaling)
        if softcap is not None:
            scores = torch.tanh(scores / softcap).mul_(softcap)
        hidden_rest = (u[None, :] < t[:, None] - window) | (u[None, :] > t[:, None])
        scores[..., n_pin:].masked_fill_(hidden_rest, float("-inf"))
        if query_first + i0 < n_pin:
            scores[..., :n_pin].masked_fill_(pin_index.to(device)[None, :] > t[:, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(rest_v.dtype)
        out[:, :, :, i0:i1] = probs[..., :n_pin] @ pv + probs[..., n_pin:] @ rv[:, :, :, lo:hi]
    return out.view(batch, heads, q_len, dim)


def dense_causal(query, pin_k, pin_v, rest_k, rest_v, scaling):
    """Plain SDPA of the queries over all P + R keys, bottom-right causal (a dense chunked prefill)."""
    keys, values = torch.cat((pin_k, rest_k), dim=2), torch.cat((pin_v, rest_v), dim=2)
    q_len, kv_len = query.shape[-2], keys.shape[-2]
    q_idx = torch.arange(kv_len - q_len, kv_len, device=query.device)
    mask = torch.arange(kv_len, device=query.device)[None, :] <= q_idx[:, None]
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)


def make_inputs(cfg: dict, window: int, q_len: int) -> dict:
    """Steady state: the chunk's Q keys plus the W before them; all P sinks visible."""
    g = torch.Generator().manual_seed(0)
    device, dtype = cfg["device"], getattr(torch, cfg["dtype"])
    h, hkv, d, p = cfg["heads"], cfg["kv_heads"], cfg["dim"], cfg["sinks"]
    n_rest, query_first = window + q_len, 100_000

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return dict(
        query=rand(1, h, q_len, d), query_back=rand(1, h, q_len, d), pin_k=rand(1, hkv, p, d), pin_v=rand(1, hkv, p, d),
        pin_index=torch.arange(p, device=device), rest_k=rand(1, hkv, n_rest, d), rest_v=rand(1, hkv, n_rest, d),
        rest_first=query_first - window, query_first=query_first, window=window, scaling=d**-0.5,
    )  # fmt: skip


def timed(fn, repeat: int, device: str) -> tuple[float, torch.Tensor, float]:
    """(median ms over ``repeat`` calls after one warm-up, output, warm-up ms incl. compilation)."""

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    first = 1000 * (time.perf_counter() - start)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), out, first


def run(cfg: dict, repeat: int, softcap: float | None) -> list[dict]:
    rows = []
    for window in cfg["windows"]:
        for q_len in cfg["chunks"]:
            x = make_inputs(cfg, window, q_len)
            x_cap = dict(x, softcap=softcap)
            with torch.no_grad():
                base_ms, base, _ = timed(lambda x=x_cap: old_banded(**x), repeat, cfg["device"])
                dense = (x[n] for n in ("query", "pin_k", "pin_v", "rest_k", "rest_v", "scaling"))
                dense_ms, _, _ = timed(lambda args=tuple(dense): dense_causal(*args), repeat, cfg["device"])
                common = dict(window=window, q_len=q_len, keys=cfg["sinks"] + window + q_len, dense_ms=dense_ms)
                rows.append(dict(common, path="old_banded", ms=base_ms, first_ms=base_ms, max_abs_diff=0.0))
                rows.append(dict(common, path="dense_causal", ms=dense_ms, first_ms=dense_ms, max_abs_diff=None))
                for path in cfg["paths"]:
                    try:
                        ms, out, first = timed(
                            lambda x=x_cap, p=path: banded.banded_attention(**x, path=p), repeat, cfg["device"]
                        )
                    except Exception as exc:  # a path this torch/device cannot run: say so, keep going
                        print(f"  {path}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", flush=True)
                        continue
                    diff = (out.float() - base.float()).abs().max().item()
                    rows.append(dict(common, path=path, ms=ms, first_ms=first, max_abs_diff=diff))
            for r in rows[-(len(cfg["paths"]) + 2) :]:
                if r["window"] == window and r["q_len"] == q_len:
                    print(json.dumps(r), flush=True)
    for r in rows:
        r["tokens_per_s"] = 1000 * r["q_len"] / r["ms"]
        r["vs_dense"] = r["ms"] / r["dense_ms"]
        base = next(
            b for b in rows if b["path"] == "old_banded" and b["window"] == r["window"] and b["q_len"] == r["q_len"]
        )
        r["speedup_vs_old"] = base["ms"] / r["ms"]
    return rows


def table(rows: list[dict]) -> str:
    """Compact table: ms per call and the ratio to dense causal SDPA over the same keys."""
    paths = list(dict.fromkeys(r["path"] for r in rows))
    shapes = list(dict.fromkeys((r["window"], r["q_len"]) for r in rows))
    by = {(r["window"], r["q_len"], r["path"]): r for r in rows}
    lines = ["ms per call (x dense causal SDPA over the same keys); best banded path marked *",
             f"{'W':>5} {'Q':>5} | " + " | ".join(f"{p:>20}" for p in paths)]  # fmt: skip
    for w, q in shapes:
        candidates = [by[w, q, p] for p in paths if (w, q, p) in by and p != "dense_causal"]
        best = min(candidates, key=lambda r: r["ms"])["path"]
        cells = []
        for p in paths:
            r = by.get((w, q, p))
            cells.append(
                f"{'failed':>20}"
                if r is None
                else f"{r['ms']:>9.2f} ({r['vs_dense']:5.2f}x){'*' if p == best else ' '}"
            )
        lines.append(f"{w:>5} {q:>5} | " + " | ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = list(dict.fromkeys(r["window"] for r in rows))
    fig, axes = plt.subplots(1, len(windows), figsize=(4.5 * len(windows), 4), squeeze=False)
    for ax, w in zip(axes[0], windows, strict=True):
        for p in dict.fromkeys(r["path"] for r in rows):
            mine = [r for r in rows if r["window"] == w and r["path"] == p]
            ax.plot([r["q_len"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label=p,
                    linestyle="--" if p in ("old_banded", "dense_causal") else "-")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("chunk length Q (queries)")
        ax.set_ylabel("queries / s (one attention call)")
        ax.set_title(f"window W={w}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="smollm2")
    parser.add_argument("--windows", type=int, nargs="+")
    parser.add_argument("--chunks", type=int, nargs="+")
    parser.add_argument("--paths", nargs="+", choices=banded.PATHS)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--softcap", type=float, help="soft-cap logits (Gemma 2: 50); SDPA paths are left out")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, help="output prefix (default: benchmarks/results/ingest_kernels_<device>)")
    args = parser.parse_args()
    cfg = dict(PRESETS[args.preset])
    for key in ("windows", "chunks", "paths"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit(f"Preset {args.preset!r} needs a CUDA GPU; on CPU use --preset smollm2.")
    torch.set_num_threads(args.threads)
    suffix = "" if args.softcap is None else "_softcap"
    out = args.out or HERE / "results" / f"ingest_kernels_{cfg['device']}{suffix}"
    began = time.time()
    if args.softcap is not None:
        cfg["paths"] = [p for p in cfg["paths"] if not p.startswith("sdpa")]
    rows = run(cfg, args.repeat, args.softcap)
    device_name = (
        torch.cuda.get_device_name() if cfg["device"] == "cuda" else f"{platform.processor() or platform.machine()}"
    )
    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{device_name}, {os.cpu_count()} cores, {platform.platform()}",
        "torch": torch.__version__, "threads": args.threads, "repeat": args.repeat,
        "seconds": round(time.time() - began),
        "shapes": {k: cfg[k] for k in ("dtype", "heads", "kv_heads", "dim", "sinks")}, "batch": 1,
        "softcap": args.softcap,
        "note": "one attention call; ms is the median after one warm-up call (first_ms includes compilation)",
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = table(rows)
    out.with_suffix(".md").write_text(
        f"`{meta['command']}`\n\n{meta['machine']}, torch {meta['torch']}\n\n```\n{text}\n```\n"
    )
    plot(rows, out.with_suffix(".png"), f"banded attention, {args.preset} shapes, {cfg['dtype']}, {cfg['device']}")
    print(f"\n{meta['machine']}, torch {meta['torch']}, {meta['seconds']} s\n{text}")


if __name__ == "__main__":
    main()
