"""``streaming-llm generate`` (prompt -> text, optionally endless) and ``streaming-llm demo``."""

from __future__ import annotations

import argparse
import sys

from .common import (
    Timings,
    add_model_flags,
    add_sampling_flags,
    load,
    non_negative_int,
    plural,
    sampling_config,
    status_line,
)
from .interrupt import StopRequest

DEMO_PROMPT = (
    "Write a very long story about a lighthouse keeper who collects the letters that wash ashore. "
    "Tell it chapter by chapter and never stop."
)


def add_parser(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate", help="generate text from a prompt, streamed as it is produced",
        description="Generate text from a prompt, printed as it is produced. Runs far past the model's "
        "context window in constant memory; Ctrl-C stops cleanly. Ends with the cache statistics and the "
        "timings (prompt tokens/s, generated tokens/s, time to first token) on stderr.",
    )  # fmt: skip
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--max-tokens", type=non_negative_int, default=256, help="tokens to generate (0 = endless)")
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    gen.add_argument("--ignore-eos", action="store_true", help="never stop at the end-of-text token")
    gen.add_argument(
        "--stats-every", type=int, default=0, help="print cache statistics every N tokens (0 = at the end)"
    )
    add_model_flags(gen, kv_dtype=True)
    add_sampling_flags(gen)
    gen.set_defaults(run=run)

    demo = subparsers.add_parser(
        "demo", help="stream a long story far past the window, showing the cache staying flat",
        description="Generate a long story with the embedded model and a small window (4 sinks + 256 recent "
        "tokens), printing tokens as they come and, every --stats-every tokens, the cache size: it stays flat "
        "while tokens are evicted. The end-of-text token is ignored, so the story goes on.",
    )  # fmt: skip
    demo.add_argument("--prompt", default=DEMO_PROMPT, help="what to ask for")
    demo.add_argument("--max-tokens", type=non_negative_int, default=1200, help="tokens to generate (0 = endless)")
    demo.add_argument("--stats-every", type=int, default=128, help="print cache statistics every N tokens (0 = off)")
    add_model_flags(demo, recent_size=256)
    add_sampling_flags(demo)
    demo.set_defaults(run=run, raw=False, ignore_eos=True, seed=0, demo=True)


def run(args: argparse.Namespace) -> int:
    from ..runtime.generation import eos_ids, stream_generate

    model, tokenizer = load(args)
    if getattr(args, "demo", False):
        print(demo_header(args), file=sys.stderr, flush=True)
    prompt = args.prompt
    if not args.raw and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    suppress = tuple(sorted(eos_ids(model, tokenizer))) if args.ignore_eos else ()
    pieces = stream_generate(
        model, tokenizer, prompt, start_size=args.start_size, recent_size=args.recent_size,
        max_new_tokens=args.max_tokens or None, sampling=sampling_config(args, suppress), stop=args.stop,
        kv_dtype=getattr(args, "kv_dtype", None),
    )  # fmt: skip
    sizes, piece, stop, timings = set(), None, StopRequest(), Timings()
    with stop.catching():
        timings.start()
        for piece in pieces:
            timings.see(piece)
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            sizes.add(piece.cache_bytes)
            if args.stats_every and piece.generated % args.stats_every == 0 and piece.token_id is not None:
                print(f"\n{status_line(piece)}", file=sys.stderr, flush=True)
            if stop:
                print("\n[stopped by Ctrl-C]", file=sys.stderr)
                break
    if piece is not None:
        reason = piece.finish_reason or "interrupted"
        print(f"\n{status_line(piece)} {memory_line(sizes, piece.evicted_tokens)}; finished: {reason}", file=sys.stderr)
        print(timings.summary(), file=sys.stderr)
    return 0


def memory_line(sizes: set[int], evicted: int) -> str:
    """What the cache's memory did: flat while tokens were evicted (the point), or too short a run to tell."""
    if len(sizes) > 1:
        return f"cache memory: {min(sizes) / 2**20:.1f}..{max(sizes) / 2**20:.1f} MiB"
    if not evicted:
        return f"cache memory: {next(iter(sizes)) / 2**20:.1f} MiB (nothing evicted yet: the window is not full)"
    return f"cache memory: flat at {next(iter(sizes)) / 2**20:.1f} MiB while {plural(evicted, 'token')} were evicted"


def demo_header(args: argparse.Namespace) -> str:
    """What the demo shows, before it starts."""
    length = "endlessly (Ctrl-C stops)" if not args.max_tokens else plural(args.max_tokens, "token")
    every = f"every {args.stats_every} tokens" if args.stats_every else "at the end"
    return (
        f"== streaming-llm demo: a story streamed {length} through a cache of {args.start_size} attention sinks + "
        f"a {args.recent_size}-token window ==\n"
        f"prompt: {args.prompt}\n"
        f"sampling: temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}, min-p {args.min_p}, "
        f"repetition penalty {args.repetition_penalty}, seed {args.seed}. {every.capitalize()} a line shows the "
        "cache: the tokens in it and its memory stay flat while evicted tokens pile up.\n"
    )
