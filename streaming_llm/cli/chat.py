"""``streaming-llm chat``: an endless conversation, streamed, with /save /load /reset /stats."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import Timings, add_model_flags, add_sampling_flags, load, non_negative_int, sampling_config
from .interrupt import StopRequest

HELP = """commands:
  /save PATH   save the session (atomic; restore it later with /load or --load)
  /load PATH   replace the session by a saved one (the current one is kept if loading fails)
  /reset       start a new conversation (same system prompt)
  /stats       tokens seen, evicted, in cache, cache size, and the last reply's timings
  /help        this text
  /quit        leave (Ctrl-D works too); Ctrl-C stops a reply early"""


def add_parser(subparsers) -> None:
    chat = subparsers.add_parser(
        "chat", help="talk with the model forever, in constant memory",
        description="An endless chat: every turn feeds only its own tokens, old ones are evicted from the "
        "window, the system prompt stays pinned. Type a message, or a command:\n" + HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_session_flags(chat)
    chat.set_defaults(run=run)


def add_session_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("conversation")
    group.add_argument("--system", default=None, help="system prompt")
    group.add_argument("--no-pin-system", action="store_true", help="let the system prompt be evicted too")
    group.add_argument(
        "--max-tokens", type=non_negative_int, default=512, help="longest reply in tokens (0 = no limit)"
    )
    group.add_argument(
        "--verbose", "-v", action="store_true",
        help="print the timings after each reply (prompt tok/s, generated tok/s, time to first token)",
    )  # fmt: skip
    group.add_argument(
        "--memory", nargs="?", const="hybrid", default=None, choices=("hybrid", "retrieval"),
        help="memory beyond the window: 'hybrid' (the default when the flag is bare) summarises evicted text with "
        "the model and pins the summary (slower); 'retrieval' indexes evicted text (SQLite FTS5) and pins the "
        "passages that best match each message",
    )  # fmt: skip
    group.add_argument("--load", default=None, metavar="PATH", help="resume a session saved with /save")
    add_model_flags(parser, kv_dtype=True)
    add_sampling_flags(parser)


def make_session(args: argparse.Namespace, model, tokenizer):
    from ..sessions.memory import HybridMemory
    from ..sessions.retrieval import RetrievalMemory
    from ..sessions.session import StreamingSession

    memory = {"hybrid": HybridMemory, "retrieval": RetrievalMemory}[args.memory]() if args.memory else None
    if args.load:
        kv = {} if args.kv_dtype is None else {"kv_dtype": args.kv_dtype}  # default: as the file was saved
        return StreamingSession.load(args.load, model, tokenizer, memory=memory, **kv)
    return StreamingSession(
        model, tokenizer, args.system, start_size=args.start_size, recent_size=args.recent_size,
        pin_system_prompt=not args.no_pin_system, sampling=sampling_config(args), memory=memory,
        kv_dtype=args.kv_dtype,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load(args)
    session = make_session(args, model, tokenizer)
    return repl(session, args, model, tokenizer)


def reply(session, message: str, args: argparse.Namespace, stop: StopRequest) -> Timings:
    timings = Timings(session.stats().seen_tokens)
    with stop.catching():
        timings.start()
        for piece in session.send(message, max_new_tokens=args.max_tokens or None, stop=tuple(args.stop)):
            timings.see(piece)
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            if stop:
                sys.stdout.write(" [stopped]")
                break
    sys.stdout.write("\n")
    sys.stdout.flush()
    if getattr(args, "verbose", False):
        print(timings.summary(), file=sys.stderr, flush=True)
    return timings


def repl(session, args: argparse.Namespace, model, tokenizer, lines=None) -> int:
    """Read messages and commands until /quit or end of input."""
    interactive = sys.stdin.isatty()
    stop, timings = StopRequest(), None
    if interactive:
        print("Type a message, /help for commands, /quit to leave.", file=sys.stderr)
    for line in lines if lines is not None else _read_lines(interactive):
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            session, done = command(line, session, args, model, tokenizer, timings)
            if done:
                break
            continue
        timings = reply(session, line, args, stop)
    return 0


def command(line: str, session, args, model, tokenizer, timings: Timings | None = None):
    """Run one slash command; return ``(session, quit?)``."""
    from ..sessions.persistence import SessionFileError
    from ..sessions.session import StreamingSession

    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/quit", "/exit"):
        return session, True
    if name == "/help":
        print(HELP)
    elif name == "/stats":
        print(stats_text(session.stats()))
        if timings is not None:
            print(timings.summary())
    elif name == "/reset":
        args.load = None
        session = make_session(args, model, tokenizer)
        print("[new conversation]")
    elif name == "/save":
        folder = Path(argument).expanduser().parent
        if not argument:
            print("usage: /save PATH", file=sys.stderr)
        elif not folder.is_dir():
            print(f"error: cannot save to {argument}: the folder {folder} does not exist; create it first "
                  "or pick another path (nothing was saved)", file=sys.stderr)  # fmt: skip
        else:
            print(f"[saved to {session.save(argument)}]")
    elif name == "/load":
        try:
            session = StreamingSession.load(argument, model, tokenizer, memory=session.memory)
            print(f"[loaded {argument}: {session.stats().turns} turns, {session.stats().seen_tokens} tokens]")
        except (SessionFileError, FileNotFoundError) as error:
            print(f"error: {error} (the current conversation is unchanged)", file=sys.stderr)
    else:
        print(f"unknown command {name}; /help lists them", file=sys.stderr)
    return session, False


def stats_text(stats) -> str:
    """One human-readable line for :class:`~streaming_llm.sessions.session.SessionStats`."""
    line = (
        f"[turns {stats.turns} | seen {stats.seen_tokens:,} tokens | in cache {stats.cached_tokens:,} of "
        f"{stats.capacity:,} | evicted {stats.evicted_tokens:,} | pinned {stats.pinned_tokens:,}"
    )
    if stats.summary_tokens:
        line += f" | summary {stats.summary_tokens:,}"
    return line + f" | cache {stats.cache_bytes / 2**20:.1f} MiB]"


def _read_lines(interactive: bool):
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and line == "":
            return
        yield line
