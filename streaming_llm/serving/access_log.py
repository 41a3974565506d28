"""One log line per request: time, client, method, path, status, session, tokens, latency.

:class:`AccessLog` is a pure-ASGI middleware (it sees streamed responses end, unlike a function
middleware), logging to the ``streaming_llm.access`` logger at INFO when the response's last byte is
sent (or the client goes away). Handlers report what only they know through the request's state:
``request.state.usage`` (``{"prompt_tokens", "completion_tokens"}``); the session id is read from the
``X-Session-Id`` response header. :func:`configure` attaches a stderr handler in ``text`` or ``json``
form (JSON lines, one object per request)::

    2026-12-02T21:40:00.123Z 127.0.0.1 "POST /v1/chat/completions" 200 session=alice prompt_tokens=31 completion_tokens=64 latency=1.234s
    {"time": "2026-12-02T21:40:00.123Z", "client": "127.0.0.1", "method": "POST", "path": "/v1/chat/completions", "status": 200, "session": "alice", "prompt_tokens": 31, "completion_tokens": 64, "latency_s": 1.234}
"""  # noqa: E501

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger("streaming_llm.access")
FIELDS = ("time", "client", "method", "path", "status", "session", "prompt_tokens", "completion_tokens", "latency_s")


class AccessLog:
    """Pure-ASGI middleware: one ``streaming_llm.access`` record per HTTP request, its fields in ``record.access``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began = time.perf_counter()
        state = scope.setdefault("state", {})
        seen: dict[str, Any] = {"status": None, "session": None, "logged": False}

        def log() -> None:
            if seen["logged"]:
                return
            seen["logged"] = True
            usage = state.get("usage") or {}
            client = scope.get("client")
            entry = {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "client": client[0] if client else None, "method": scope["method"], "path": scope["path"],
                "status": seen["status"], "session": seen["session"], "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "latency_s": round(time.perf_counter() - began, 4),
            }  # fmt: skip
            logger.info(format_text(entry), extra={"access": entry})

        async def logging_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"x-session-id":
                        seen["session"] = value.decode("latin-1")
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log()

        try:
            await self.app(scope, receive, logging_send)
        finally:
            if seen["status"] is None:
                seen["status"] = 500  # the application failed before it answered (uvicorn sends a 500)
            log()  # also when the client went away mid-stream


def format_text(entry: dict[str, Any]) -> str:
    """``TIME CLIENT "METHOD PATH" STATUS session=... prompt_tokens=... completion_tokens=... latency=Ss``."""
    parts = [entry["time"], entry["client"] or "-", f'"{entry["method"]} {entry["path"]}"', str(entry["status"])]
    parts += [f"{name}={entry[name]}" for name in ("session", "prompt_tokens", "completion_tokens") if entry[name]
              is not None]  # fmt: skip
    return " ".join([*parts, f"latency={entry['latency_s']:.3f}s"])


class JsonFormatter(logging.Formatter):
    """Access records as JSON lines (every field of :data:`FIELDS`, null when unknown)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = getattr(record, "access", None)
        if entry is None:
            return json.dumps({"time": self.formatTime(record), "message": record.getMessage()})
        return json.dumps({name: entry[name] for name in FIELDS})


def configure(form: str = "text", stream=None) -> logging.Handler:
    """Send access records to ``stream`` (default stderr) as ``text`` lines or ``json`` lines; returns the handler."""
    if form not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {form!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter("%(message)s"))
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler
