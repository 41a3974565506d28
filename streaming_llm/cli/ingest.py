"""``streaming-llm ingest FILE``: read a long document in constant memory, then answer questions."""

from __future__ import annotations

import argparse
import sys

from .chat import add_session_flags, make_session, repl, reply, stats_text
from .common import load
from .interrupt import StopRequest


def add_parser(subparsers) -> None:
    ingest = subparsers.add_parser(
        "ingest", help="feed a long text file chunk by chunk, then ask questions about it",
        description="Feed FILE through the streaming cache in chunks (progress bar, bounded memory; the result "
        "equals feeding it token by token), then answer --question(s), or questions read from stdin. Only "
        "the sinks and the last --recent-size tokens are remembered (plus a summary with --memory). The progress "
        "bar shows the bytes read of the file's size, the rate and the time left.",
    )  # fmt: skip
    ingest.add_argument("file", help="text file to read")
    ingest.add_argument(
        "--chunk-size", type=int, default=None, help="tokens per forward (default: chosen from free memory; 512 on CPU)"
    )
    ingest.add_argument("--question", "-q", action="append", default=[], help="question to ask (repeatable)")
    add_session_flags(ingest)
    ingest.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load(args)
    session = make_session(args, model, tokenizer)
    stats = session.ingest(args.file, chunk_size=args.chunk_size, progress=True)
    print(
        f"[ingested {stats.tokens:,} tokens in {stats.seconds:.1f} s ({stats.tokens_per_second:.0f} tok/s)]\n"
        f"{stats_text(session.stats())}",
        file=sys.stderr,
    )
    if args.question:
        stop = StopRequest()
        for question in args.question:
            print(f"> {question}")
            reply(session, question, args, stop)
        return 0
    return repl(session, args, model, tokenizer)
