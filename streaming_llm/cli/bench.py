"""``streaming-llm bench``: decode latency, tokens/s and cache memory, optionally tensor-parallel.

With ``--tp N`` the command relaunches itself under ``torchrun`` (one process per GPU, or per CPU
process with gloo when there is no GPU); each rank loads the model with transformers' tensor
parallelism (``tp_plan="auto"``) and holds only its own KV heads in its own streaming cache.
Positions and eviction are decided identically on every rank, so nothing is exchanged for the
cache: the only communication is the model's own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ..eval.shapes import RANDOM_SHAPES
from .common import add_model_flags

DESCRIPTION = """Decode latency, tokens/s and cache memory of the streaming cache, after streaming --contexts
tokens; --compare also measures transformers' DynamicCache.

With --tp N the command relaunches itself under torchrun (one process per GPU, or per CPU process
with gloo when there is no GPU); each rank loads the model with transformers' tensor parallelism and
holds only its own KV heads in its own streaming cache. Every rank decides positions and eviction
identically, so nothing is exchanged for the cache: the only communication is the model's own."""


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench", help="decode latency and memory of the streaming cache (optionally tensor-parallel: --tp N)",
        description=DESCRIPTION,
    )  # fmt: skip
    bench.add_argument("--tp", type=int, default=1, help="tensor-parallel processes (GPUs); relaunches under torchrun")
    bench.add_argument(
        "--random", choices=sorted(RANDOM_SHAPES), help="a random Llama of this shape instead of --model"
    )
    bench.add_argument("--contexts", type=int, nargs="+", default=[4096], help="tokens streamed before timing")
    bench.add_argument("--decode", type=int, default=64, help="timed decode steps")
    bench.add_argument("--chunk", type=int, default=2048, help="tokens per forward while streaming up")
    bench.add_argument("--compare", action="store_true", help="also measure transformers' DynamicCache")
    bench.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    add_model_flags(bench)
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.random:
        args.model = _random_model(args)
    if args.tp > 1 and "RANK" not in os.environ:
        code = _relaunch(args)
        if code == 0:  # the single-device row of the same run, measured after the ranks released the GPUs
            print(f"single device (same run, for comparison with --tp {args.tp}):", file=sys.stderr)
            code = _measure(args)
        return code
    return _measure(args)


def _random_model(args: argparse.Namespace) -> str:
    """Save a seeded random Llama once, so that every rank loads the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..runtime.loading import home

    path = home() / f"random-{args.random}"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        dtype = torch.bfloat16 if args.random == "llama3-8b" else torch.float32
        LlamaForCausalLM(LlamaConfig(**RANDOM_SHAPES[args.random])).to(dtype).save_pretrained(path)
    return str(path)


def _relaunch(args: argparse.Namespace) -> int:
    argv = [a for a in sys.argv[1:] if a != "--random" and a not in RANDOM_SHAPES]
    argv += ["--model", args.model] if args.random else []
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.tp), "--master_port",
               str(_free_port()), "-m", "streaming_llm.cli", *argv]  # fmt: skip
    print("$ " + " ".join(command), file=sys.stderr)
    return subprocess.run(command).returncode


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, DynamicCache

    from ..core.attention import install
    from ..core.cache import StreamingCache
    from ..eval.benchmark import measure_decode
    from ..runtime.loading import load_model, pick_dtype, resolve

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not torch.cuda.is_available() and not dist.is_initialized():
            dist.init_process_group("gloo")  # CPU ranks: transformers' tensor parallelism over gloo
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = pick_dtype(args.dtype, device)
        model = AutoModelForCausalLM.from_pretrained(resolve(args.model), tp_plan="auto", dtype=dtype).eval()
    elif not (Path(resolve(args.model)) / "tokenizer_config.json").exists() and Path(resolve(args.model)).is_dir():
        # A saved random model (--random) has weights and a config but no tokenizer; none is needed here.
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = AutoModelForCausalLM.from_pretrained(resolve(args.model), dtype=pick_dtype(args.dtype, device))
        model = model.to(device).eval()
    else:
        model, _ = load_model(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    install(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    methods = {"streaming": lambda: StreamingCache(model.config, args.start_size, args.recent_size)}
    if args.compare:
        methods["dynamic"] = lambda: DynamicCache(config=model.config)
    rows = []
    for context in args.contexts:
        for method, make in methods.items():
            row = measure_decode(model, make, context, args.decode, args.chunk)
            tokens = row.pop("tokens")
            if world > 1:  # every rank must have generated the same tokens
                gathered = [None] * world
                dist.all_gather_object(gathered, tokens)
                row["tokens_identical_on_all_ranks"] = all(g == tokens for g in gathered)
            rows.append({"method": method, "tp": world, **row})
    if rank == 0:
        for row in rows:
            print(json.dumps(row))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"command": "streaming-llm " + " ".join(sys.argv[1:]), "rows": rows}, f, indent=2)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
