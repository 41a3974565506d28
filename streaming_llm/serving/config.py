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
    max_session_bytes: int = 1 << 32  # an imported session file (PUT /v1/sessions/{id})


# -- command line -----------------------------------------------------------------------------------------------
def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` flags (besides the model and cache flags); every help line shows its default."""
    d = Limits()
    group = parser.add_argument_group("server")
    flags = [
        ("--host", str, "127.0.0.1", "address to bind; 127.0.0.1 is this machine only"),
        ("--port", int, 8000, "TCP port"),
        ("--name", str, "streaming-llm", "model name reported by /v1/models"),
        ("--max-sessions", _positive, 8, "sessions kept in memory"),
        ("--state-dir", str, None, "folder for durable sessions: every turn saved, sessions beyond --max-sessions "
         "spill to disk, all survive restarts"),
        ("--api-key", str, os.environ.get("STREAMING_LLM_API_KEY"),
         "require 'Authorization: Bearer KEY'; $STREAMING_LLM_API_KEY sets the default"),
        ("--allowed-origins", str, "", "comma-separated browser origins allowed"),
        ("--allowed-hosts", str, "", "extra Host names accepted, comma-separated ('*': any)"),
        ("--max-tokens-cap", _positive, d.max_tokens, "largest max_tokens a request may ask for"),
        ("--max-body-bytes", _positive, d.max_body_bytes, "largest request body in bytes"),
        ("--max-messages", _positive, d.max_messages, "most messages in one request"),
        ("--max-prompt-tokens", _positive, d.max_prompt_tokens, "new tokens one request may feed"),
        ("--max-queue", _positive, d.max_queue, "requests running or waiting before 429"),
        ("--request-timeout", float, d.request_timeout, "seconds per request"),
        ("--batch-rows", int, 0, "continuous batching: up to N sessions decode together in one forward; "
         "0: one forward per session and token"),
        ("--shutdown-timeout", float, 5.0, "seconds to wind down on SIGTERM"),
    ]  # fmt: skip
    for name, kind, default, text in flags:
        shown = "not set" if default in (None, "") and name != "--api-key" else "%(default)s"
        if name == "--api-key":
            shown = "none" if default is None else "set"
        group.add_argument(name, type=kind, default=default, help=f"{text} (default: {shown})")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
