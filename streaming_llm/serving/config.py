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
         "spill to disk, all survive restarts; with --replicas, the state all replicas share: a folder every node "
         "sees or an fsspec URL (s3://bucket/prefix)"),
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
    _add(group, flags)
    replicas = parser.add_argument_group("replicas (Ray Serve; pip install 'streaming-llm[ray]')")
    _add(replicas, [
        ("--replicas", _non_negative, 0, "run N replicas of the server on Ray Serve, each with its own model copy, "
         "sessions sticking to one replica and shared through --state-dir; 0: this process only"),
        ("--max-replicas", _positive, None, "autoscale between --replicas and this on live sessions per replica"),
        ("--target-sessions", _positive_float, None, "live sessions per replica the autoscaler aims at "
         "(default: half of --max-sessions)"),
        ("--ray-address", str, None, "join this Ray cluster ('auto': the one on this machine; ray://host:10001: a "
         "remote one, e.g. KubeRay); not set: start a local cluster"),
        ("--replica-cpus", _positive_float, 1.0, "CPUs Ray reserves for each replica"),
        ("--replica-gpus", _non_negative_float, None, "GPUs per replica (default: 1 with --device cuda, else 0)"),
        ("--drain-timeout", _positive_float, 60.0, "seconds a replica being removed waits for its running turns"),
    ])  # fmt: skip


def _add(group: argparse._ArgumentGroup, flags: list[tuple]) -> None:
    for name, kind, default, text in flags:
        shown = "not set" if default in (None, "") and name != "--api-key" else "%(default)s"
        if name == "--api-key":
            shown = "none" if default is None else "set"
        if "(default:" in text:
            shown = None
        group.add_argument(
            name, type=kind, default=default, help=text if shown is None else f"{text} (default: {shown})"
        )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value
