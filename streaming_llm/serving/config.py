"""The server's flags and limits, without importing the server (so ``streaming-llm serve --help`` is instant)."""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path


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
    body_timeout: float = 30.0  # seconds to receive a whole request body (slower: 408)


# -- command line -----------------------------------------------------------------------------------------------
LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOG_FORMATS = ("text", "json")


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` flags (besides the model, cache and sampling flags); every help line shows its default."""
    d = Limits()
    group = parser.add_argument_group("server")
    flags = [
        ("--host", str, "127.0.0.1", "address to bind; 127.0.0.1 is this machine only (any other address without "
         "--api-key is warned about loudly)"),
        ("--port", int, 8000, "TCP port"),
        ("--name", str, "streaming-llm", "model name served (listed by /v1/models); a request naming any other "
         "model, not an alias, gets 404 model_not_found"),
        ("--rows", _positive, 8, "sessions resident on the device at once, decoded together in one forward (rows of "
         "one cache); more live sessions spill to host memory and come back on demand"),
        ("--pinned-capacity", _positive, 256, "longest system prompt pinned beside the sinks (tokens; a longer one "
         "pins its first tokens)"),
        ("--max-sessions", _positive, 16, "sessions kept in memory (rows and host snapshots)"),
        ("--state-dir", str, None, "folder for durable sessions: every turn saved, sessions beyond --max-sessions "
         "spill to disk, all survive restarts; with --replicas, the state all replicas share: a folder every node "
         "sees or an fsspec URL (s3://bucket/prefix)"),
        ("--api-key", api_key, os.environ.get("STREAMING_LLM_API_KEY"),
         "require 'Authorization: Bearer KEY' on every endpoint but /health; $STREAMING_LLM_API_KEY sets the "
         "default; an empty key is an error"),
        ("--api-keys-file", str, None, "file of further API keys, one per line, 'TENANT:KEY' or 'KEY' ('#' "
         "comments): each key is a tenant that lists, reads, continues and deletes only its own sessions (others' "
         "are a 404)"),
        ("--allowed-origins", str, "", "comma-separated browser origins allowed"),
        ("--allowed-hosts", str, "", "extra Host names accepted, comma-separated ('*': any)"),
        ("--max-tokens-cap", _positive, d.max_tokens, "largest max_tokens a request may ask for"),
        ("--max-body-bytes", _positive, d.max_body_bytes, "largest request body in bytes"),
        ("--max-messages", _positive, d.max_messages, "most messages in one request"),
        ("--max-prompt-tokens", _positive, d.max_prompt_tokens, "new tokens one request may feed"),
        ("--max-queue", _positive, d.max_queue, "requests running or waiting before 429"),
        ("--request-timeout", float, d.request_timeout, "seconds per request"),
        ("--shutdown-timeout", float, 5.0, "seconds to wind down on SIGTERM"),
        ("--body-timeout", _positive_float, d.body_timeout, "seconds a client may take to send a request body "
         "(slower: 408)"),
        ("--max-connections", _positive, None, "most open connections and requests at once (more: 503); not set: "
         "no cap"),
        ("--header-timeout", _positive_float, 10.0, "seconds a connection may take to send a request head, from its "
         "opening or its previous response (slower: 408 and closed)"),
        ("--max-connections-per-client", _positive, 32, "most connections open at once from one client address "
         "(more: 429 and closed)"),
    ]  # fmt: skip
    _add(group, flags)
    group.add_argument("--no-web", action="store_true", help="do not serve the chat page at / (default: served)")
    group.add_argument(
        "--memory", choices=("retrieval",), default=None,
        help="memory beyond the window for every session: 'retrieval' indexes each session's evicted text (SQLite "
        "FTS5, saved with the session) and pins the best passages before each user turn (default: none)",
    )  # fmt: skip
    group.add_argument(
        "--model-alias", action="append", default=[], metavar="NAME",
        help="another model name to answer to (repeatable), e.g. the name a client is configured with "
        "(default: none)",
    )  # fmt: skip
    group.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text",
        help="request log on stderr, one line per request (time, method, path, status, session, prompt and "
        "completion tokens, latency): text or json (JSON lines)",
    )  # fmt: skip

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
        shown = "not set" if default in (None, "") else "%(default)s"
        if name == "--api-key":
            shown = "none" if default is None else "set"
        if "(default:" in text:
            shown = None
        group.add_argument(
            name, type=kind, default=default, help=text if shown is None else f"{text} (default: {shown})"
        )


def api_key(text: str) -> str:
    """argparse type of ``--api-key``: a non-empty key without surrounding whitespace."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            'the API key is empty (an unset variable in --api-key "$KEY", or an empty $STREAMING_LLM_API_KEY?): '
            "set a non-empty key, or leave out both the flag and the variable to serve without a key"
        )
    if text != text.strip():
        raise argparse.ArgumentTypeError("the API key starts or ends with whitespace, which no client can send")
    return text


def read_api_keys(path: str | os.PathLike) -> dict[str, str]:
    """The keys of ``--api-keys-file``: ``{key: tenant}``. A line is ``TENANT:KEY`` or ``KEY`` (its tenant is then
    ``key-`` and 12 hex digits of its SHA-256); blank lines and ``#`` comments are skipped.

    Raises:
        ValueError: an unreadable file, no key, a key given twice, or a tenant that is not printable ASCII.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the API keys file: {type(error).__name__}") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tenant, _, key = line.partition(":") if ":" in line else ("", "", line)
        tenant, key = tenant.strip(), key.strip()
        tenant = tenant or f"key-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        if not key or not all(" " < c <= "~" for c in key + tenant):
            raise ValueError(f"line {number} of the API keys file: a key and tenant must be printable ASCII "
                             "without spaces")  # fmt: skip
        if key in keys:
            raise ValueError(f"line {number} of the API keys file: a key given twice")
        keys[key] = tenant
    if not keys:
        raise ValueError("the API keys file has no key")
    return keys


def exposure_warning(host: str, key: object) -> str | None:
    """A loud warning when ``host`` reaches beyond this machine and no API key is set (else None)."""
    if key or _is_loopback(host):
        return None
    return (
        f"WARNING: serving on {host} without an API key: anyone who can reach this address can use the model and "
        "read or delete every session. Set one with --api-key or $STREAMING_LLM_API_KEY, or bind 127.0.0.1."
    )


def _is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return name == "localhost"


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
