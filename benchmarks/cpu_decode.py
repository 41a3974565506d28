"""CPU decode and prefill, side by side in one run: ours (fp32, and opt-in int4), DynamicCache, llama.cpp.

Every method streams the same Shakespeare tokens (the embedded SmolLM2-135M's tokenizer) up to each
checkpoint (512 / 2k / 16k by default) in chunks of 512, timing the chunks (prefill tokens/s), then
decodes greedily: ``--repeats`` timed runs of ``--decode`` tokens after 2 warm-up steps, and the
median run is reported. All methods use ``--threads`` threads and run one after the other, each in
its own process, on the same machine.

* ``ours-fp32``: StreamingCache 4+2000 through the Stepper, fp32 (the default; the exact path).
* ``ours-int4``: the same with ``load_model(quantize="int4")`` (int4 linear layers, int8 LM head).
* ``dynamic``: transformers' DynamicCache (full attention), fp32.
* ``llama.cpp``: ``llama-cpp-python`` on the same GGUF (Q4_1, the embedded file), full context;
  "not installed" when it cannot be imported (nothing is invented or reused).

Perplexity of each of our modes over the first ``--ppl-tokens`` tokens (streaming 4+2000, chunks of
512) goes into the same JSON. Outputs: ``--out`` .json / .csv / .png.

    python benchmarks/cpu_decode.py                                   # the full run
    python benchmarks/cpu_decode.py --checkpoints 512 --decode 4 --repeats 1 --ppl-tokens 1024   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ("ours-fp32", "ours-int4", "dynamic", "llama.cpp")
CHUNK = 512


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def text_ids(n: int) -> list[int]:
    from transformers import AutoTokenizer

    from streaming_llm.data import read_text
    from streaming_llm.runtime.loading import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(None), local_files_only=True)
    ids = tokenizer(read_text()[: 12 * n])["input_ids"][:n]
    if len(ids) < n:
        raise ValueError(f"The packaged text has only {len(ids)} tokens here; asked for {n}.")
    return ids


def worker(method: str, checkpoints: list[int], decode: int, repeats: int, threads: int, ppl_tokens: int) -> dict:
    need = max(checkpoints) + 2 + decode * repeats + 8
    ids = text_ids(max(need, ppl_tokens))
    if method == "llama.cpp":
        return llama_worker(ids, checkpoints, decode, repeats, threads)
    import torch
    from transformers import DynamicCache

    from streaming_llm import StreamingCache, install
    from streaming_llm.core.compat import cache_kwargs
    from streaming_llm.core.stepper import Stepper
    from streaming_llm.runtime.loading import load_model

    torch.set_num_threads(threads)
    began = time.perf_counter()
    model, _ = load_model(device="cpu", dtype="float32", quantize="int4" if method == "ours-int4" else None)
    load_s = time.perf_counter() - began
    streaming = method.startswith("ours")
    if streaming:
        install(model)
        cache = StreamingCache(model.config, start_size=4, recent_size=2000)
        stepper = Stepper(model, cache)
    else:
        cache = DynamicCache(config=model.config)

    def feed(chunk: list[int]) -> None:
        if streaming:
            stepper.prefill(0, chunk)
        else:
            model(input_ids=torch.tensor([chunk]), use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))

    def step(token: int) -> int:
        if streaming:
            return int(stepper.decode({0: token})[0].argmax(-1))
        out = model(input_ids=torch.tensor([[token]]), use_cache=True, **cache_kwargs(model, cache))
        return int(out.logits[0, -1].argmax(-1))

    with torch.no_grad():
        result = measure(ids, checkpoints, decode, repeats, feed, step, method)
    result["load_s"] = load_s
    if streaming and ppl_tokens:
        from streaming_llm.eval.perplexity import perplexity, streaming_nll

        began = time.perf_counter()
        nll = streaming_nll(model, torch.tensor(ids[:ppl_tokens]), 4, 2000, chunk_size=CHUNK)
        result["perplexity"] = {"tokens": ppl_tokens, "value": perplexity(nll), "seconds": time.perf_counter() - began}
    return result


def llama_worker(ids: list[int], checkpoints: list[int], decode: int, repeats: int, threads: int) -> dict:
    try:
        import llama_cpp
        import numpy
    except ImportError as error:
        return {"method": "llama.cpp", "installed": False, "why": f"not installed ({error})", "rows": []}
    from streaming_llm.runtime.loading import embedded_gguf

    began = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(embedded_gguf()), n_ctx=max(checkpoints) + decode * repeats + 64, n_batch=CHUNK,
        n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False,
    )  # fmt: skip
    load_s = time.perf_counter() - began
    vocab = llm.n_vocab()

    def feed(chunk: list[int]) -> None:
        llm.eval(chunk)

    def step(token: int) -> int:
        llm.eval([token])
        # Without logits_all, llama-cpp-python keeps no scores: read the last token's logits from the context.
        return int(numpy.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).argmax())

    result = measure(ids, checkpoints, decode, repeats, feed, step, "llama.cpp")
    result.update(load_s=load_s, installed=True, version=getattr(llama_cpp, "__version__", "?"))
    return result


def measure(ids, checkpoints, decode, repeats, feed, step, method) -> dict:
    """Stream ``ids`` to each checkpoint (timing the chunks), then time ``repeats`` runs of ``decode`` steps."""
    rows, fed, prefill_s, prefill_tokens = [], 0, 0.0, 0
    for checkpoint in checkpoints:
        while fed < checkpoint:
            chunk = ids[fed : min(checkpoint, fed + CHUNK)]
            began = time.perf_counter()
            feed(chunk)
            if len(chunk) == CHUNK:  # full chunks only: the same work per chunk for every method
                prefill_s += time.perf_counter() - began
                prefill_tokens += len(chunk)
            fed += len(chunk)
        token = ids[fed]
        for _ in range(2):  # warm-up
            token = step(token)
        runs = []
        for _ in range(repeats):
            began = time.perf_counter()
            for _ in range(decode):
                token = step(token)
            runs.append(1000 * (time.perf_counter() - began) / decode)
        fed += 2 + decode * repeats
        rows.append({
            "method": method, "context": checkpoint, "ms_per_token": statistics.median(runs),
            "ms_per_token_runs": [round(r, 2) for r in runs], "load_average": load_average(),
        })  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {
        "method": method, "rows": rows, "prefill_tokens_per_s": prefill_tokens / prefill_s if prefill_s else None,
        "prefill_tokens_timed": prefill_tokens,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[512, 2048, 16384])
    parser.add_argument("--decode", type=int, default=16, help="tokens per timed decode run")
    parser.add_argument("--repeats", type=int, default=3, help="timed decode runs per checkpoint (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every method")
    parser.add_argument("--ppl-tokens", type=int, default=16384, help="tokens for the perplexity of our modes")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cpu_decode")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.checkpoints, args.decode, args.repeats, args.threads, args.ppl_tokens)
        print(json.dumps(result))
        return
    began, results = time.time(), {}
    for method in args.methods:
        command = [sys.executable, __file__, "--worker", method, "--decode", str(args.decode), "--repeats",
                   str(args.repeats), "--threads", str(args.threads), "--ppl-tokens", str(args.ppl_tokens),
                   "--checkpoints", *map(str, args.checkpoints)]  # fmt: skip
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        write(results, args, time.time() - began)  # after every method: a later failure loses nothing


def write(results: dict, args: argparse.Namespace, seconds: float) -> None:
    llama = results.get("llama.cpp") or {"installed": False, "why": "not run", "rows": []}
    ref = {r["context"]: r["ms_per_token"] for r in llama["rows"]}
    ref_prefill = llama.get("prefill_tokens_per_s")
    rows = []
    for method, result in results.items():
        for r in result["rows"]:
            rows.append({
                "method": method, "context": r["context"], "ms_per_token": round(r["ms_per_token"], 2),
                "x_llama_cpp_ms": round(r["ms_per_token"] / ref[r["context"]], 2) if r["context"] in ref else None,
                "prefill_tokens_per_s": round(result["prefill_tokens_per_s"], 1),
                "prefill_x_llama_cpp": round(result["prefill_tokens_per_s"] / ref_prefill, 2) if ref_prefill else None,
                "load_s": round(result.get("load_s", 0), 2),
            })  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ppl = {m: r["perplexity"] for m, r in results.items() if "perplexity" in r}
    if "ours-fp32" in ppl and "ours-int4" in ppl:
        ppl["int4_vs_fp32"] = ppl["ours-int4"]["value"] / ppl["ours-fp32"]["value"] - 1
    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "threads": args.threads, "decode_tokens_per_run": args.decode, "repeats": args.repeats,
        "seconds": round(seconds), "load_average_at_end": load_average(),
        "llama_cpp": "measured in this run" if llama["installed"] else f"llama.cpp: {llama['why']}",
        "model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF; ours de-quantised to fp32)",
        "cache": "ours StreamingCache 4+2000; DynamicCache and llama.cpp full context",
    }  # fmt: skip
    payload = {"meta": meta, "rows": rows, "perplexity": ppl, "raw": results}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    print(json.dumps({"meta": meta, "perplexity": ppl}, indent=2))
    for r in rows:
        print(r)
    plot(rows, meta, args.out.with_suffix(".png"))


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, prefill) = plt.subplots(1, 2, figsize=(11, 4))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        speed.plot([r["context"] for r in mine], [r["ms_per_token"] for r in mine], marker="o", label=method)
    prefill.bar(methods, [next(r["prefill_tokens_per_s"] for r in rows if r["method"] == m) for m in methods])
    speed.set_xscale("log", base=2)
    speed.set_xlabel("context (tokens streamed)")
    speed.set_ylabel("decode ms / token (median)")
    speed.grid(alpha=0.3)
    speed.legend()
    prefill.set_ylabel("prefill tokens / s (chunks of 512)")
    fig.suptitle(f"SmolLM2-135M on CPU, {meta['threads']} threads; {meta['llama_cpp']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
