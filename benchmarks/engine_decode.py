"""One cache with rows: batched decode against the single-stream step and the bandwidth floor, in one run.

One process, one model (Llama-3-8B-shaped, random bf16 weights: speed does not depend on them), cache
4 sinks + 4092 per row, side by side:

* ``floor``: the device copy bandwidth; at each batch size the bandwidth floor = (weight bytes + the
  K/V bytes every row's step reads) / bandwidth;
* ``single``: the single-stream captured step (a one-row cache), past 32k tokens;
* ``rows``: 1 / 8 / 32 / 64 live rows of one cache, each past 32k tokens, every row with 4 sinks (the rows
  see the same slots: plain attention over them);
* ``ragged``: the same rows with pinned prefixes (system prompts) of 30..200 tokens, so every row sees its
  own slot range (the decode kernel);
* ``engine``: 32 streams generating through the engine loop (sampling and host work included), uniform and
  ragged: the engine's raw tokens/s;
* ``spill``: moving one row to host memory and back (what the engine does when more streams are live than
  rows), ms and GB/s;
* ``server`` (``--server``, needs a tokenizer: ``--tokenizer DIR``): 32 concurrent sessions, each with its
  own system prompt of 30..200 tokens, through the ``openai`` client on loopback against ``create_app`` on
  the same model; total completion tokens/s against the engine's.

How rows get past 32k: one row streams ``--stream-limit`` random tokens for real (chunked prefill), is
fast-forwarded (``StreamingCache.fast_forward``: same kept tokens, slots and positions as a stream that
long), and its snapshot is restored into the other rows (``assign(state=...)``). Every timed step reads
every row's greedy token back (as the engine does). With ``--check`` the GPU check runs first: rows at
different lengths (fresh, filling sinks, 2k, one that rebases during the check) decoded batched and
captured in float32 equal each stream alone on a one-row cache over 256 steps.

    python benchmarks/engine_decode.py --out benchmarks/results/engine_decode --check --server --tokenizer DIR
    python benchmarks/engine_decode.py --tiny --device cpu --rows 1 4 --decode 4 --stream-limit 200 \\
        --recent-size 60 --out /tmp/ed                                                   # smoke test (CPU)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming_llm import StreamingCache, install  # noqa: E402
from streaming_llm.core.stepper import Stepper  # noqa: E402
from streaming_llm.eval.benchmark import percentile, sync  # noqa: E402
from streaming_llm.eval.shapes import LLAMA3_8B, SMOLLM2_135M, TINY  # noqa: E402
from streaming_llm.runtime.engine import Engine, Request  # noqa: E402

PINNED = (30, 55, 80, 105, 130, 155, 180, 200)  # the ragged rows' pinned prefixes (system prompts)


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


def kv_bytes_read(model, slots: int) -> int:
    """K/V bytes one row's decode step reads over ``slots`` visible slots (every layer)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * slots * model.dtype.itemsize


def timed_steps(stepper: Stepper, rows: list[int], first: list[int], steps: int, warmup: int = 3) -> list[float]:
    """Greedy decode of ``rows`` (one token each per step), every step synchronised and its tokens read back."""
    tokens, times = dict(zip(rows, first, strict=True)), []
    for i in range(warmup + steps):
        sync(stepper.model.device)
        began = time.perf_counter()
        logits = stepper.decode(tokens)
        picks = logits[rows].argmax(-1).tolist()
        tokens = dict(zip(rows, picks, strict=True))
        if i >= warmup:
            times.append(time.perf_counter() - began)
    return times


def summary(times: list[float], n: int) -> dict:
    mean = statistics.fmean(times)
    return {"ms_per_step": 1000 * mean, "p50_ms": 1000 * percentile(times, 0.5),
            "p99_ms": 1000 * percentile(times, 0.99), "tokens_per_s": n / mean}  # fmt: skip


@torch.no_grad()
def streamed_state(model, args, start: int, context: int, pinned_capacity: int):
    """A row that streamed ``--stream-limit`` tokens for real, fast-forwarded past ``context``: its snapshot."""
    cache = StreamingCache(model.config, start, args.recent_size, rows=1, pinned_capacity=pinned_capacity,
                           dtype=model.dtype, device=model.device)  # fmt: skip
    stepper = Stepper(model, cache)
    real = max(args.stream_limit, start + args.recent_size + 64)  # a full row (fast_forward needs one)
    ids = torch.randint(0, model.config.vocab_size, (real,), device=model.device)
    sync(model.device)
    began = time.perf_counter()
    for piece in ids.split(args.chunk):
        logits = stepper.prefill(0, piece)
    sync(model.device)
    seconds = time.perf_counter() - began
    if context > cache.seen_tokens:
        cache.fast_forward(context - cache.seen_tokens)
    return cache.row_state(0), int(logits.argmax()), real / seconds


@torch.no_grad()
def single(model, args, context: int) -> dict:
    state, first, _ = streamed_state(model, args, args.start_size, context, args.start_size)
    cache = StreamingCache.from_state(model.config, *state)
    stepper = Stepper(model, cache)
    times = timed_steps(stepper, [0], [first], args.decode)
    return {"method": "single", "rows": 1, "context": cache.seen_tokens, "graph_replays": stepper.replays,
            "cache_mib": cache.nbytes / 2**20, **summary(times, 1)}  # fmt: skip


@torch.no_grad()
def batched(model, args, context: int, ragged: bool, emit) -> None:
    """Rows of one cache: every size in ``--rows``, uniform (4 sinks) or ragged (pinned prefixes 30..200)."""
    n_max = max(args.rows)
    pins = [PINNED[b % len(PINNED)] if ragged else args.start_size for b in range(n_max)]
    capacity = max(pins)
    cache = StreamingCache(model.config, args.start_size, args.recent_size, rows=n_max, pinned_capacity=capacity,
                           dtype=model.dtype, device=model.device)  # fmt: skip
    states, firsts = {}, {}
    for p in sorted(set(pins)):
        states[p], firsts[p], rate = streamed_state(model, args, p, context, capacity)
    for b, p in enumerate(pins):
        cache.assign(b, state=states[p])
    stepper = Stepper(model, cache)
    for n in args.rows:
        rows = list(range(n))
        times = timed_steps(stepper, rows, [firsts[pins[b]] for b in rows], args.decode)
        slots = sum(p + args.recent_size + 1 for p in pins[:n]) / n
        emit({"method": "ragged" if ragged else "rows", "rows": n, "context": cache.row(0).seen_tokens,
              "pinned": sorted(set(pins[:n])), "mean_visible_slots": slots, "graph_replays": stepper.replays,
              "cache_mib_per_row": cache.row_bytes / 2**20, "prefill_tokens_per_s": rate, **summary(times, n),
              "kv_bytes_per_step": n * kv_bytes_read(model, round(slots))})  # fmt: skip
    del cache, stepper


@torch.no_grad()
def engine_loop(model, args, context: int, n: int, ragged: bool) -> dict:
    """``n`` streams generating together through the engine (sampling, bookkeeping): steady tokens/s."""
    pins = [PINNED[b % len(PINNED)] if ragged else args.start_size for b in range(n)]
    cache = StreamingCache(model.config, args.start_size, args.recent_size, rows=n, pinned_capacity=max(pins),
                           dtype=model.dtype, device=model.device)  # fmt: skip
    states = {p: streamed_state(model, args, p, context, max(pins))[0] for p in sorted(set(pins))}
    engine = Engine(model, cache)
    streams = [engine.open(f"s{b}", state=states[p]) for b, p in enumerate(pins)]
    requests = [engine.submit(Request(s, [1], args.decode + 8)) for s in streams]
    while any(len(r.tokens) < 4 for r in requests):  # warm-up: graphs captured, every stream decoding
        engine.step()
    sync(model.device)
    counted, began = sum(len(r.tokens) for r in requests), time.perf_counter()
    while not all(r.done for r in requests):
        engine.step()
    sync(model.device)
    seconds = time.perf_counter() - began
    generated = sum(len(r.tokens) for r in requests) - counted
    return {"method": "engine", "rows": n, "ragged": ragged, "tokens_per_s": generated / seconds,
            "decode_steps": engine.decode_steps, "max_batch": engine.stepper.max_batch}  # fmt: skip


@torch.no_grad()
def spill_cost(model, args, context: int) -> dict:
    """One row to host memory and back through the engine (pinned host buffers)."""
    cache = StreamingCache(model.config, args.start_size, args.recent_size, rows=1, dtype=model.dtype,
                           device=model.device)  # fmt: skip
    state = streamed_state(model, args, args.start_size, context, args.start_size)[0]
    engine = Engine(model, cache)
    streams = [engine.open(f"s{i}", state=state) for i in range(2)]
    for _ in range(6):  # ping-pong: each request spills the other stream
        for s in streams:
            engine.run_to_end(engine.submit(Request(s, [1], 1)))
    moved = sum(t.numel() * t.element_size() for t in state[0].values())
    return {"method": "spill", "row_mib": moved / 2**20, "spills": engine.spills, "restores": engine.restores,
            "spill_ms": 1000 * engine.spill_seconds / engine.spills,
            "restore_ms": 1000 * engine.restore_seconds / engine.restores,
            "spill_gb_s": moved * engine.spills / engine.spill_seconds / 1e9,
            "restore_gb_s": moved * engine.restores / engine.restore_seconds / 1e9}  # fmt: skip


def system_prompt(i: int) -> str:
    """Session ``i``'s system prompt: about 30..200 tokens."""
    return f"You are assistant {i}. " + "Answer briefly and keep to the point of the question that the user asks. " * (
        1 + i % 12
    )


@torch.no_grad()
def engine_turns(model, tokenizer, args, sessions: int = 32) -> dict:
    """What the server's work is, on the engine directly: ``sessions`` sessions with their own system prompts
    (a first short turn), then one turn each submitted at once (the new message fed in chunks between decode
    steps, ``--server-tokens`` tokens generated): completion tokens/s, ramp-up included."""
    from streaming_llm import StreamingSession
    from streaming_llm.runtime.sampling import SamplingConfig

    cache = StreamingCache(model.config, args.start_size, args.recent_size, rows=sessions, pinned_capacity=256,
                           dtype=model.dtype, device=model.device)  # fmt: skip
    engine = Engine(model, cache)
    greedy = SamplingConfig(suppress_ids=(tokenizer.eos_token_id,))
    chats = [StreamingSession(model, tokenizer, system_prompt(i), recent_size=args.recent_size, engine=engine,
                              sampling=greedy, name=f"s{i}") for i in range(sessions)]  # fmt: skip
    for warm in (True, False):
        turns = [c.turn_request([("user", "Hello." if warm else "Tell me a long story.")],
                                8 if warm else args.server_tokens)[0] for c in chats]  # fmt: skip
        sync(model.device)
        began = time.perf_counter()
        for r in turns:
            engine.submit(r)
        while not all(r.done for r in turns):
            engine.step()
        sync(model.device)
        seconds = time.perf_counter() - began
    generated = sum(len(r.tokens) for r in turns)
    return {"method": "turns", "rows": sessions, "tokens_per_s": generated / seconds, "seconds": seconds,
            "completion_tokens": generated, "max_batch": engine.stepper.max_batch}  # fmt: skip


def server_e2e(model, tokenizer, args, sessions: int = 32) -> dict:
    """``sessions`` concurrent sessions with their own system prompts through the openai client on loopback."""
    import socket

    import openai
    import uvicorn

    from streaming_llm.runtime.sampling import SamplingConfig
    from streaming_llm.serving.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(model, tokenizer, start_size=args.start_size, recent_size=args.recent_size, rows=sessions,
                     max_sessions=2 * sessions, sampling=SamplingConfig(suppress_ids=(tokenizer.eos_token_id,)),
                     pinned_capacity=256)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    counts: list[int] = []
    errors: list[BaseException] = []
    done = threading.Barrier(sessions + 1)
    clients = [
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
        for _ in range(sessions)
    ]  # fmt: skip  (made before the clock starts)

    def talk(i: int, warm: bool) -> None:
        try:
            client = clients[i]
            system = system_prompt(i)
            reply = client.chat.completions.create(
                model="streaming-llm", max_tokens=8 if warm else args.server_tokens,
                extra_headers={"X-Session-Id": f"s{i}"},
                messages=([{"role": "system", "content": system}] if warm else [])
                + [{"role": "user", "content": "Hello." if warm else "Tell me a long story."}],
            )  # fmt: skip
            if not warm:
                counts.append(reply.usage.completion_tokens)
        except BaseException as error:  # reported by the caller
            errors.append(error)
        finally:
            done.wait()

    try:
        for warm in (True, False):  # the first round creates the sessions (and captures the graphs); the second
            # continues them (their system prompts pinned), only the new message sent
            counts.clear()
            done.reset()
            began = time.perf_counter()
            for i in range(sessions):
                threading.Thread(target=talk, args=(i, warm), daemon=True).start()
            done.wait()
            seconds = time.perf_counter() - began
            if errors:
                raise RuntimeError(f"{len(errors)} sessions failed: {errors[0]!r}")
        health = app.state.server.health()
    finally:
        server.should_exit = True
        thread.join(30)
    return {"method": "server", "rows": sessions, "tokens_per_s": sum(counts) / seconds, "seconds": seconds,
            "completion_tokens": sum(counts), "max_batch": health["max_batch"],
            "decode_steps": health["decode_steps"], "batched_tokens": health["batched_tokens"]}  # fmt: skip


@torch.no_grad()
def check(args, device: torch.device, steps: int = 256) -> dict:
    """Rows at different lengths, batched and captured in float32, against each stream alone (4-layer model)."""
    config = LlamaConfig(**{**(TINY if args.tiny else LLAMA3_8B), "num_hidden_layers": 4})
    with torch.device(device):
        model = LlamaForCausalLM(config).float().eval()
    install(model)
    lengths = [1, 3, 2000, max(200, 2 * (args.start_size + args.recent_size) - steps // 2)]
    pins = [args.start_size, 37, args.start_size, 120]
    prompts = [torch.randint(0, config.vocab_size, (n,), device=device) for n in lengths]
    cache = StreamingCache(config, args.start_size, args.recent_size, rows=4, pinned_capacity=128,
                           dtype=torch.float32, device=device)  # fmt: skip
    stepper, alone, tokens, diff, same = Stepper(model, cache), [], {}, 0.0, True
    for b, (p, ids) in enumerate(zip(pins, prompts, strict=True)):
        cache.assign(b, start_size=p)
        one = StreamingCache(config, p, args.recent_size, rows=1, dtype=torch.float32, device=device)
        alone.append(Stepper(model, one))
        tokens[b] = int(stepper.prefill(b, ids).argmax())
        alone[b].prefill(0, ids)
    for _ in range(steps):
        logits = stepper.decode(tokens)
        for b in range(4):
            ref = alone[b].decode({0: tokens[b]})[0]
            diff = max(diff, float((logits[b] - ref).abs().max()))
            same &= int(ref.argmax()) == int(logits[b].argmax())
        tokens = {b: int(logits[b].argmax()) for b in range(4)}
    del model
    return {"method": "check", "dtype": "float32", "steps": steps, "lengths": lengths, "pinned": pins,
            "greedy_identical": same, "max_logit_diff": diff, "graph_replays": stepper.replays}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 8, 32, 64])
    parser.add_argument("--context", type=int, default=40_000, help="tokens every row has streamed (>= 32k)")
    parser.add_argument("--decode", type=int, default=64, help="timed steps per measurement")
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--start-size", type=int, default=4)
    parser.add_argument("--recent-size", type=int, default=4092)
    parser.add_argument("--stream-limit", type=int, default=4096, help="stream for real this many tokens")
    parser.add_argument("--engine-rows", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument("--smollm2", action="store_true", help="a SmolLM2-135M-shaped random model (CPU runs)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--check", action="store_true", help="first: batched+captured equals alone (float32)")
    parser.add_argument("--server", action="store_true", help="also the server end to end (needs --tokenizer)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (the model then has its vocabulary)")
    parser.add_argument("--server-tokens", type=int, default=128, help="completion tokens per server session")
    parser.add_argument("--only", default="check,single,rows,ragged,engine,spill,turns,server",
                        help="comma-separated sections to run (default: all)")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    only = set(args.only.split(","))

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.check and "check" in only:
        emit(check(args, device))
    tokenizer = None
    shape = dict(TINY if args.tiny else SMOLLM2_135M if args.smollm2 else LLAMA3_8B)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        shape["vocab_size"] = len(tokenizer)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).eval()
    install(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    emit({"method": "floor", "weights_gb": weights / 1e9, "bandwidth_tb_s": bandwidth and bandwidth / 1e12,
          "ms_per_token": bandwidth and 1000 * weights / bandwidth})  # fmt: skip
    if "single" in only:
        emit(single(model, args, args.context))
    for ragged in (False, True):
        if ("ragged" if ragged else "rows") in only:
            batched(model, args, args.context, ragged, emit)
    for ragged in (False, True):
        if "engine" in only:
            emit(engine_loop(model, args, args.context, args.engine_rows, ragged))
    if "spill" in only:
        emit(spill_cost(model, args, args.context))
    if tokenizer is not None and "turns" in only:
        emit(engine_turns(model, tokenizer, args, args.engine_rows))
    if args.server and tokenizer is not None and "server" in only:
        emit(server_e2e(model, tokenizer, args, args.engine_rows))
    report(rows, args, weights, bandwidth, device, dtype)


def report(rows: list[dict], args, weights: int, bandwidth: float | None, device, dtype) -> None:
    single_row = next((r for r in rows if r["method"] == "single"), None)
    for r in rows:
        if r["method"] in ("rows", "ragged") and bandwidth:
            r["floor_ms"] = 1000 * (weights + r["kv_bytes_per_step"]) / bandwidth
            r["floor_tokens_per_s"] = r["rows"] / r["floor_ms"] * 1000
            r["fraction_of_floor"] = r["floor_ms"] / r["ms_per_step"]
    ratios = {}
    by = {(r["method"], r["rows"]): r for r in rows if "rows" in r and r["method"] in ("rows", "ragged")}
    if ("rows", 1) in by and single_row:
        ratios["1 row / single-stream step"] = by[("rows", 1)]["p50_ms"] / single_row["p50_ms"]
    engine = {r.get("ragged"): r for r in rows if r["method"] == "engine"}
    server = next((r for r in rows if r["method"] == "server"), None)
    turns = next((r for r in rows if r["method"] == "turns"), None)
    if server and True in engine:
        ratios["server / engine (ragged, same rows)"] = server["tokens_per_s"] / engine[True]["tokens_per_s"]
    if server and turns:
        ratios["server / engine turns (same work)"] = server["tokens_per_s"] / turns["tokens_per_s"]
    print(f"\n{'method':>8} | {'rows':>4} | {'p50 ms':>8} | {'tok/s':>8} | {'floor ms':>8} | {'of floor':>8}")
    for r in rows:
        if "p50_ms" in r:
            print(f"{r['method']:>8} | {r['rows']:>4} | {r['p50_ms']:8.2f} | {r['tokens_per_s']:8.0f} | "
                  f"{r.get('floor_ms', 0):8.2f} | {r.get('fraction_of_floor', 0):8.2f}")  # fmt: skip
        elif r["method"] in ("engine", "server", "turns"):
            print(f"{r['method']:>8} | {r['rows']:>4} | {'':>8} | {r['tokens_per_s']:8.0f} |")
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    import transformers

    meta = {
        "command": "python " + " ".join(sys.argv), "torch": torch.__version__, "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "dtype": str(dtype),
        "model": "tiny" if args.tiny else "SmolLM2-135M-shaped, random weights" if args.smollm2
        else "Llama-3-8B-shaped, random weights",
        "cache": f"{args.start_size}+{args.recent_size} per row",
        "note": f"rows stream {args.stream_limit} tokens for real, then are fast-forwarded past {args.context}",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2))
    with args.out.with_suffix(".csv").open("w") as f:
        keys = ["method", "rows", "p50_ms", "p99_ms", "tokens_per_s", "floor_ms", "fraction_of_floor"]
        f.write(",".join(keys) + "\n")
        for r in rows:
            if "tokens_per_s" in r:
                f.write(",".join(str(r.get(k, "")) for k in keys) + "\n")
    plot(rows, args.out.with_suffix(".png"), meta)


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method, style in (("rows", "o-"), ("ragged", "s-")):
        pts = sorted((r["rows"], r["tokens_per_s"], r.get("floor_tokens_per_s")) for r in rows if r["method"] == method)
        if pts:
            a.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{method} (measured)")
            if pts[0][2]:
                a.plot([p[0] for p in pts], [p[2] for p in pts], ":", color="gray",
                       label="bandwidth floor" if method == "rows" else None)  # fmt: skip
            b.plot([p[0] for p in pts], [1000 * p[0] / p[1] for p in pts], style, label=method)
    for r in rows:
        if r["method"] == "single":
            b.axhline(r["p50_ms"], color="red", ls="--", label="single-stream step")
        if r["method"] in ("engine", "server"):
            a.plot([r["rows"]], [r["tokens_per_s"]], "^" if r["method"] == "engine" else "*", markersize=10,
                   label=f"{r['method']}{' (ragged)' if r.get('ragged') else ''}")  # fmt: skip
    a.set_xlabel("live rows")
    a.set_ylabel("total tokens/s")
    a.set_xscale("log", base=2)
    a.legend(fontsize=7)
    b.set_xlabel("live rows")
    b.set_ylabel("ms per decode step (p50)")
    b.set_xscale("log", base=2)
    b.legend(fontsize=7)
    fig.suptitle(f"One cache with rows: {meta['model']}, {meta['cache']}, on {meta['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
