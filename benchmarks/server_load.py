"""Bounded loopback load test of ``streaming-llm serve``: N concurrent sessions x T turns each.

Starts the server (or uses ``--url``), runs every session as its own client thread with the official
``openai`` client (one ``X-Session-Id`` per session, only new messages sent), and prints p50/p95
request latency, time to first token and total completion tokens/s. Results are saved as JSON with the
command that produced them.

    python benchmarks/server_load.py --sessions 8 32 --turns 10 --max-tokens 16 \
        --model /path/to/model-dir --out benchmarks/results/server_load_cpu.json
    python benchmarks/server_load.py --sessions 8 --turns 3 --rows 1 8 --system '' ...
    python benchmarks/server_load.py --tiny --sessions 16 --turns 10 --replicas 0 1 2 \
        --out benchmarks/results/ray_load_cpu.json   # Ray Serve replicas (0: the single process)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]


def start_server(args, rows: int = 8, replicas: int = 0) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "streaming_llm.cli", "serve", "--port", str(port), "--recent-size",
               str(args.recent_size), "--max-sessions", str(max(args.sessions)), "--max-queue",
               str(max(args.sessions) * 2), "--device", "cpu", "--rows", str(rows)]  # fmt: skip
    if args.model:
        command += ["--model", args.model]
    if args.state_dir:
        command += ["--state-dir", args.state_dir]
    if replicas:
        command += ["--replicas", str(replicas), "--replica-cpus", str(args.replica_cpus)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{port}"
    if replicas:  # ready when every replica is: the command prints "Serving" once Ray Serve says so
        for line in process.stdout:
            if line.startswith("Serving"):
                threading.Thread(target=process.stdout.read, daemon=True).start()  # keep draining
                return process, url
        raise SystemExit("the replicas did not start")
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            httpx.get(url + "/health", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not start")


def tiny_model(folder: Path) -> str:
    """A tiny random Llama (2 layers, width 64, seed 0) over the embedded tokenizer: measures the serving path."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from streaming_llm.runtime.loading import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(None))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run(url: str, sessions: int, turns: int, max_tokens: int, tag: str, system: str) -> dict:
    latencies, first_tokens, tokens, errors = [], [], [0], []
    lock = threading.Lock()

    def conversation(index: int) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        for turn in range(turns):
            messages = [{"role": "user", "content": f"Session {index}, turn {turn}: tell me something new."}]
            if turn == 0 and system:
                messages.insert(0, {"role": "system", "content": system})
            began, first, count = time.perf_counter(), None, 0
            try:
                stream = client.chat.completions.create(
                    model="streaming-llm", messages=messages, max_tokens=max_tokens, stream=True,
                    stream_options={"include_usage": True}, extra_headers={"X-Session-Id": f"{tag}-{index}"},
                )  # fmt: skip
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content and first is None:
                        first = time.perf_counter() - began
                    if chunk.usage:
                        count = chunk.usage.completion_tokens
            except Exception as error:  # counted and reported, never hidden
                with lock:
                    errors.append(f"{type(error).__name__}: {error}")
                continue
            with lock:
                latencies.append(time.perf_counter() - began)
                first_tokens.append(first if first is not None else latencies[-1])
                tokens[0] += count

    began = time.perf_counter()
    threads = [threading.Thread(target=conversation, args=(i,)) for i in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began

    def pct(values, q):
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]

    return {
        "sessions": sessions, "turns": turns, "max_tokens": max_tokens, "requests": sessions * turns,
        "errors": len(errors), "error_samples": errors[:5], "wall_s": round(wall, 2),
        "latency_p50_s": round(pct(latencies, 50), 3), "latency_p95_s": round(pct(latencies, 95), 3),
        "first_token_p50_s": round(pct(first_tokens, 50), 3), "first_token_p95_s": round(pct(first_tokens, 95), 3),
        "completion_tokens": tokens[0], "tokens_per_s": round(tokens[0] / wall, 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="use a running server instead of starting one")
    parser.add_argument("--model", default=None, help="model directory for the started server (default embedded)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--recent-size", type=int, default=256)
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[8],
        help="serve with each of these --rows values in turn (1: one session decodes at a time)",
    )
    parser.add_argument(
        "--system",
        default="You are a helpful assistant.",
        help="system prompt of each session's first turn ('' for none; it is pinned beside the sinks, and "
        "sessions with different system prompts decode together)",
    )
    parser.add_argument("--state-dir", default=None, help="serve with durable sessions (every turn saved)")
    parser.add_argument(
        "--replicas",
        type=int,
        nargs="+",
        default=[0],
        help="serve with each of these --replicas values in turn (0: the single process)",
    )
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="--replica-cpus of the replicas")
    parser.add_argument("--tiny", action="store_true", help="serve a tiny random model (the serving path's cost)")
    parser.add_argument("--label", default="", help="free text saved with the results (e.g. the model)")
    parser.add_argument("--out", default="benchmarks/results/server_load.json")
    args = parser.parse_args()
    if args.tiny:
        import tempfile

        args.model = tiny_model(Path(tempfile.mkdtemp(prefix="tiny-model-")))
    results = []
    plans = [(None, None)] if args.url else [(rows, n) for n in args.replicas for rows in args.rows]
    for rows, replicas in plans:
        process, url = (None, args.url) if args.url else start_server(args, rows, replicas)
        try:
            for n in args.sessions:
                result = run(url, n, args.turns, args.max_tokens, tag=f"load{n}-{int(time.time())}", system=args.system)
                health = httpx.get(url + "/health", timeout=30).json()
                result |= {
                    "replicas": replicas,
                    "rows": rows,
                    "decode_steps": health.get("decode_steps"),
                    "batched_tokens": health.get("batched_tokens"),
                    "max_batch": health.get("max_batch"),
                }  # fmt: skip (cumulative per server)
                print(json.dumps(result), flush=True)
                results.append(result)
        finally:
            if process is not None:
                process.terminate()
                process.wait(120)
    record = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "label": args.label,
        "engine": "one engine: every session a row of one cache (--rows resident, more spilled to host memory); "
                  "all generating rows decode in one batched forward, prompts fed in chunks between decode steps; "
                  "replicas N: N such servers on Ray Serve, every turn written to the shared state before it ends",
        "model": "tiny random Llama (2 layers, width 64)" if args.tiny else args.model or "embedded SmolLM2-135M",
        "system_prompt": args.system,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1m_at_end": os.getloadavg()[0]},
        "results": results,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
