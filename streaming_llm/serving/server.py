"""An OpenAI-compatible HTTP server over streaming sessions (``streaming-llm serve``).

Needs the optional dependencies ``fastapi`` and ``uvicorn`` (``pip install 'streaming-llm[server]'``).

Handlers parse and check requests (strict types, bounds, caps, unsupported fields named in a 400),
then hand all model work to one :class:`~streaming_llm.serving.jobs.Engine`, which interleaves sessions one
token at a time. Sessions:

- A chat request names its session with the ``X-Session-Id`` header (or the ``user`` field). For a
  known session it may send only its new messages, or the whole history (recognised by a hash chain;
  only the new messages are fed). A history whose system message contradicts the session gets a 409.
  Without an id, a request that extends a conversation the server has seen continues it (hash chain
  of the messages); anything else starts a new session. The id is returned in ``X-Session-Id``.
- With ``state_dir`` every completed (or cancelled) turn is saved atomically before the response
  completes; sessions beyond ``max_sessions`` leave memory least recently used first and come back
  from disk on demand; after a crash every session continues from its last saved turn.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(``"stream": true`` for server-sent events), ``GET /v1/sessions``, ``GET|DELETE /v1/sessions/{id}``,
``GET /v1/sessions/{id}/export`` (the session file) and ``PUT /v1/sessions/{id}`` (import one, checked
as on load), so that a session can move between servers.
Errors always have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..core.attention import install
from ..core.cache import StreamingCache
from ..core.slots import BatchedDecoder, SlotCache
from ..runtime.generation import GenerationChunk, stream_generate
from ..sessions.persistence import SessionFileError
from ..sessions.session import SessionBrokenError, StreamingSession
from .config import Limits
from .guard import Guard
from .jobs import BatchingEngine, Done, Engine, EngineStopped, Job, JobCancelled, JobTimeout, QueueFull
from .schemas import ChatRequest, CompletionRequest, Message, RequestError, Sampling, error_response, parse_body
from .store import Live, SessionStore, chain

log = logging.getLogger(__name__)
FINISH = {"eos": "stop", "stop": "stop", "length": "length", None: "stop"}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


# -- the application ------------------------------------------------------------------------------------------
class Server:
    """What the handlers share: model, store, engine, limits and settings."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, name: str, start_size: int,
                 recent_size: int, max_sessions: int, state_dir: str | os.PathLike | None, limits: Limits,
                 engine: Engine | None = None, batch_rows: int = 0):  # fmt: skip
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.start_size, self.recent_size, self.limits = start_size, recent_size, limits
        self.store = SessionStore(model, tokenizer, max_sessions, state_dir)
        self.slots: SlotCache | None = None
        if batch_rows < 0:
            raise ValueError(f"batch_rows must be >= 0 (0: no batching), got {batch_rows}.")
        if batch_rows and engine is None:
            install(model)
            self.slots = SlotCache(model.config, batch_rows, start_size, recent_size, dtype=model.dtype,
                                   device=model.device)  # fmt: skip
            engine = BatchingEngine(BatchedDecoder(model, self.slots), max_queue=limits.max_queue)
        self.engine = engine or Engine(max_queue=limits.max_queue)
        self.resumed = 0  # requests that continued a session already in memory or on disk

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_prompt(self, texts: list[str]) -> None:
        total = sum(self.count(t) for t in texts)
        if total > self.limits.max_prompt_tokens:
            raise RequestError(400, f"The new text is {total} tokens; this server takes at most "
                                    f"{self.limits.max_prompt_tokens} per request (--max-prompt-tokens). Send long "
                                    "documents over several requests of one session.", param="messages")  # fmt: skip

    # -- work run by the engine (worker thread) --------------------------------------------------------------
    def anonymous_id(self, messages: list[Message]) -> str:
        """The session a request without an id continues (by the digest of its history), or a new id."""
        digest = ""
        for message in messages[:-1]:
            digest = chain(digest, message.kind, message.text)
        found = self.store.find_by_digest(digest) if len(messages) > 1 else None
        return found or f"session-{uuid.uuid4().hex}"

    def _borrow_row(self, live: Live) -> int | None:
        """With batching: move the session's cache into a free row of the slot cache (None: it decodes alone,
        e.g. all rows are taken or its system prompt is pinned beyond ``start_size``)."""
        cache = live.session.cache
        slots = self.slots
        if slots is None or not slots.free or live.session.memory is not None:
            return None
        if (cache.start_size, cache.recent_size, cache.segment_capacity) != (
            slots.start_size, slots.recent_size, slots.segment_capacity
        ):  # fmt: skip
            return None
        b = slots.assign(state=cache.state() if cache.seen_tokens else None)
        live.session.cache = slots.row(b)
        self.engine.rows[live.id] = b
        return b

    def _return_row(self, live: Live, b: int | None) -> None:
        """Move the session's cache out of row ``b`` (back to its own cache) and free the row."""
        if b is None or self.slots is None:
            return
        self.engine.rows.pop(live.id, None)
        slots, row = self.slots, self.slots.row(b)
        try:
            if row.seen_tokens:
                live.session.cache = StreamingCache.from_state(self.model.config, *row.state())
            else:
                live.session.cache = StreamingCache(self.model.config, slots.start_size, slots.recent_size,
                                                    slots.segment_capacity)  # fmt: skip
        finally:
            self.slots.release(b)

    def chat_work(self, body: ChatRequest, session_id: str, explicit: bool) -> Iterator[object]:
        live, created = self._resolve(body.messages, session_id)
        row = self._borrow_row(live)
        try:
            yield from self._chat(body, live, created)
        finally:
            self._return_row(live, row)

    def _chat(self, body: ChatRequest, live: Live, created: bool) -> Iterator[object]:
        messages = body.messages
        session = live.session
        self.resumed += not created
        new = self._new_messages(live, messages)
        self.check_prompt([m.text for m in new])
        seen = 0 if created else session.cache.seen_tokens  # a new session's system prompt counts too
        generated, text, stream, done, failed = 0, [], None, False, False
        digest, count = live.digest, live.messages
        try:
            for message in new[:-1]:
                session.add_message(message.kind, message.text)
                digest, count = chain(digest, message.kind, message.text), count + 1
            digest, count = chain(digest, "user", new[-1].text), count + 1
            session.use_sampling(body.config())
            stream = session.send(new[-1].text, body.max_tokens or min(256, self.limits.max_tokens), body.stops())
            for piece in stream:
                generated += piece.token_id is not None
                text.append(piece.text)
                yield piece
            done = True
        except GeneratorExit:  # cancelled: the turn is closed below and kept
            raise
        except BaseException:
            failed = True
            self.store.discard(live.id)  # the file (last completed turn) stays the truth
            raise
        finally:
            if stream is not None:
                stream.close()  # closes the turn consistently, as far as it got
            if not failed and not session.broken and count > live.messages:
                self.store.update_digest(live, chain(digest, "assistant", "".join(text)), count + 1)
                self.store.put(live)
                self.store.persist(live)
        if done:
            processed = session.cache.seen_tokens - seen
            yield Done({"prompt_tokens": max(processed - generated, 0), "completion_tokens": generated}, live.id)

    def _resolve(self, messages: list[Message], session_id: str) -> tuple[Live, bool]:
        """The session (found, restored from disk, or new with the request's system prompt) and whether it is new."""
        try:
            live = self.store.get(session_id)
        except SessionFileError as problem:
            raise RequestError(
                409,
                f"The stored session {session_id!r} cannot be used: {problem} Delete it "
                "(DELETE /v1/sessions/{id}) to start over.",
                code="session_unreadable",
            ) from None
        if live is not None:
            return live, False
        system = messages[0] if messages[0].kind == "system" else None
        session = StreamingSession(self.model, self.tokenizer, system.text if system else None,
                                   start_size=self.start_size, recent_size=self.recent_size)  # fmt: skip
        live = Live(session_id, session)
        if system is not None:
            live.digest, live.messages = chain("", "system", system.text), 1
        return live, True

    def _new_messages(self, live: Live, messages: list[Message]) -> list[Message]:
        """Which of ``messages`` the session has not seen.

        A request that starts with a system message carries the whole history: it must extend what the
        session has seen (409 otherwise). Otherwise, when its first messages are exactly the session's
        history they are skipped; else all of them are new.
        """
        known = live.messages
        if known == 0:
            return messages
        digest = ""
        for message in messages[:known]:
            digest = chain(digest, message.kind, message.text)
        if len(messages) > known and digest == live.digest:
            return messages[known:]  # the whole history was resent: feed only what is new
        if messages[0].kind == "system":
            raise RequestError(409, f"These messages contradict session {live.id!r} ({known} messages so far): send "
                                    "only the new messages, or the exact history followed by new ones, or DELETE the "
                                    "session to start over.", param="messages", code="history_mismatch")  # fmt: skip
        return messages  # only new messages

    def completion_work(self, body: CompletionRequest) -> Iterator[object]:
        self.check_prompt([body.prompt])
        prompt_tokens, generated = self.count(body.prompt), 0
        for piece in stream_generate(
            self.model, self.tokenizer, body.prompt, start_size=self.start_size, recent_size=self.recent_size,
            max_new_tokens=body.max_tokens or 16, sampling=body.config(), stop=body.stops(),
        ):  # fmt: skip
            generated += piece.token_id is not None
            yield piece
        yield Done({"prompt_tokens": prompt_tokens, "completion_tokens": generated})


def create_app(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, name: str = "streaming-llm",
               start_size: int = 4, recent_size: int = 2000, max_sessions: int = 8,
               state_dir: str | os.PathLike | None = None, api_key: str | None = None,
               allowed_origins: tuple[str, ...] = (), allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost",
               "::1"), limits: Limits | None = None, shutdown_timeout: float = 5.0,
               batch_rows: int = 0) -> FastAPI:  # fmt: skip
    """The FastAPI application.

    Args:
        model, tokenizer: What to serve (the model is switched to streaming attention).
        name: Model name reported by ``/v1/models``.
        start_size, recent_size: Cache sizes of every session.
        max_sessions: Sessions kept in memory (more go to ``state_dir``, or are dropped without it).
        state_dir: Folder for durable sessions (None: in memory only).
        api_key: When set, every request but ``/health`` needs ``Authorization: Bearer <api_key>``.
        allowed_origins: Browser origins allowed to call (``*`` for any); requests from other origins get 403.
        allowed_hosts: Accepted ``Host`` header names (DNS-rebinding protection; ``*`` for any).
        limits: Caps (:class:`Limits`).
        shutdown_timeout: Seconds to finish or cancel in-flight work at shutdown.
        batch_rows: Continuous batching: up to this many sessions decode together in one forward (their
            caches live as rows of one :class:`~streaming_llm.core.slots.SlotCache` while a request runs).
            0: one forward per session and token.
    """
    limits = limits or Limits()
    server = Server(model, tokenizer, name=name, start_size=start_size, recent_size=recent_size,
                    max_sessions=max_sessions, state_dir=state_dir, limits=limits, batch_rows=batch_rows)  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.engine.shutdown, shutdown_timeout)
        server.store.close()

    app = FastAPI(title="streaming-llm", description=__doc__, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Guard, api_key=api_key, origins=tuple(allowed_origins), hosts=tuple(allowed_hosts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, problem: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(problem.status_code, "invalid_request_error")
        message = {404: f"No such endpoint: {request.method} {request.url.path}.",
                   405: f"Method {request.method} is not allowed on {request.url.path}."}.get(
            problem.status_code, str(problem.detail))  # fmt: skip
        return error_response(problem.status_code, message, kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, problem: RequestValidationError):
        return error_response(400, f"Invalid request: {problem.errors()}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, problem: Exception):
        log.exception("internal error")
        return error_response(500, f"Internal server error ({type(problem).__name__}).", "server_error")

    async def read_body(request: Request, schema: type[BaseModel]):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise RequestError(415, f"Send the body as JSON with 'Content-Type: application/json' (got {kind!r}).")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise RequestError(413, f"The body is {declared} bytes; the limit is {limits.max_body_bytes}.")
        raw = bytearray()
        async for block in request.stream():
            raw += block
            if len(raw) > limits.max_body_bytes:
                raise RequestError(413, f"The body is over the limit of {limits.max_body_bytes} bytes.")
        return parse_body(bytes(raw), schema)

    def check_common(body: Sampling) -> None:
        if body.max_tokens is not None and body.max_tokens > limits.max_tokens:
            raise RequestError(400, f"max_tokens={body.max_tokens} is over this server's cap of {limits.max_tokens} "
                                    "(--max-tokens-cap).", param="max_tokens")  # fmt: skip

    async def submit(session_id: str | None, work) -> JSONResponse | object:
        deadline = time.monotonic() + limits.request_timeout
        try:
            ticket = server.engine.submit(Job(session_id, work, deadline))
        except QueueFull as problem:
            return error_response(429, str(problem), "rate_limit_error", code="queue_full")
        except EngineStopped as problem:
            return error_response(503, str(problem), "server_error", code="shutting_down")
        return ticket

    async def respond(request: Request, schema: type[BaseModel], kind: str):
        try:
            body = await read_body(request, schema)
            check_common(body)
            if kind == "chat":
                if body.messages[-1].kind != "user":
                    raise RequestError(400, "The last message must come from the user.", param="messages")
                if len(body.messages) > limits.max_messages:
                    raise RequestError(400, f"{len(body.messages)} messages is over the limit of "
                                            f"{limits.max_messages} (--max-messages); with X-Session-Id send only "
                                            "the new ones.", param="messages")  # fmt: skip
                session_id = request.headers.get("x-session-id") or body.user
                if session_id is not None and not 0 < len(session_id) <= limits.max_session_id:
                    raise RequestError(400, f"A session id must have 1 to {limits.max_session_id} characters.",
                                       param="X-Session-Id")  # fmt: skip
                explicit = session_id is not None
                lane = session_id if explicit else server.anonymous_id(body.messages)
                work = lambda: server.chat_work(body, lane, explicit)  # noqa: E731
            else:
                work, lane = (lambda: server.completion_work(body)), None
        except RequestError as problem:
            return failure(problem)
        ticket = await submit(lane, work)
        if isinstance(ticket, JSONResponse):
            return ticket
        ident, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        events = ticket.events()
        watcher = asyncio.create_task(_watch_disconnect(request, ticket))
        try:
            first = await anext(events)
        except BaseException:
            ticket.cancel("client disconnected")
            watcher.cancel()
            raise
        if isinstance(first, BaseException):
            watcher.cancel()
            return failure(first)
        if body.stream:
            watcher.cancel()
            stream = _sse(server, ticket, events, first, body, ident, created, kind)
            headers = {"X-Session-Id": lane} if lane else None
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        try:
            pieces, final = [first] if isinstance(first, GenerationChunk) else [], first
            while not isinstance(final, Done | BaseException):
                final = await anext(events)
                if isinstance(final, GenerationChunk):
                    pieces.append(final)
        finally:
            ticket.cancel("client disconnected")  # no-op once finished
            watcher.cancel()
        if isinstance(final, BaseException):
            return failure(final)
        text = "".join(p.text for p in pieces)
        choice = {"index": 0, "finish_reason": FINISH[pieces[-1].finish_reason if pieces else None], "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text})
        usage = {**final.usage, "total_tokens": final.usage["prompt_tokens"] + final.usage["completion_tokens"]}
        headers = {"X-Session-Id": final.session_id} if final.session_id else None
        return JSONResponse({
            "id": ident, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
            "model": server.name, "choices": [choice], "usage": usage,
        }, headers=headers)  # fmt: skip

    @app.get("/health")
    def health():
        health = {"status": "ok", "sessions_in_memory": len(server.store.live), "load": server.engine.load,
                  "resumed": server.resumed}  # fmt: skip
        if isinstance(server.engine, BatchingEngine):
            health |= {"batched_steps": server.engine.batched_steps, "batched_tokens": server.engine.batched_tokens}
        return health

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0, "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, ChatRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, CompletionRequest, "completion")

    @app.get("/v1/sessions")
    def list_sessions():
        return {"object": "list", "data": [d for i in server.store.ids() if (d := server.store.describe(i))]}

    async def on_worker(session_id: str, fn) -> list | JSONResponse:
        """Run ``fn()`` on the engine's worker, in the session's lane: ``[result]``, or the error response."""
        result: list = []

        def work():
            result.append(fn())
            yield Done({}, session_id)

        ticket = await submit(session_id, work)
        if isinstance(ticket, JSONResponse):
            return ticket
        async for item in ticket.events():
            if isinstance(item, BaseException):
                return failure(item)
        return result

    def no_session(session_id: str) -> JSONResponse:
        return error_response(404, f"No session {session_id!r}.", "not_found_error", code="session_not_found")

    # `:path` so that ids with a slash work; the export route is matched first.
    @app.get("/v1/sessions/{session_id:path}/export")
    async def export_session(session_id: str):
        done = await on_worker(session_id, lambda: server.store.export(session_id))
        if isinstance(done, JSONResponse):
            return done
        if done[0] is None:
            return no_session(session_id)
        name = f"session-{hashlib.sha256(session_id.encode()).hexdigest()[:16]}.safetensors"
        headers = {"Content-Disposition": f'attachment; filename="{name}"'}
        return Response(done[0], media_type="application/octet-stream", headers=headers)

    @app.put("/v1/sessions/{session_id:path}")
    async def import_session(request: Request, session_id: str):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/octet-stream":
            return error_response(415, "Send the session file as 'Content-Type: application/octet-stream' "
                                       f"(got {kind!r}).")  # fmt: skip
        if not 0 < len(session_id) <= limits.max_session_id:
            return error_response(400, f"A session id must have 1 to {limits.max_session_id} characters.")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_session_bytes:
            limit = limits.max_session_bytes
            return error_response(413, f"The session file is {declared} bytes; the limit is {limit}.")
        data = bytearray()
        async for block in request.stream():
            data += block
            if len(data) > limits.max_session_bytes:
                return error_response(413, f"The session file is over the limit of {limits.max_session_bytes} bytes.")
        done = await on_worker(session_id, lambda: server.store.import_(session_id, bytes(data)))
        if isinstance(done, JSONResponse):
            return done
        return server.store.describe(session_id)

    @app.get("/v1/sessions/{session_id:path}")
    def get_session(session_id: str):
        described = server.store.describe(session_id)
        return no_session(session_id) if described is None else described

    @app.delete("/v1/sessions/{session_id:path}")
    async def delete_session(session_id: str):
        done = await on_worker(session_id, lambda: server.store.delete(session_id))
        if isinstance(done, JSONResponse):
            return done
        if not done[0]:
            return no_session(session_id)
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    return app


def failure(item: BaseException) -> JSONResponse:
    if isinstance(item, RequestError):
        return error_response(item.status, item.message, item.kind, item.param, item.code)
    if isinstance(item, SessionFileError):
        return error_response(400, str(item), code="invalid_session_file")
    if isinstance(item, JobTimeout):
        return error_response(504, str(item), "timeout_error", code="timeout")
    if isinstance(item, JobCancelled):
        return error_response(503, str(item), "server_error", code="cancelled")
    if isinstance(item, ValueError):
        return error_response(400, str(item))
    if isinstance(item, SessionBrokenError):
        return error_response(500, str(item), "server_error")
    log.error("request failed", exc_info=item)
    return error_response(500, f"Generation failed ({type(item).__name__}: {item}).", "server_error")


async def _watch_disconnect(request: Request, ticket) -> None:
    """Cancel the ticket as soon as the client goes away (checked every 50 ms)."""
    with contextlib.suppress(asyncio.CancelledError):
        while not ticket.finished.is_set():
            if await request.is_disconnected():
                ticket.cancel("client disconnected")
                return
            await asyncio.sleep(0.05)


async def _sse(server: Server, ticket, events, first, body: Sampling, ident: str, created: int, kind: str):
    """Server-sent events from the engine's events; the job is cancelled if the client goes away."""

    def event(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        choices = []
        if delta is not None:
            choice = {"index": 0, "finish_reason": finish, "logprobs": None}
            choice.update({"delta": delta} if kind == "chat" else {"text": delta.get("content", "")})
            choices.append(choice)
        chunk = {"id": ident, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                 "created": created, "model": server.name, "choices": choices}  # fmt: skip
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    try:
        if kind == "chat":
            yield event({"role": "assistant", "content": ""})
        item = first
        while True:
            if isinstance(item, BaseException):
                problem = json.loads(failure(item).body)["error"]
                yield f"data: {json.dumps({'error': problem})}\n\n"
                return
            if isinstance(item, Done):
                if body.stream_options and body.stream_options.include_usage:
                    usage = {**item.usage, "total_tokens": sum(item.usage.values())}
                    yield event(None, usage=usage)
                yield "data: [DONE]\n\n"
                return
            if item.text:
                yield event({"content": item.text})
            if item.finish_reason:
                yield event({}, FINISH[item.finish_reason])
            item = await anext(events)
    finally:
        ticket.cancel("client disconnected")  # no-op once finished


def serve(args: argparse.Namespace, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Run the server with the ``serve`` flags until SIGINT/SIGTERM."""
    import uvicorn

    if not math.isfinite(args.request_timeout) or args.request_timeout <= 0:
        raise SystemExit("error: --request-timeout must be a positive number of seconds")
    hosts = {"127.0.0.1", "localhost", "::1", args.host}
    hosts.update(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
    if args.host in ("0.0.0.0", "::") and not args.allowed_hosts:
        logging.getLogger(__name__).warning("bound to all addresses: only loopback Host names are accepted "
                                            "unless --allowed-hosts names the others")  # fmt: skip
    limits = Limits(max_tokens=args.max_tokens_cap, max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                    max_prompt_tokens=args.max_prompt_tokens, max_queue=args.max_queue,
                    request_timeout=args.request_timeout)  # fmt: skip
    app = create_app(
        model, tokenizer, name=args.name, start_size=args.start_size, recent_size=args.recent_size,
        max_sessions=args.max_sessions, state_dir=args.state_dir, api_key=args.api_key,
        allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
        allowed_hosts=tuple(hosts), limits=limits, shutdown_timeout=args.shutdown_timeout,
        batch_rows=args.batch_rows,
    )  # fmt: skip
    config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.shutdown_timeout,
                            log_level="warning")  # fmt: skip
    print(f"Serving on http://{args.host}:{args.port} (OpenAI API under /v1)", flush=True)
    uvicorn.Server(config).run()
