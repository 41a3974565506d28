"""``streaming-llm serve``: an OpenAI-compatible HTTP server (chat and text completions)."""

from __future__ import annotations

import argparse
import socket
import sys

from .common import add_model_flags, add_sampling_flags, load


def add_parser(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)",
        description="Serve the model over an OpenAI-compatible API. Conversations that continue a live session "
        "feed only their new message (history is never re-processed); memory is bounded by --max-sessions "
        "fixed-size caches. Needs: pip install 'streaming-llm[server]'. With --replicas N the same API runs as a Ray "
        "Serve application of N replicas (pip install 'streaming-llm[ray]').",
    )  # fmt: skip
    from ..serving.config import add_server_flags

    add_server_flags(serve)
    add_model_flags(serve, kv_dtype=True)
    add_sampling_flags(serve, stop=False, title="default sampling (of requests that leave a field out; as chat)")
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("fastapi") is None:
        print("error: the server needs FastAPI and uvicorn: pip install 'streaming-llm[server]'", file=sys.stderr)
        return 2
    if args.replicas:
        if any(importlib.util.find_spec(name) is None for name in ("ray", "fsspec", "httpx")):
            print("error: --replicas needs Ray Serve: pip install 'streaming-llm[ray]'", file=sys.stderr)
            return 2
        if args.max_replicas is not None and args.max_replicas < args.replicas:
            print("error: --max-replicas must be >= --replicas", file=sys.stderr)
            return 2
        if args.ray_address is None:
            check_port(args.host, args.port)
        from ..serving.replicas import run as run_replicas

        return run_replicas(args)
    check_port(args.host, args.port)  # before importing torch and loading the model, which take a while
    from ..serving.server import serve

    model, tokenizer = load(args)
    serve(args, model, tokenizer)
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
