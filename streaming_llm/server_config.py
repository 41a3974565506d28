"""The server's flags and limits, without importing the server (so ``streaming-llm serve --help`` is instant)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Caps that keep one request from taking the server (each exceeded cap is a clear 4xx)."""

    max_tokens: int = 4096  # largest max_tokens a request may ask for
    max_body_bytes: int = 1 << 20  # request body
    max_messages: int = 256  # messages in one request
    max_prompt_tokens: int = 8192  # tokens of new text one request may feed
    max_queue: int = 64  # requests running or waiting (more: 429)
    request_timeout: float = 600.0  # seconds one request may run
    max_session_id: int = 256  # characters


# -- command line -----------------------------------------------------------------------------------------------
def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` flags (besides the model and cache flags)."""
    d = Limits()
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--name", default="streaming-llm", help="model name reported by /v1/models")
    group.add_argument("--max-sessions", type=_positive, default=8, help="sessions kept in memory (default 8)")
    group.add_argument("--state-dir", default=None, help="folder for durable sessions: every turn saved, "
                       "sessions beyond --max-sessions spill to disk, all survive restarts")  # fmt: skip
    group.add_argument(
        "--api-key",
        default=os.environ.get("STREAMING_LLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $STREAMING_LLM_API_KEY, else none)",
    )
    group.add_argument("--allowed-origins", default="", help="comma-separated browser origins allowed (default none)")
    group.add_argument("--allowed-hosts", default="", help="extra Host names accepted, comma-separated ('*': any)")
    group.add_argument("--max-tokens-cap", type=_positive, default=d.max_tokens, help=f"default {d.max_tokens}")
    group.add_argument("--max-body-bytes", type=_positive, default=d.max_body_bytes, help=f"default {d.max_body_bytes}")
    group.add_argument("--max-messages", type=_positive, default=d.max_messages, help=f"default {d.max_messages}")
    group.add_argument(
        "--max-prompt-tokens",
        type=_positive,
        default=d.max_prompt_tokens,
        help=f"new tokens one request may feed (default {d.max_prompt_tokens})",
    )
    group.add_argument(
        "--max-queue",
        type=_positive,
        default=d.max_queue,
        help=f"requests running or waiting before 429 (default {d.max_queue})",
    )
    group.add_argument(
        "--request-timeout",
        type=float,
        default=d.request_timeout,
        help=f"seconds per request (default {d.request_timeout:g})",
    )
    group.add_argument("--batch-rows", type=int, default=0, help="continuous batching: up to N sessions decode "
                       "together in one forward (default 0: one forward per session and token)")  # fmt: skip
    group.add_argument("--shutdown-timeout", type=float, default=5.0, help="seconds to wind down on SIGTERM")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
