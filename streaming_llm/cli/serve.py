"""``streaming-llm serve``: an OpenAI-compatible HTTP server (chat and text completions)."""

from __future__ import annotations

import argparse
import socket
import sys

from .common import add_model_flags, load


def add_parser(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)",
        description="Serve the model over an OpenAI-compatible API. Conversations that continue a live session "
        "feed only their new message (history is never re-processed); memory is bounded by --max-sessions "
        "fixed-size caches. Needs: pip install 'streaming-llm[server]'.",
    )  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    serve.add_argument("--max-sessions", type=int, default=8, help="live conversations kept")
    serve.add_argument("--name", default="streaming-llm", help="model name reported by /v1/models")
    add_model_flags(serve)
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("error: the server needs FastAPI and uvicorn: pip install 'streaming-llm[server]'", file=sys.stderr)
        return 2
    check_port(args.host, args.port)  # before importing torch and loading the model, which take a while
    from ..server import create_app

    model, tokenizer = load(args)
    app = create_app(model, tokenizer, name=args.name, start_size=args.start_size, recent_size=args.recent_size,
                     max_sessions=args.max_sessions)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


def check_port(host: str, port: int) -> None:
    """Raise ValueError with a clear message if ``host:port`` cannot be listened on (e.g. already in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ValueError(
                f"cannot listen on {host}:{port} ({error.strerror or error}); the port is probably in use by another "
                "server: stop it or pass --port with a free port"
            ) from None
