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
        description="Feed FILE (UTF-8 text) through the streaming cache as one user message, in chunks: the model "
        "sees exactly the tokens of the same text sent as a message, in bounded memory, and chunking equals "
        "feeding token by token. Then answer --question(s), or questions read from stdin. Only the sinks and the "
        "last --recent-size tokens are remembered (plus a summary or an index with --memory). The progress bar "
        "moves with every chunk: bytes of the file, characters and tokens fed, tokens/s and the time left; soon after "
        "the start a line estimates the whole run on this device.",
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
        f"[ingested {stats.tokens:,} tokens ({stats.characters:,} characters) in {stats.seconds:.1f} s "
        f"({stats.tokens_per_second:.0f} tok/s)]\n"
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
