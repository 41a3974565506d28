"""Flags and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers are imported only when a command runs (fast --help)
    from ..runtime.generation import GenerationChunk
    from ..runtime.sampling import SamplingConfig


KV_DTYPES = ("bfloat16", "float16", "float32", "int8", "float8_e4m3")  # = core.quant.KV_DTYPES (fast --help)


def add_kv_dtype_flag(parser) -> None:
    """``--kv-dtype`` (commands whose cache honours it)."""
    parser.add_argument(
        "--kv-dtype", default=None, choices=KV_DTYPES,
        help="how the cache stores keys/values: int8 / float8_e4m3 quantize them with one scale per token and head "
        "(about half the KV memory of bf16); default: the model's dtype",
    )  # fmt: skip


def add_model_flags(parser: argparse.ArgumentParser, recent_size: int = 2000, kv_dtype: bool = False) -> None:
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
        "--quantize", default=None, choices=["int4"],
        help="CPU only, opt-in: int4 weight-only linear layers (per group of 32, PyTorch's CPU int4 kernel); "
        "1.3-2x faster decoding than fp32, perplexity within 1%% (default: off, the weights as loaded)",
    )  # fmt: skip
    group.add_argument("--start-size", type=int, default=4, help="attention-sink tokens kept forever at the start")
    group.add_argument(
        "--recent-size", type=int, default=recent_size, help="most recent tokens kept; older ones are evicted"
    )
    if kv_dtype:
        add_kv_dtype_flag(group)


# Sampling defaults of chat, generate, ingest and demo, chosen by measurement on the embedded model
# (docs/RESULTS.md, "Demo quality"); llama-cli samples by default too. --temperature 0 is greedy.
SAMPLING_DEFAULTS = dict(
    temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1, penalty_window=64,
    dry_multiplier=0.0, dry_base=1.75, dry_allowed_length=2,
)  # fmt: skip


def add_sampling_flags(parser: argparse.ArgumentParser, stop: bool = True, title: str | None = None) -> None:
    """The sampling flags, defaulting to :data:`SAMPLING_DEFAULTS` (``stop=False``: without ``--stop``)."""
    d = SAMPLING_DEFAULTS
    title = title or "sampling (like llama-cli: sampled by default; --temperature 0 is greedy)"
    group = parser.add_argument_group(title)
    group.add_argument("--temperature", type=float, default=d["temperature"], help="0 = greedy; higher = more random")
    group.add_argument("--top-k", type=int, default=d["top_k"], help="sample among the k most likely tokens (0 = off)")
    group.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus sampling threshold (1.0 = off)")
    group.add_argument(
        "--min-p", type=float, default=d["min_p"], help="drop tokens below this fraction of the top one (0 = off)"
    )
    group.add_argument(
        "--repetition-penalty", type=float, default=d["repetition_penalty"],
        help="divide the logits of tokens seen in the last --repeat-last-n tokens, except whitespace and "
        "punctuation (1.0 = off)",
    )  # fmt: skip
    group.add_argument(
        "--repeat-last-n", type=int, default=d["penalty_window"], help="window of the repetition penalty (tokens)"
    )
    group.add_argument(
        "--dry-multiplier", type=float, default=d["dry_multiplier"],
        help="DRY: penalise continuing a repeated sequence of tokens (0 = off)",
    )  # fmt: skip
    group.add_argument("--dry-base", type=float, default=d["dry_base"], help="DRY: growth per extra repeated token")
    group.add_argument(
        "--dry-allowed-length", type=int, default=d["dry_allowed_length"], help="DRY: repeats this long are free"
    )
    group.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling (default: random)")
    if stop:
        group.add_argument("--stop", action="append", default=[], help="stop string (repeatable) (default: none)")


def sampling_config(args: argparse.Namespace, suppress_ids: tuple[int, ...] = ()) -> SamplingConfig:
    """The :class:`SamplingConfig` of the sampling flags (raises ValueError on bad values)."""
    from ..runtime.sampling import SamplingConfig

    return SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, penalty_window=args.repeat_last_n,
        dry_multiplier=args.dry_multiplier, dry_base=args.dry_base, dry_allowed_length=args.dry_allowed_length,
        suppress_ids=suppress_ids, seed=args.seed,
    )  # fmt: skip


def load(args: argparse.Namespace):
    from ..runtime.loading import load_model

    print("Loading model...", file=sys.stderr)
    return load_model(args.model, device=args.device, dtype=args.dtype, quantize=getattr(args, "quantize", None))


def plural(count: int, noun: str) -> str:
    """``"1 token"``, ``"2 tokens"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def status_line(piece: GenerationChunk) -> str:
    return (
        f"[{plural(piece.generated, 'token')} | seen {piece.seen_tokens} | in cache {piece.cached_tokens} | "
        f"evicted {piece.evicted_tokens} | cache {piece.cache_bytes / 2**20:.1f} MiB | "
        f"{piece.tokens_per_second:.1f} tok/s]"
    )


class Timings:
    """Prompt and generation speed of one streamed generation, measured from its pieces (like llama.cpp).

    Call :meth:`start` just before iterating, :meth:`see` on every piece; ``prompt_tokens`` are the tokens
    fed before the first generated one (``seen_before`` is the cache's count when the call began).
    """

    def __init__(self, seen_before: int = 0):
        self.seen_before = seen_before
        self.began = self.first = self.last = 0.0
        self.prompt_tokens = self.generated = 0

    def start(self) -> None:
        self.began = time.perf_counter()

    def see(self, piece: GenerationChunk) -> None:
        now = time.perf_counter()
        if not self.first and piece.token_id is not None:
            self.first = now
            self.prompt_tokens = piece.seen_tokens - self.seen_before
        self.last, self.generated = now, piece.generated

    def summary(self) -> str:
        """``prompt: N tokens, X tok/s | generated: M tokens, Y tok/s | first token after Z s``."""
        if not self.first:
            return "[timings: nothing generated]"
        ttft = self.first - self.began
        decode = self.last - self.first
        rate = f"{(self.generated - 1) / decode:.1f} tok/s" if self.generated > 1 and decode > 0 else "n/a"
        return (
            f"[prompt: {plural(self.prompt_tokens, 'token')}, {self.prompt_tokens / max(ttft, 1e-9):.1f} tok/s | "
            f"generated: {plural(self.generated, 'token')}, {rate} | time to first token: {ttft:.2f} s]"
        )


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a usage error otherwise, before any model is loaded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 means no limit), got {value}")
    return value
