"""Flags and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import sys

from ..generation import GenerationChunk
from ..sampling import SamplingConfig


def add_model_flags(parser: argparse.ArgumentParser, recent_size: int = 2000) -> None:
    group = parser.add_argument_group("model and cache")
    group.add_argument(
        "--model", default=None,
        help="local Hugging Face model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct, "
        "converted once into ~/.cache/streaming-llm; nothing is downloaded)",
    )  # fmt: skip
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available, else cpu)")
    group.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)"
    )
    group.add_argument(
        "--start-size", type=int, default=4, help="attention-sink tokens kept forever at the start (default 4)"
    )
    group.add_argument(
        "--recent-size", type=int, default=recent_size,
        help=f"most recent tokens kept; older ones are evicted (default {recent_size})",
    )  # fmt: skip


def add_sampling_flags(parser: argparse.ArgumentParser, temperature: float = 0.0) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    group.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0 = off)")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats (1.0 = off)")
    group.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )  # fmt: skip


def load(args: argparse.Namespace):
    from ..loading import load_model

    print("Loading model...", file=sys.stderr)
    return load_model(args.model, device=args.device, dtype=args.dtype)


def status_line(piece: GenerationChunk) -> str:
    return (
        f"[{piece.generated} tokens | seen {piece.seen_tokens} | in cache {piece.cached_tokens} | "
        f"evicted {piece.evicted_tokens} | cache {piece.cache_bytes / 2**20:.1f} MiB | "
        f"{piece.tokens_per_second:.1f} tok/s]"
    )
