"""``streaming-llm eval``: perplexity by method, sweeps, recall vs distance, endless-stream stability.

Every subcommand writes JSON (with the command, machine and time taken), CSV and PNG files to
``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

from .common import add_kv_dtype_flag, add_model_flags, load


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate quality: perplexity by method, sweeps, recall, stability",
        description="Evaluation on a long text (default: the complete works of Shakespeare shipped with the "
        "package, public domain). Writes JSON, CSV and PNG to --out.",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="eval_command", required=True, metavar="EVAL")

    ppl = commands.add_parser("ppl", help="dense / window / recompute / streaming perplexity on the same tokens")
    _common(ppl, tokens=65536)
    add_kv_dtype_flag(ppl)
    ppl.add_argument("--methods", default="dense,window,recompute,streaming", help="comma-separated methods")
    ppl.add_argument("--stride", type=int, default=64, help="recompute scores every N-th token only")
    ppl.add_argument("--slice", type=int, default=1024, help="tokens per point of the running-perplexity curve")
    ppl.add_argument("--recompute-batch", type=int, default=8, help="windows per forward for recompute")
    ppl.set_defaults(run=run_ppl)

    sweep = commands.add_parser("sweep", help="sinks 0/1/2/4/8 at a fixed total; perplexity vs cache size")
    _common(sweep, tokens=65536)
    sweep.add_argument("--sinks", default="0,1,2,4,8")
    sweep.add_argument("--total", type=int, default=1024, help="total cache for the sink sweep")
    sweep.add_argument("--recents", default="256,512,1024,2048,4096")
    sweep.set_defaults(run=run_sweep)

    recall = commands.add_parser(
        "recall", help="accuracy of recalling planted facts vs their distance, per memory method (resumable)",
        description="Plant facts (families: single needle; multikey with distractors; multivalue) in filler text, ask "
        "for them after D tokens. Trials run as the rows of one batched cache (hybrid:W runs one session per trial). "
        "Cells are appended to JSONL files in --out; a run resumes where it stopped.",
    )  # fmt: skip
    _common(recall, tokens=0)
    recall.add_argument("--distances", default="64,256,1024,4096,16384,65536", help="tokens between fact and question")
    recall.add_argument("--families", default="single,multikey,multivalue", help="fact families (eval/recall_batch.py)")
    recall.add_argument(
        "--methods",
        default="dense,streaming:256,streaming:1024,retrieval:1024,retrieval-sent:1024,retrieval-dense:1024,"
        "retrieval-fused:1024,hybrid:256",
        help="comma-separated: dense, streaming:W, retrieval:W, retrieval-sent:W, retrieval-dense:W, "
        "retrieval-fused:W, hybrid:W (W = window tokens)",
    )  # fmt: skip
    recall.add_argument("--trials", type=int, default=50, help="trials per family (single rotates code, date, name)")
    recall.add_argument("--seed", type=int, default=0)
    recall.add_argument(
        "--max-seconds", type=float, default=None,
        help="start nothing that would end after this time; stop a running stream after its current distance",
    )  # fmt: skip
    recall.add_argument(
        "--shard", default="0/1", metavar="K/N",
        help="run only units (or hybrid trials) u with u %% N == K (parallel workers; each appends to its own JSONL)",
    )  # fmt: skip
    recall.add_argument("--report-only", action="store_true", help="run nothing; tabulate the JSONL files in --out")
    recall.add_argument("--batch-rows", type=int, default=64, help="most trials streamed together as rows of a batch")
    recall.add_argument("--chunk-tokens", type=int, default=32768, help="tokens per batched forward (rows x chunk)")
    recall.add_argument("--max-slots", type=int, default=131072, help="most rows x window per batch (memory bound)")
    recall.add_argument(
        "--tf32", action="store_true",
        help="let float32 matmuls use TF32 tensor cores on CUDA (faster; recorded in the results' meta)",
    )  # fmt: skip
    recall.add_argument("--dense-layer", type=int, default=None, help="retrieval-dense/fused: layer (default: middle)")
    recall.add_argument("--hybrid-trials", type=int, default=None, help="hybrid: trials (default: --trials)")
    recall.add_argument("--hybrid-max-distance", type=int, default=1024, help="hybrid: longest distance (it is slow)")
    recall.add_argument("--update-every", type=int, default=256, help="hybrid: evicted tokens per summary update")
    recall.add_argument("--summary-tokens", type=int, default=128, help="hybrid: largest summary (tokens)")
    recall.add_argument("--budget", type=int, default=256, help="retrieval: tokens pinned per turn")
    recall.add_argument("--passage-tokens", type=int, default=64, help="retrieval: tokens per indexed passage")
    recall.set_defaults(run=run_recall)

    stability = commands.add_parser("stability", help="perplexity and memory over the whole text, per window")
    _common(stability, tokens=0)
    stability.add_argument("--window", type=int, default=65536, help="tokens per reported slice")
    stability.add_argument("--state-dir", type=Path, default=None, help="save progress here after each slice")
    stability.add_argument("--resume", action="store_true", help="continue from --state-dir")
    stability.set_defaults(run=run_stability)

    demo = commands.add_parser(
        "demo", help="how well long sampled generations read: recipes x seeds, streaming vs full cache",
        description="Generate --tokens tokens from the demo prompt for each sampling recipe and seed, with the "
        "demo's streaming window and with a cache that never evicts; score distinct word bigrams, longest word "
        "and the model's own perplexity by token range. Writes demo_quality.json/.csv/.md to --out.",
    )  # fmt: skip
    demo.add_argument("--recipes", default="old,llama,dry", help="comma-separated names from eval/demo_quality.py")
    demo.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (one batch row each)")
    demo.add_argument("--tokens", type=int, default=1200, help="tokens generated per seed")
    demo.add_argument("--span", type=int, default=300, help="tokens per scored range")
    demo.add_argument(
        "--caches", default="streaming,full",
        help="streaming: the demo's window (--start-size + --recent-size); full: a cache that never evicts",
    )  # fmt: skip
    demo.add_argument("--out", type=Path, default=Path("results/demo-quality"), help="output folder")
    add_model_flags(demo, recent_size=256)
    demo.set_defaults(run=run_demo)


def _common(parser: argparse.ArgumentParser, tokens: int) -> None:
    parser.add_argument(
        "--text", type=Path, default=None, metavar="FILE",
        help="UTF-8 text file, or a .gz of one (default: the packaged complete works of Shakespeare)",
    )  # fmt: skip
    parser.add_argument("--offset-chars", type=int, default=0, help="start this many characters into the text")
    parser.add_argument("--tokens", type=int, default=tokens, help="tokens to evaluate (0 = all)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per forward when streaming")
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder")
    parser.add_argument("--no-progress", action="store_true")
    add_model_flags(parser, recent_size=1020)


def _text(args: argparse.Namespace) -> str:
    from ..data import read_text

    return read_text(args.text)[args.offset_chars :]


def _ids(args: argparse.Namespace, tokenizer):
    import torch

    text = _text(args)
    if args.tokens:
        text = text[: args.tokens * 8]  # enough characters for the tokens asked for
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if args.tokens and len(ids) < args.tokens:
        raise ValueError(f"The text has only {len(ids)} tokens after --offset-chars; asked for {args.tokens}.")
    return torch.tensor(ids[: args.tokens] if args.tokens else ids)


def _meta(args: argparse.Namespace, model, seconds: float, tokens: int) -> dict:
    import torch
    import transformers

    device = str(model.device)
    if model.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(model.device)})"
    return {
        "command": "streaming-llm " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {device}",
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(model.dtype),
        "model": getattr(model.config, "_name_or_path", "") or "embedded SmolLM2-135M-Instruct",
        "text": str(args.text or "packaged shakespeare.txt.gz") if hasattr(args, "text") else None,
        "offset_chars": getattr(args, "offset_chars", 0), "tokens": tokens,
        "matmul_precision": torch.get_float32_matmul_precision(), "seconds": round(seconds, 1),
    }  # fmt: skip


def work_tokens(command: str, args: argparse.Namespace, n: int, max_positions: int | None = None) -> int:
    """Tokens ``eval COMMAND`` pushes through the model for ``n`` text tokens (the unit of the up-front estimate).

    ``dense``, ``window``, ``streaming`` and ``stability`` feed each token once; ``recompute`` re-runs a window
    per scored position (``--stride``); ``sweep`` streams the text once per sink count and twice per cache size
    the model can hold (``max_positions``).
    """
    if command == "ppl":
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        total = sum(n for m in methods if m != "recompute")
        if "recompute" in methods:
            window, positions = args.start_size + args.recent_size, list(range(0, n - 1, args.stride))
            for b in range(0, len(positions), args.recompute_batch):
                batch = positions[b : b + args.recompute_batch]
                total += len(batch) * min(window, batch[-1] + 1)
        return total
    if command == "sweep":
        recents = [int(r) for r in args.recents.split(",") if args.start_size + int(r) <= (max_positions or 1 << 30)]
        return n * (len(args.sinks.split(",")) + 2 * len(recents))
    return n


def announce(args: argparse.Namespace, model, tokens: int) -> None:
    """Print, before a long run, about how long it will take here: ``tokens`` at a rate measured just now."""
    import torch

    from ..eval.perplexity import streaming_nll

    chunk = max(2, min(args.chunk_size, 512))
    ids = torch.randint(0, model.config.vocab_size, (chunk,), generator=torch.Generator().manual_seed(0))
    streaming_nll(model, ids, args.start_size, args.recent_size, chunk)  # warm-up, not measured
    began = time.perf_counter()
    streaming_nll(model, ids, args.start_size, args.recent_size, chunk)
    rate = chunk / max(time.perf_counter() - began, 1e-9)
    print(f"[eval {args.eval_command}: about {tokens:,} tokens through the model; about {_duration(tokens / rate)} "
          f"at {rate:,.0f} tok/s on {model.device} (measured just now on a {chunk}-token chunk)]",
          file=sys.stderr, flush=True)  # fmt: skip


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _write(out: Path, name: str, payload: dict, table: list[dict] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    if table:
        with open(out / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in table for k in row)))
            writer.writeheader()
            writer.writerows(table)
    print(f"wrote {out / name}.*", file=sys.stderr)


def run_ppl(args: argparse.Namespace) -> int:
    from ..eval import plots
    from ..eval.perplexity import nll_by_method, paired_ratio, perplexity, windowed_perplexity

    model, tokenizer = load(args)
    ids = _ids(args, tokenizer)
    if not args.no_progress:
        announce(args, model, work_tokens("ppl", args, len(ids)))
    began = time.time()
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    nll = nll_by_method(
        model, ids, methods, args.start_size, args.recent_size, args.stride, args.chunk_size, not args.no_progress,
        args.recompute_batch, kv_dtype=args.kv_dtype,
    )  # fmt: skip
    scored = ~nll["recompute"].isnan() if "recompute" in nll else None
    summary = {}
    for method, values in nll.items():
        summary[method] = {"ppl": perplexity(values)}
        if scored is not None:
            summary[method]["ppl_on_recompute_positions"] = perplexity(values[scored])
            if method != "recompute":  # paired over the same positions, with a 95% interval
                summary[method]["vs_recompute"] = paired_ratio(values, nll["recompute"])
    curves = {m: windowed_perplexity(v, args.slice) for m, v in nll.items() if m != "recompute"}
    slices = len(next(iter(curves.values()))) if curves else 0
    table = [{"to_token": (i + 1) * args.slice, **{m: c[i] for m, c in curves.items()}} for i in range(slices)]
    cache = {
        "start_size": args.start_size, "recent_size": args.recent_size,
        "recompute_window": args.start_size + args.recent_size, "recompute_stride": args.stride,
    }  # fmt: skip
    payload = {
        "meta": _meta(args, model, time.time() - began, len(ids)), "cache": cache, "summary": summary,
        "running_ppl": curves, "slice": args.slice,
    }  # fmt: skip
    _write(args.out, "ppl", payload, table)
    if curves:
        title = f"Running perplexity, cache {args.start_size}+{args.recent_size}"
        plots.running_ppl(curves, args.slice, args.out / "ppl_running.png", title, model.config.max_position_embeddings)
    for method, values in summary.items():
        print(f"{method:>10}: " + ", ".join(f"{k} {_show(v)}" for k, v in values.items()))
    return 0


def _show(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()) + "}"
    return f"{value:.3f}"


def run_sweep(args: argparse.Namespace) -> int:
    from ..eval import plots
    from ..eval.sweeps import recent_sweep, sink_sweep

    model, tokenizer = load(args)
    ids = _ids(args, tokenizer)
    if not args.no_progress:
        announce(args, model, work_tokens("sweep", args, len(ids), model.config.max_position_embeddings))
    began = time.time()
    progress = not args.no_progress
    sink_counts = [int(s) for s in args.sinks.split(",")]
    recents = [int(r) for r in args.recents.split(",")]
    sinks = sink_sweep(model, ids, sink_counts, args.total, args.chunk_size, progress)
    sizes = recent_sweep(model, ids, recents, args.start_size, args.chunk_size, progress)
    payload = {"meta": _meta(args, model, time.time() - began, len(ids)), "sinks": sinks, "cache_size": sizes}
    _write(args.out, "sweep_sinks", payload, sinks)
    _write(args.out, "sweep_cache_size", payload, sizes)
    plots.sink_bars(sinks, args.out / "sweep_sinks.png", f"Sink ablation, total cache {args.total}")
    plots.cache_size_curve(sizes, args.out / "sweep_cache_size.png", "Perplexity vs cache size")
    for row in sinks + sizes:
        print(row)
    return 0


def run_recall(args: argparse.Namespace) -> int:
    shard, _, shards = args.shard.partition("/")
    if not (shard.isdigit() and shards.isdigit() and int(shard) < int(shards)):
        raise ValueError(f"--shard must be K/N with 0 <= K < N, got {args.shard!r}.")
    began, model = time.time(), None
    if not args.report_only:
        model = _run_recall(args, (int(shard), int(shards)), began)
    table, costs, trials = _recall_report(args.out)
    meta = _meta(args, model, time.time() - began, 0) if model is not None else {"command": " ".join(sys.argv)}
    payload = {"meta": meta, "cells": sum(t["trials"] for t in table), "accuracy": table, "stream_costs": costs,
               "hybrid_trials_finished": trials}  # fmt: skip
    whole = args.report_only or shards == "1"
    _write(args.out, "recall" if whole else f"recall.{shard}-of-{shards}", payload, table)
    if table and whole:
        from ..eval.plots import recall_families
        from ..eval.recall_batch import markdown

        (args.out / "recall.md").write_text(markdown(table))
        cells = payload["cells"]
        recall_families(table, args.out / "recall.png", f"Recall of planted facts vs distance ({cells:,} answers)")
    for row in table:
        print(row)
    for row in costs:
        print(row)
    return 0


def _run_recall(args: argparse.Namespace, shard: tuple[int, int], began: float):
    """Run this shard's batched units, then its hybrid trials (one session each) in the time left."""
    from ..eval import recall as per_trial
    from ..eval.recall_batch import parse_methods, run_batched
    from ..sessions.memory import HybridMemory

    model, tokenizer = load(args)
    if args.tf32:
        import torch

        torch.set_float32_matmul_precision("high")
    dense_window = model.config.max_position_embeddings - 8
    specs = [m.strip() for m in args.methods.split(",") if m.strip()]
    hybrid = [m for m in specs if m.startswith("hybrid")]
    batched = (
        parse_methods(",".join(m for m in specs if m not in hybrid), dense_window) if len(hybrid) < len(specs) else []
    )
    distances = [int(d) for d in args.distances.split(",")]
    text = _text(args)
    name = f"{shard[0]}-of-{shard[1]}"
    if batched:
        run_batched(
            model, tokenizer, text, args.families.split(","), distances, batched, args.trials, args.seed,
            args.out / f"recall_cells.{name}.jsonl", args.max_seconds, shard, args.batch_rows,
            {"budget": args.budget, "passage_tokens": args.passage_tokens}, args.dense_layer, args.chunk_tokens,
            args.max_slots, sorted(args.out.glob("recall_cells.*.jsonl")),
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )  # fmt: skip
    left = None if args.max_seconds is None else args.max_seconds - (time.time() - began)
    if hybrid and (left is None or left > 0):
        per_trial.recall_vs_distance(
            model, tokenizer, text, distances, per_trial.parse_methods(",".join(hybrid), dense_window),
            args.hybrid_trials or args.trials, args.seed, args.out / f"recall_trials.{name}.jsonl", left,
            HybridMemory(max_tokens=args.summary_tokens, update_every=args.update_every), args.hybrid_max_distance,
            progress=not args.no_progress, shard=shard,
        )  # fmt: skip
    return model


def _recall_report(out: Path) -> tuple[list[dict], list[dict], int]:
    """Accuracy table over every JSONL in ``out`` (batched cells and per-trial rows), streaming costs, and the
    number of per-trial (hybrid) trials."""
    from ..eval.recall import load_trials, stream_costs
    from ..eval.recall_batch import cell_table, load_records, stream_summary, trial_cells

    records = [r for path in sorted(out.glob("recall_cells.*.jsonl")) for r in load_records(path)]
    trials = [t for path in sorted(out.glob("recall_trials.*.jsonl")) for t in load_trials(path)]
    return cell_table(records + trial_cells(trials)), stream_summary(records) + stream_costs(trials), len(trials)


def run_stability(args: argparse.Namespace) -> int:
    from ..eval import plots
    from ..eval.stability import stability_run

    model, tokenizer = load(args)
    ids = _ids(args, tokenizer)
    if not args.no_progress:
        announce(args, model, work_tokens("stability", args, len(ids)))
    began = time.time()
    rows = stability_run(
        model, ids, args.start_size, args.recent_size, args.window, args.chunk_size, args.state_dir, args.resume,
        not args.no_progress,
    )  # fmt: skip
    payload = {"meta": _meta(args, model, time.time() - began, len(ids)), "rows": rows}
    _write(args.out, "stability", payload, rows)
    title = f"Streaming {args.start_size}+{args.recent_size} over {len(ids):,} tokens"
    plots.stability_plot(rows, args.out / "stability.png", title)
    for row in rows:
        print(row)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from ..eval.demo_quality import RECIPES, generate_batch, score_ranges
    from .generate import DEMO_PROMPT

    model, tokenizer = load(args)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": DEMO_PROMPT}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = {"streaming": args.recent_size, "full": len(prompt_ids) + args.tokens}  # full: never evicts
    caches = {}
    for name in args.caches.split(","):
        if name not in sizes:
            raise ValueError(f"Unknown cache '{name}'; use streaming and/or full.")
        caches[name] = sizes[name]
    names = args.recipes.split(",")
    for name in names:
        if name not in RECIPES:
            raise ValueError(f"Unknown recipe '{name}'; choose from {', '.join(RECIPES)}.")
    began, runs, table = time.time(), [], []
    for cache_name, recent in caches.items():  # all streaming runs first: they matter most
        for name in names:
            ids, logps, seconds = generate_batch(
                model, tokenizer, prompt_ids, RECIPES[name], seeds, args.tokens, args.start_size, recent
            )
            for seed, seed_ids, seed_logps in zip(seeds, ids, logps, strict=True):
                ranges = score_ranges(tokenizer, seed_ids, seed_logps, args.span)
                runs.append({"recipe": name, "cache": cache_name, "seed": seed, "ranges": ranges,
                             "text": tokenizer.decode(seed_ids)})  # fmt: skip
            for i, rng in enumerate(runs[-1]["ranges"]):
                rows = [r["ranges"][i] for r in runs[-len(seeds) :]]
                table.append({
                    "recipe": name, "cache": cache_name, "tokens": f"{rng['from_token']}-{rng['to_token']}",
                    "distinct2_mean": round(sum(r["distinct2"] for r in rows) / len(rows), 3),
                    "distinct2_min": min(r["distinct2"] for r in rows),
                    "longest_word_max": max(r["longest_word"] for r in rows),
                    "long_words": sum(r["long_words"] for r in rows),
                    "self_ppl_mean": round(sum(r["self_ppl"] for r in rows) / len(rows), 2),
                })  # fmt: skip
            print(f"{name}/{cache_name}: {len(seeds)} x {args.tokens} tokens in {seconds:.0f} s", file=sys.stderr)
            _write_demo(args, model, began, prompt_ids, caches, names, table, runs)  # after each run: partial results
    return 0


def _write_demo(args, model, began, prompt_ids, caches, names, table, runs) -> None:
    from ..eval.demo_quality import RECIPES
    from .generate import DEMO_PROMPT

    payload = {
        "meta": _meta(args, model, time.time() - began, args.tokens),
        "prompt": DEMO_PROMPT, "prompt_tokens": len(prompt_ids), "recipes": {n: RECIPES[n] for n in names},
        "cache": {"start_size": args.start_size, **{f"{k}_recent_size": v for k, v in caches.items()}},
        "table": table, "runs": runs,
    }  # fmt: skip
    _write(args.out, "demo_quality", payload, table)
    header = "| recipe | cache | tokens | distinct-2 mean (min) | longest word | words > 25 chars | self-ppl |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(
            f"| {r['recipe']} | {r['cache']} | {r['tokens']} | {r['distinct2_mean']:.3f} ({r['distinct2_min']:.3f}) "
            f"| {r['longest_word_max']} | {r['long_words']} | {r['self_ppl_mean']:.2f} |"
        )
    (args.out / "demo_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)
