"""Speed of decode attention with per-row bounds (``streaming_llm.core.kernels.decode_attention``).

One batched decode step of one layer: ``n`` rows, each with one query token (Llama-3-8B shapes: 32 query
heads, 8 kv heads, head_dim 128, bf16) over its own slot range ``[lo, hi)`` of a ``(n, 8, S, 128)`` buffer,
``S = 256 + W`` (room for a pinned prefix of up to 256 tokens, then a window of ``W``; ``W`` = 4097 and 32768).

Ranges ("modes"):
- ``full``: every row sees the whole buffer (a 256-token prefix, a full window): ``[0, S)``;
- ``ragged``: row ``b`` has a pinned prefix ``P_b`` in [4, 256] right-aligned against the window and a
  window filled to ``F_b`` in [W/4, W]: ``[256 - P_b, 256 + F_b)``, random per row (seeded).

Variants, each captured in one CUDA graph (many calls per replay, cycling through enough layer buffers that
the K/V read per replay is far above the L2 cache) and timed with CUDA events:
- ``triton``: the triton path (default :class:`TritonConfig`, or each config of the tuning grid);
- ``sdpa_mask``: today's path, one SDPA with the boolean ``(n, 1, 1, S)`` mask built from lo/hi (path "sdpa");
- ``sdpa_dense``: the best case, SDPA without a mask over a uniform slice ``[:, :, :L]`` of every row,
  ``L`` = the mean range length (the same bytes, no raggedness; for ``full``, ``L = S``).

Achieved bandwidth = bytes of K/V inside the ranges / time, against the device copy bandwidth (bytes read +
written by ``copy_`` of 1 GiB). The triton output is checked against the sdpa path on every case.

    python benchmarks/decode_attention.py --tune --out benchmarks/results/decode_attention   # H200, < 2 min
    python benchmarks/decode_attention.py --smoke --out /tmp/da                             # CPU smoke test

``--tune`` also times a grid of block sizes, warps, pipeline stages and split targets on a few cases and
prints the best; the defaults in ``streaming_llm/core/kernels/decode.py`` come from that output.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming_llm.core.kernels import decode  # noqa: E402
from streaming_llm.core.kernels.decode import DEFAULT_CONFIG, TritonConfig, decode_attention  # noqa: E402

HEADS, KV_HEADS, DIM, PREFIX = 32, 8, 128, 256
TUNE_GRID = dict(block_n=[32, 64, 128], num_warps=[4, 8], num_stages=[2, 3], programs_per_sm=[1, 2, 4])
TUNE_CASES = [(1, 4097, "full"), (8, 4097, "ragged"), (32, 4097, "ragged"), (64, 4097, "full"), (8, 32768, "ragged")]
L2_FLOOR = 256 << 20  # bytes of K/V per graph replay at least: well beyond the H200's 60 MB L2
MIN_BYTES = L2_FLOOR  # 0 in the smoke test (one layer buffer)


def ranges(n: int, window: int, mode: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` int32 of one mode (see the module docstring), on the CPU."""
    slots = PREFIX + window
    if mode == "full":
        return torch.zeros(n, dtype=torch.int32), torch.full((n,), slots, dtype=torch.int32)
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(4, PREFIX + 1, (n,), generator=g)
    fill = torch.randint(window // 4, window + 1, (n,), generator=g)
    return (PREFIX - prefix).int(), (PREFIX + fill).int()


class Case:
    """Buffers of one (n, window, mode): ``layers`` independent K/V buffers, queries, bounds on the device."""

    def __init__(self, n: int, window: int, mode: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 min_bytes: int = L2_FLOOR):  # fmt: skip
        self.n, self.window, self.mode, self.slots = n, window, mode, PREFIX + window
        lo, hi = ranges(n, window, mode, seed)
        self.lengths = (hi - lo).tolist()
        self.bytes = sum(self.lengths) * KV_HEADS * 2 * DIM * dtype.itemsize  # K and V in range
        buffer_bytes = n * KV_HEADS * self.slots * 2 * DIM * dtype.itemsize
        self.layers = max(1, min(32, math.ceil(min_bytes / buffer_bytes)))
        g = torch.Generator(device=device).manual_seed(seed)

        def rand(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=dtype)

        self.keys = [rand(n, KV_HEADS, self.slots, DIM) for _ in range(self.layers)]
        self.values = [rand(n, KV_HEADS, self.slots, DIM) for _ in range(self.layers)]
        self.query = [rand(n, 1, HEADS, DIM).transpose(1, 2) for _ in range(self.layers)]
        self.out = [torch.empty(n, HEADS, 1, DIM, device=device, dtype=dtype) for _ in range(self.layers)]
        self.lo, self.hi = lo.to(device), hi.to(device)
        self.uniform = max(1, round(sum(self.lengths) / n))  # sdpa_dense slice length
        self.scaling = DIM**-0.5

    def label(self) -> str:
        return f"n={self.n} W={self.window} {self.mode}"

    def calls(self, variant: str, config: TritonConfig | None = None) -> list[Callable[[], object]]:
        """One callable per layer buffer for a variant."""
        fns = []
        for q, k, v, o in zip(self.query, self.keys, self.values, self.out, strict=True):
            if variant == "triton":
                cfg = config or DEFAULT_CONFIG
                fns.append(lambda q=q, k=k, v=v, o=o, c=cfg: decode_attention(
                    q, k, v, self.lo, self.hi, self.scaling, path="triton", out=o, config=c))  # fmt: skip
            elif variant == "sdpa_mask":
                fns.append(lambda q=q, k=k, v=v: decode_attention(q, k, v, self.lo, self.hi, self.scaling, path="sdpa"))
            else:
                length = self.uniform
                folded = q.reshape(self.n, KV_HEADS, HEADS // KV_HEADS, DIM)
                fns.append(lambda f=folded, k=k, v=v, L=length: F.scaled_dot_product_attention(
                    f, k[:, :, :L], v[:, :, :L], scale=self.scaling))  # fmt: skip
        return fns


def time_calls(fns: list[Callable[[], object]], est_s: float, device: torch.device, replays: int = 5) -> float:
    """Seconds per call: CUDA graph of ``reps`` rounds over ``fns``, median of ``replays`` replays (CUDA events).
    On the CPU (smoke test): plain calls, median of 3."""
    if device.type != "cuda":
        for f in fns:
            f()
        times = []
        for _ in range(3):
            began = time.perf_counter()
            for f in fns:
                f()
            times.append((time.perf_counter() - began) / len(fns))
        return statistics.median(times)
    reps = max(1, min(400 // len(fns), math.ceil(3e-3 / (est_s * len(fns)))))  # ~3 ms of work per replay
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up (compiles) outside the capture, as graph capture requires
        for f in fns:
            f()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for f in fns:
                f()
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / (reps * len(fns)))
    del graph
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of ``y.copy_(x)`` for 1 GiB, counting bytes read plus written (median of 10, CUDA events)."""
    if device.type != "cuda":
        nbytes = 64 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy = functools.partial(dst.copy_, src)
    seconds = time_calls([copy], 2 * nbytes / 3e12, device, replays=10) if device.type == "cuda" else _cpu_time(copy)
    return 2 * nbytes / seconds


def _cpu_time(fn: Callable[[], object]) -> float:
    fn()
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def check(case: Case) -> float:
    """Max |triton - sdpa| over layer 0 (both bf16 outputs; the tests compare against float64)."""
    a = decode_attention(case.query[0], case.keys[0], case.values[0], case.lo, case.hi, case.scaling, path="triton")
    b = decode_attention(case.query[0], case.keys[0], case.values[0], case.lo, case.hi, case.scaling, path="sdpa")
    return (a.float() - b.float()).abs().max().item()


def run_main(cases: list[tuple[int, int, str]], device, dtype, bandwidth: float, has_triton: bool) -> list[dict]:
    """Every variant on every case. A triton failure (e.g. a compile error on this Triton) is printed and recorded,
    and the sdpa variants still run."""
    rows = []
    for n, window, mode in cases:
        case = Case(n, window, mode, device, dtype, min_bytes=MIN_BYTES)
        est = case.bytes / 3e12
        row = dict(n=n, window=window, slots=case.slots, mode=mode, layers=case.layers, kv_bytes=case.bytes,
                   mean_len=sum(case.lengths) / n, uniform_len=case.uniform)  # fmt: skip
        variants = (["triton"] if has_triton else []) + ["sdpa_mask", "sdpa_dense"]
        for variant in list(variants):
            try:
                seconds = time_calls(case.calls(variant), est, device)
            except Exception as exc:
                row[f"{variant}_error"] = f"{type(exc).__name__}: {exc}"
                print(f"{case.label()}: {variant} failed: {row[f'{variant}_error'][:2000]}", flush=True)
                variants.remove(variant)
                if variant == "triton":
                    has_triton = False
                continue
            row[f"{variant}_us"] = 1e6 * seconds
            row[f"{variant}_gb_s"] = case.bytes / seconds / 1e9
            row[f"{variant}_of_copy"] = case.bytes / seconds / bandwidth
        if "triton" in variants:
            row["splits"] = decode.choose_splits(n, KV_HEADS, case.slots, device, DEFAULT_CONFIG)
            row["max_abs_diff_vs_sdpa"] = check(case)
            row["triton_vs_sdpa_mask"] = row["sdpa_mask_us"] / row["triton_us"]
            row["triton_vs_sdpa_dense"] = row["sdpa_dense_us"] / row["triton_us"]
        rows.append(row)
        line = f"{case.label():>22} | " + " | ".join(
            f"{v} {row[f'{v}_us']:8.1f} us {row[f'{v}_gb_s']:6.0f} GB/s" for v in variants
        )
        if "triton" in variants:
            line += f" | x{row['triton_vs_sdpa_mask']:.2f} vs mask, diff {row['max_abs_diff_vs_sdpa']:.1e}"
        print(line, flush=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_tune(cases: list[tuple[int, int, str]], device, dtype) -> list[dict]:
    """Every config of :data:`TUNE_GRID` on each tuning case; us per call."""
    results = []
    configs = [
        TritonConfig(**dict(zip(TUNE_GRID, values, strict=True))) for values in itertools.product(*TUNE_GRID.values())
    ]
    began = time.perf_counter()
    for n, window, mode in cases:
        case = Case(n, window, mode, device, dtype, min_bytes=MIN_BYTES)
        for cfg in configs:
            try:
                seconds = time_calls(case.calls("triton", cfg), case.bytes / 3e12, device, replays=3)
            except Exception as exc:  # e.g. a config that does not fit in shared memory: say so, keep going
                print(f"  {case.label()} {cfg}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
                continue
            results.append(dict(n=n, window=window, mode=mode, block_n=cfg.block_n, num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages, programs_per_sm=cfg.programs_per_sm,
                                splits=decode.choose_splits(n, KV_HEADS, case.slots, device, cfg),
                                us=1e6 * seconds, gb_s=case.bytes / seconds / 1e9))  # fmt: skip
        print(f"tuned {case.label()} ({time.perf_counter() - began:.0f} s so far)", flush=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def summarise_tune(results: list[dict]) -> dict:
    """Best config per case and overall (geometric mean of time relative to each case's best)."""
    keys = ("block_n", "num_warps", "num_stages", "programs_per_sm")
    by_case: dict[tuple, list[dict]] = {}
    for r in results:
        by_case.setdefault((r["n"], r["window"], r["mode"]), []).append(r)
    best = {c: min(rs, key=lambda r: r["us"])["us"] for c, rs in by_case.items()}
    score: dict[tuple, list[float]] = {}
    for r in results:
        score.setdefault(tuple(r[k] for k in keys), []).append(r["us"] / best[(r["n"], r["window"], r["mode"])])
    complete = {cfg: s for cfg, s in score.items() if len(s) == len(by_case)}
    ranked = sorted(complete.items(), key=lambda kv: math.exp(sum(map(math.log, kv[1])) / len(kv[1])))
    print("\nTuning: configs ranked by geometric-mean time / best time of each case")
    print(f"{'block_n':>7} {'warps':>5} {'stages':>6} {'prog/SM':>7} | geo-mean | " + " | ".join(
        f"n={c[0]} W={c[1]} {c[2]}" for c in by_case))  # fmt: skip
    for cfg, s in ranked[:12]:
        geo = math.exp(sum(map(math.log, s)) / len(s))
        print(f"{cfg[0]:>7} {cfg[1]:>5} {cfg[2]:>6} {cfg[3]:>7} | {geo:8.3f} | " + " | ".join(f"{x:14.3f}" for x in s))
    per_case = {f"n={c[0]} W={c[1]} {c[2]}": min(rs, key=lambda r: r["us"]) for c, rs in by_case.items()}
    for label, r in per_case.items():
        print(
            f"best for {label}: "
            + ", ".join(f"{k}={r[k]}" for k in (*keys, "splits"))
            + f": {r['us']:.1f} us, {r['gb_s']:.0f} GB/s"
        )
    overall = dict(zip(keys, ranked[0][0], strict=True)) if ranked else None
    return dict(
        overall_best=overall, per_case_best=per_case, ranked=[dict(zip(keys, c, strict=True), rel=s) for c, s in ranked]
    )


def markdown(rows: list[dict], bandwidth: float, device: str) -> str:
    """The main table: us per call, GB/s of K/V in range (share of the copy bandwidth), speedups of triton."""
    lines = [
        f"Decode attention, one layer, {device}, Hq {HEADS} / Hkv {KV_HEADS} / D {DIM}, bf16; copy bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s. us per call (GB/s of K/V in range, share of copy bandwidth).",
        "",
        "| rows | W | ranges | mean keys | triton | sdpa + bool mask (today) | sdpa dense slice (best case) "
        "| triton vs mask | triton vs dense |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(r: dict, v: str) -> str:
        if f"{v}_us" not in r:
            return "-"
        return f"{r[f'{v}_us']:.1f} ({r[f'{v}_gb_s']:.0f}, {100 * r[f'{v}_of_copy']:.0f}%)"

    for r in rows:
        ratios = f"{r['triton_vs_sdpa_mask']:.2f}x | {r['triton_vs_sdpa_dense']:.2f}x" if "triton_us" in r else "- | -"
        lines.append(
            f"| {r['n']} | {r['window']} | {r['mode']} | {r['mean_len']:.0f} | {cell(r, 'triton')} "
            f"| {cell(r, 'sdpa_mask')} | {cell(r, 'sdpa_dense')} | {ratios} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], bandwidth: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["window"], r["mode"]) for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.8), squeeze=False, sharey=True)
    for ax, (window, mode) in zip(axes[0], shapes, strict=True):
        mine = [r for r in rows if r["window"] == window and r["mode"] == mode]
        for variant, style in (("triton", "o-"), ("sdpa_mask", "s--"), ("sdpa_dense", "^:")):
            points = [(r["n"], r[f"{variant}_gb_s"]) for r in mine if f"{variant}_gb_s" in r]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=variant)
        ax.axhline(bandwidth / 1e9, color="grey", lw=0.8, label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows")
        ax.set_title(f"W={window}, {mode}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("GB/s of K/V in range")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_attention"))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--windows", type=int, nargs="+", default=[4097, 32768])
    parser.add_argument("--modes", nargs="+", default=["full", "ragged"])
    parser.add_argument("--tune", action="store_true", help="also time the tuning grid on a few cases")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, no graphs (checks the script)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16
    tune_cases = TUNE_CASES
    if args.smoke:
        args.rows, args.windows = [1, 2], [64]
        tune_cases = [(2, 64, "ragged")]
        global TUNE_GRID, MIN_BYTES
        MIN_BYTES = 0
        TUNE_GRID = dict(block_n=[16, 64], num_warps=[4], num_stages=[2], programs_per_sm=[1, 4])
    has_triton = decode.triton_available() and (device.type == "cuda" or decode._interpreting())
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}: "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; default {DEFAULT_CONFIG}", flush=True)  # fmt: skip
    cases = list(itertools.product(args.rows, args.windows, args.modes))
    rows = run_main(cases, device, dtype, bandwidth, has_triton)
    tuning = None
    if args.tune and any("triton_us" in r for r in rows):
        raw = run_tune(tune_cases, device, dtype)
        tuning = dict(grid=TUNE_GRID, results=raw, **summarise_tune(raw))
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = dict(
        command="python " + " ".join(sys.argv),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        sm_count=decode.sm_count(device),
        torch=torch.__version__,
        triton=triton_version,
        python=platform.python_version(),
        dtype=str(dtype),
        shapes=dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=DIM, prefix_room=PREFIX),
        copy_bandwidth_gb_s=bandwidth / 1e9,
        default_config=DEFAULT_CONFIG.__dict__,
        rows=rows,
        tuning=tuning,
        seconds=time.perf_counter() - started,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    table = markdown(rows, bandwidth, result["device"])
    args.out.with_suffix(".md").write_text(table)
    print("\n" + table)
    plot(rows, bandwidth, args.out.with_suffix(".png"),
         f"decode attention, {result['device']}, Hq {HEADS} / Hkv {KV_HEADS} / D {DIM}, bf16")  # fmt: skip
    print(f"wrote {args.out.with_suffix('.json')}, .md and .png ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
