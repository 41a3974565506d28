"""An OpenAI-compatible HTTP server over streaming sessions (``streaming-llm serve``).

Needs the optional dependencies ``fastapi`` and ``uvicorn`` (``pip install 'streaming-llm[server]'``).

Handlers parse and check requests (strict types, bounds, caps, unsupported fields named in a 400),
then hand all model work to the server's one :class:`~streaming_llm.runtime.engine.Engine`, whose
thread runs every session as a row of one cache: prompts are fed in chunks between batched decode
steps of all generating sessions. Sessions:

- A chat request names its session with the ``X-Session-Id`` header (or the ``user`` field). For a
  known session it may send only its new messages, or the whole history (recognised by a hash chain;
  only the new messages are fed). A history whose system message contradicts the session gets a 409.
  Without an id, a request that extends a conversation the server has seen continues it (hash chain
  of the messages); anything else starts a new session. The id is returned in ``X-Session-Id``.
- A session stays a row of the engine while it is resident; when more sessions are live than rows,
  the least recently used idle one is spilled to host memory and restored on demand (no copy per
  request). A system prompt is pinned beside the sinks (up to ``pinned_capacity`` tokens), and
  sessions with different system prompts decode together.
- With ``state_dir`` every completed (or cancelled) turn is saved atomically before the response
  completes; sessions beyond ``max_sessions`` leave memory least recently used first and come back
  from disk on demand; after a crash every session continues from its last saved turn.

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /v1/config``,
``POST /v1/chat/completions``, ``POST /v1/completions`` (``"stream": true`` for server-sent events),
``GET /v1/sessions``, ``GET|DELETE /v1/sessions/{id}``, ``GET /v1/sessions/{id}/export`` (the session
file) and ``PUT /v1/sessions/{id}`` (import one, checked as on load), so that a session can move between
servers. Errors always have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; a request naming a model that is neither the served
name nor an alias gets OpenAI's 404 ``model_not_found``. Sampling fields a request leaves out take the
operator's defaults (``sampling``; the CLI's: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05,
repetition penalty 1.1 over 64 tokens), shown by ``GET /v1/config``. Every request is logged in one line
(:mod:`~streaming_llm.serving.access_log`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..core.attention import install
from ..core.cache import StreamingCache
from ..runtime import engine as runtime
from ..runtime.generation import TextStream, eos_ids
from ..runtime.sampling import Sampler, SamplingConfig
from ..sessions.persistence import SessionFileError
from ..sessions.retrieval import RetrievalMemory
from ..sessions.session import SessionBrokenError, StreamingSession
from .access_log import AccessLog
from .config import Limits, exposure_warning, read_api_keys
from .guard import Guard, namespace, owns
from .page import add_web_routes
from .schemas import ChatRequest, CompletionRequest, Message, RequestError, Sampling, error_response, parse_body
from .store import Live, SessionStore, StateDirError, chain

log = logging.getLogger(__name__)
FINISH = {"eos": "stop", "stop": "stop", "length": "length", None: "stop"}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


# A session's state before a turn (tensors, state with its "server" digest), or None for a broken session.
Snapshot = tuple[dict, dict] | None


class QueueFull(RuntimeError):
    """Too many requests are running or waiting; try again later."""


@dataclass(eq=False)
class Turn:
    """One submitted request as the handler sees it: its engine request, its text, and a wake-up queue."""

    request: runtime.Request
    text: TextStream
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    session_id: str | None = None


class Server:
    """What the handlers share: model, engine (and its thread), store, limits and settings.

    Args:
        rows: Sessions resident on the device at once (rows of the engine's cache); they decode together.
        pinned_capacity: Longest system prompt pinned beside the sinks (tokens; a longer one pins its start).
        max_sessions: Sessions kept in memory in all (rows and host snapshots); more go to ``state_dir``.
        sampling: Sampling of requests that leave sampling fields out (default: the CLI's chat defaults).
        aliases: Further model names to answer to.
        memory: ``"retrieval"``: every session gets its own
            :class:`~streaming_llm.sessions.retrieval.RetrievalMemory` (its evicted text indexed, the best passages
            pinned before each user turn; the index is saved with the session). None: plain streaming.

    Raises:
        ValueError: An unknown ``memory``.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, name: str, start_size: int,
                 recent_size: int, max_sessions: int, state_dir: str | os.PathLike | None, limits: Limits,
                 rows: int = 8, pinned_capacity: int = 256, sampling: SamplingConfig | None = None,
                 aliases: tuple[str, ...] = (), memory: str | None = None, kv_dtype: str | None = None):  # fmt: skip
        if memory not in (None, "retrieval"):
            raise ValueError(f"memory must be None or 'retrieval', got {memory!r}")
        install(model)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.names = (name, *(a for a in aliases if a != name))
        self.sampling = sampling or default_sampling()
        self.start_size, self.recent_size, self.limits = start_size, recent_size, limits
        self.pinned_capacity = max(start_size, pinned_capacity)
        self.memory = memory
        segment = RetrievalMemory().budget if memory == "retrieval" else 0
        cache = StreamingCache(
            model.config, start_size, recent_size, segment, rows=rows, pinned_capacity=self.pinned_capacity,
            dtype=model.dtype, device=model.device, kv_dtype=kv_dtype,
        )  # fmt: skip
        self.engine = runtime.Engine(model, cache)
        self.store = SessionStore(model, tokenizer, self.engine, max(max_sessions, rows), state_dir)
        self.stop_ids = frozenset(eos_ids(model, tokenizer))
        self.resumed = 0  # requests that continued a session already in memory or on disk
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.engine.serve_forever, args=(self._stop,),
                                        name="streaming-llm-engine", daemon=True)  # fmt: skip
        self._thread.start()

    def shutdown(self, timeout: float) -> None:
        """Cancel running requests (each still closes and persists its turn), stop the engine's thread."""
        self.engine.shutdown()
        self._stop.set()
        self._thread.join(timeout)
        self.store.close()

    def health(self) -> dict:
        engine, stepper = self.engine, self.engine.stepper
        return {
            "status": "ok", "sessions_in_memory": len(self.store.live), "load": engine.load, "resumed": self.resumed,
            "rows": engine.cache.rows, "rows_in_use": engine.cache.rows - len(engine.cache.free),
            "decode_steps": engine.decode_steps, "batched_tokens": stepper.batched_rows,
            "max_batch": stepper.max_batch, "spills": engine.spills, "restores": engine.restores,
        }  # fmt: skip

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_prompt(self, texts: list[str]) -> None:
        total = sum(self.count(t) for t in texts)
        if total > self.limits.max_prompt_tokens:
            raise RequestError(400, f"The new text is {total} tokens; this server takes at most "
                                    f"{self.limits.max_prompt_tokens} per request (--max-prompt-tokens). Send long "
                                    "documents over several requests of one session.", param="messages")  # fmt: skip

    def check_load(self) -> None:
        if self.engine.load >= self.limits.max_queue:
            raise QueueFull(f"The server is busy ({self.engine.load} requests running or waiting); retry later.")

    # -- sessions --------------------------------------------------------------------------------------
    def anonymous_id(self, messages: list[Message], namespace: str = "") -> str:
        """The session a request without an id continues (an idle one whose history digest its earlier messages
        match, claimed for it: see :meth:`SessionStore.claim_by_digest`), or a new id; in ``namespace``."""
        digest = ""
        for message in messages[:-1]:
            digest = chain(digest, message.kind, message.text)
        found = self.store.claim_by_digest(digest, namespace) if len(messages) > 1 else None
        return found or f"{namespace}session-{uuid.uuid4().hex}"

    def resolve(self, session_id: str, messages: list[Message]) -> Live:
        """The session (found, restored from disk, or new with the request's system prompt), counted in flight."""
        try:
            live = self.store.get(session_id)
        except SessionFileError as problem:
            raise RequestError(
                409,
                f"The stored session {session_id!r} cannot be used: {problem} Delete it "
                "(DELETE /v1/sessions/{id}) to start over.",
                code="session_unreadable",
            ) from None
        if live is None:
            system = messages[0] if messages[0].kind == "system" else None
            memory = RetrievalMemory() if self.memory == "retrieval" else None
            session = StreamingSession(self.model, self.tokenizer, system.text if system else None,
                                       start_size=self.start_size, recent_size=self.recent_size, memory=memory,
                                       engine=self.engine, name=session_id)  # fmt: skip
            live = Live(session_id, session)
            if system is not None:
                live.digest, live.messages = chain("", "system", system.text), 1
        else:
            self.resumed += 1
        with self.store.lock:
            live.inflight += 1
            self.store.put(live)
            self.store.release(session_id)  # counted in flight now: no other anonymous request can claim it
        return live

    def new_messages(self, live: Live, messages: list[Message]) -> list[Message]:
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

    # -- requests ----------------------------------------------------------------------------------------
    def chat_turn(self, body: ChatRequest, live: Live, loop: asyncio.AbstractEventLoop) -> Turn:
        """The engine request of one chat turn; the session's history is checked when it starts (in order)."""
        fed: list[Message] = []
        before: list[Snapshot] = []

        def messages() -> list[tuple[str, str]]:  # engine thread, when the turn starts
            new = self.new_messages(live, body.messages)
            self.check_prompt([m.text for m in new])
            before.append(self.snapshot(live))  # the session as it is, to restore if the turn fails
            fed.extend(new)
            return [(m.kind, m.text) for m in new]

        events: asyncio.Queue = asyncio.Queue()
        wake = _waker(loop, events)

        request, text = live.session.turn_request(
            messages,
            body.max_tokens or min(256, self.limits.max_tokens),
            body.stops(),
            sampling=body.config(self.sampling),
            deadline=time.monotonic() + self.limits.request_timeout,
            on_event=wake,
            every_token=body.stream,
            on_done=lambda r: self._close_turn(live, r, fed, text, before),
        )  # fmt: skip  (a whole reply wakes its handler once, at the end)
        return Turn(request, text, events, live.id)

    def snapshot(self, live: Live) -> Snapshot:
        """Everything needed to put ``live`` back as it is now (engine thread): its state, digest and count."""
        if live.session.broken:
            return None
        tensors, state = live.session.state()
        state["server"] = {"id": live.id, "digest": live.digest, "messages": live.messages}
        return tensors, state

    def _close_turn(self, live: Live, request: runtime.Request, fed: list[Message], text: TextStream,
                    before: list[Snapshot]) -> None:  # fmt: skip
        """Engine thread, when a chat request is done: record the turn and persist it, atomically.

        A turn that failed (an error, a broken cache) or could not be persisted leaves the session exactly as it
        was before it (restored from the snapshot taken when it started) and the request ends with
        ``turn_failed`` (500) or ``storage_failed`` (503)."""
        live.inflight -= 1
        if not before:  # refused before anything was fed (e.g. 409): nothing changed
            return
        if live.session.broken or request.error is not None:
            self._restore(live, before[0])
            if not isinstance(request.error, RequestError):
                cause = request.error or SessionBrokenError(str(live.session.broken))
                log.error("turn of session %r failed: %s: %s", live.id, type(cause).__name__, cause)
                request.error = RequestError(500, f"The turn failed ({type(cause).__name__}); the session is as it "
                                                  "was before it. Retry, or change the request.", param=None,
                                             kind="server_error", code="turn_failed")  # fmt: skip
            return
        old = live.digest, live.messages
        digest, count = live.digest, live.messages
        for message in fed:
            digest, count = chain(digest, message.kind, message.text), count + 1
        self.store.update_digest(live, chain(digest, "assistant", "".join(text.text)), count + 1)
        try:
            live.record_memory()
            self.store.put(live)
            self.store.persist(live)
        except Exception as problem:  # e.g. a full disk: nothing of the turn may stay
            log.error("could not persist session %r: %s: %s", live.id, type(problem).__name__, problem)
            self.store.update_digest(live, *old)
            self._restore(live, before[0])
            request.error = RequestError(503, "The turn could not be saved (the server's storage failed); the "
                                              "session is as it was before it. Retry later.", kind="server_error",
                                         code="storage_failed")  # fmt: skip

    def _restore(self, live: Live, snapshot: Snapshot) -> None:
        """Put the session back as it was in ``snapshot`` (engine thread); without one, forget it from memory."""
        if snapshot is None:
            self.store.discard(live.id)  # broken before the turn: the file (last completed turn) stays the truth
            return
        tensors, state = snapshot
        restored = self.store.restore(live.id, state, tensors)
        restored.inflight = live.inflight
        self.store.discard(live.id)
        self.store.put(restored)

    def completion_turn(self, body: CompletionRequest, loop: asyncio.AbstractEventLoop) -> Turn:
        """A stateless text completion: a temporary stream of the engine, closed when done."""
        self.check_prompt([body.prompt])
        engine = self.engine
        stream = engine.open("completion", sampler=Sampler(device=self.model.device, tokenizer=self.tokenizer))
        text = TextStream(self.tokenizer, body.stops(), set(self.stop_ids), lambda: engine.row_stats(stream))
        ids = self.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
        events: asyncio.Queue = asyncio.Queue()
        wake = _waker(loop, events)

        request = runtime.Request(
            stream, ids, body.max_tokens or 16, self.stop_ids, on_token=text.on_token,
            on_finish=lambda r: text.finish(r.finish_reason) or [], sampling=body.config(self.sampling),
            deadline=time.monotonic() + self.limits.request_timeout, on_done=lambda r: engine.close(stream),
            on_event=wake, every_token=body.stream,
        )  # fmt: skip
        return Turn(request, text, events)

    def submit(self, turn: Turn) -> None:
        try:
            self.engine.submit(turn.request)
        except runtime.EngineStopped as problem:
            raise RequestError(503, str(problem), "server_error", code="shutting_down") from None

    def delete(self, session_id: str) -> bool:
        return self.store.delete(session_id)


def _waker(loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
    """A callable for the engine's thread that wakes the handler waiting on ``events`` (a closed loop: no-op)."""

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (server shut down)
            loop.call_soon_threadsafe(events.put_nowait, None)

    return wake


# -- the application --------------------------------------------------------------------------------------
def create_app(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, name: str = "streaming-llm",
               start_size: int = 4, recent_size: int = 2000, max_sessions: int = 16,
               state_dir: str | os.PathLike | None = None, api_key: str | None = None,
               api_keys: dict[str, str] | None = None,
               allowed_origins: tuple[str, ...] = (), allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost",
               "::1"), limits: Limits | None = None, shutdown_timeout: float = 5.0, rows: int = 8,
               pinned_capacity: int = 256, sampling: SamplingConfig | None = None,
               aliases: tuple[str, ...] = (), web: bool = True, memory: str | None = None,
               kv_dtype: str | None = None) -> FastAPI:  # fmt: skip
    """The FastAPI application.

    Args:
        model, tokenizer: What to serve (the model is switched to streaming attention).
        name: Model name reported by ``/v1/models``; requests naming another model (not in ``aliases``)
            get 404 ``model_not_found``, as OpenAI answers. A request without ``model`` is served.
        aliases: Further model names to answer to (listed by ``/v1/models`` too).
        start_size, recent_size: Cache sizes of every session.
        max_sessions: Sessions kept in memory (more go to ``state_dir``, or are dropped without it).
        state_dir: Folder for durable sessions (None: in memory only).
        api_key: When set, every request but ``/health`` needs ``Authorization: Bearer <api_key>``. An
            empty (or whitespace-only) key raises ``ValueError``: it would otherwise open the server silently.
        api_keys: Further keys, ``{key: tenant}`` (``--api-keys-file``; :func:`~.config.read_api_keys`). Each
            tenant sees only its own sessions (list, read, continue, export, import, delete; another's is a 404,
            and anonymous continuation stays inside it); the tenant of ``api_key`` is one more.
        allowed_origins: Browser origins allowed to call (``*`` for any); requests from other origins get 403.
        allowed_hosts: Accepted ``Host`` header names (DNS-rebinding protection; ``*`` for any).
        limits: Caps (:class:`Limits`).
        shutdown_timeout: Seconds to finish or cancel in-flight work at shutdown.
        rows: Sessions resident on the device at once; they decode together in one forward.
        pinned_capacity: Longest system prompt (tokens) pinned beside the sinks.
        sampling: Sampling of requests that leave sampling fields out (each field the request gives
            overrides it); default: the CLI's chat defaults (``cli.common.SAMPLING_DEFAULTS``), no seed.
        web: Serve the chat page at ``GET /`` (:mod:`~streaming_llm.serving.page`).
        memory: ``"retrieval"``: every session gets its own retrieval memory (see :class:`Server`).
        kv_dtype: How the engine's cache stores keys/values (see :class:`StreamingCache`; None: the model's dtype).
            Saved sessions of another KV dtype are refused when they are resumed.

    Raises:
        ValueError: an empty ``api_key``, or bad sizes.
    """
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: pass a non-empty key, or None to serve without one.")
    limits = limits or Limits()
    server = Server(model, tokenizer, name=name, start_size=start_size, recent_size=recent_size,
                    max_sessions=max_sessions, state_dir=state_dir, limits=limits, rows=rows,
                    pinned_capacity=pinned_capacity, sampling=sampling, aliases=aliases, memory=memory,
                    kv_dtype=kv_dtype)  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.shutdown, shutdown_timeout)

    app = FastAPI(title="streaming-llm", description=__doc__, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Guard, api_key=api_key, origins=tuple(allowed_origins), hosts=tuple(allowed_hosts),
                       tenants=api_keys)  # fmt: skip
    app.add_middleware(AccessLog)  # outermost: refused requests are logged too
    _add_error_handlers(app)
    _add_generation_routes(app, server)
    _add_session_routes(app, server)
    if web:
        add_web_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
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


def _add_generation_routes(app: FastAPI, server: Server) -> None:
    @app.get("/health")
    def health():
        return server.health()

    @app.head("/health")
    def health_head():
        return Response(status_code=200)  # load balancers probe with HEAD

    def model_card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "local"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [model_card(n) for n in server.names]}

    @app.get("/v1/models/{model_id:path}")
    def one_model(model_id: str):
        if model_id not in server.names:
            return error_response(404, f"The model `{model_id}` does not exist or you do not have access to it.",
                                  param="model", code="model_not_found")  # fmt: skip
        return model_card(model_id)

    @app.get("/v1/config")
    def config():
        """What a request gets when it leaves fields out, and the server's caps (not an OpenAI endpoint)."""
        return {
            "object": "config", "model": server.name, "aliases": list(server.names[1:]),
            "sampling": {k: v for k, v in dataclasses.asdict(server.sampling).items() if k != "suppress_ids"},
            "cache": {"start_size": server.start_size, "recent_size": server.recent_size,
                      "rows": server.engine.cache.rows, "pinned_capacity": server.pinned_capacity},
            "limits": dataclasses.asdict(server.limits),
        }  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(server, request, ChatRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(server, request, CompletionRequest, "completion")


def _add_session_routes(app: FastAPI, server: Server) -> None:
    """The session endpoints; each tenant (API key) sees only its own sessions: another's id is a 404."""

    def no_session(session_id: str) -> JSONResponse:
        return error_response(404, f"No session {session_id!r}.", "not_found_error", code="session_not_found")

    def busy(session_id: str) -> JSONResponse | None:
        live = server.store.live.get(session_id)
        if live is not None and live.inflight:
            return error_response(409, f"Session {external(session_id)!r} has a request in flight; retry when it is "
                                       "done.", code="session_busy")  # fmt: skip
        return None

    def inside(request: Request, session_id: str) -> str | None:
        """The internal id of the caller's session ``session_id`` (None: an id no tenant can own)."""
        return None if "\x1f" in session_id else namespace(tenant_of(request)) + session_id

    def describe(internal: str) -> dict | None:
        described = server.store.describe(internal)
        return None if described is None else {**described, "id": external(internal)}

    @app.get("/v1/sessions")
    def list_sessions(request: Request):
        tenant = tenant_of(request)
        mine = [i for i in server.store.ids() if owns(tenant, i)]
        return {"object": "list", "data": [d for i in mine if (d := describe(i))]}

    # `:path` so that ids with a slash work; the export route is matched first.
    @app.get("/v1/sessions/{session_id:path}/export")
    async def export_session(request: Request, session_id: str):
        if (internal := inside(request, session_id)) is None:
            return no_session(session_id)
        if (refused := busy(internal)) is not None:
            return refused
        data = await asyncio.to_thread(server.engine.run_on_thread, lambda: server.store.export(internal))
        if data is None:
            return no_session(session_id)
        name = f"session-{hashlib.sha256(session_id.encode()).hexdigest()[:16]}.safetensors"
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})  # fmt: skip

    @app.put("/v1/sessions/{session_id:path}")
    async def import_session(request: Request, session_id: str):
        try:
            data = await read_session_upload(server, request, session_id)
        except RequestError as problem:
            return failure(problem)
        internal = namespace(tenant_of(request)) + session_id  # (the id was checked: printable ASCII)
        if (refused := busy(internal)) is not None:
            return refused
        try:
            await asyncio.to_thread(server.engine.run_on_thread, lambda: server.store.import_(internal, data))
        except SessionFileError as problem:
            return failure(problem)
        return describe(internal)

    @app.get("/v1/sessions/{session_id:path}")
    def get_session(request: Request, session_id: str):
        internal = inside(request, session_id)
        described = None if internal is None else describe(internal)
        return no_session(session_id) if described is None else described

    @app.delete("/v1/sessions/{session_id:path}")
    async def delete_session(request: Request, session_id: str):
        if (internal := inside(request, session_id)) is None:
            return no_session(session_id)
        if (refused := busy(internal)) is not None:
            return refused
        if not await asyncio.to_thread(server.delete, internal):
            return no_session(session_id)
        return {"id": session_id, "object": "session.deleted", "deleted": True}


async def read_session_upload(server: Server, request: Request, session_id: str) -> bytes:
    """The body of ``PUT /v1/sessions/{id}``: a session file, within the size cap."""
    limits = server.limits
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/octet-stream":
        raise RequestError(415, f"Send the session file as 'Content-Type: application/octet-stream' (got {kind!r}).")
    check_session_id(session_id, limits.max_session_id)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_session_bytes:
        raise RequestError(413, f"The session file is {declared} bytes; the limit is {limits.max_session_bytes}.")
    data = bytearray()
    async for block in request.stream():
        data += block
        if len(data) > limits.max_session_bytes:
            raise RequestError(413, f"The session file is over the limit of {limits.max_session_bytes} bytes.")
    return bytes(data)


# -- one request, end to end ---------------------------------------------------------------------------------
async def read_body(server: Server, request: Request, schema: type[BaseModel]):
    limits = server.limits
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise RequestError(415, f"Send the body as JSON with 'Content-Type: application/json' (got {kind!r}).")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise RequestError(413, f"The body is {declared} bytes; the limit is {limits.max_body_bytes}.")
    raw = bytearray()
    try:
        async with asyncio.timeout(limits.body_timeout):
            async for block in request.stream():
                raw += block
                if len(raw) > limits.max_body_bytes:
                    raise RequestError(413, f"The body is over the limit of {limits.max_body_bytes} bytes.")
    except TimeoutError:
        raise RequestError(408, f"The body did not arrive within {limits.body_timeout:g} s (--body-timeout).",
                           code="body_timeout") from None  # fmt: skip
    body = parse_body(bytes(raw), schema)
    if body.model is not None and body.model not in server.names:
        raise RequestError(404, f"The model `{body.model}` does not exist or you do not have access to it. "
                                f"This server serves {', '.join(map(repr, server.names))} (GET /v1/models).",
                           param="model", code="model_not_found")  # fmt: skip
    if body.max_tokens is not None and body.max_tokens > limits.max_tokens:
        raise RequestError(400, f"max_tokens={body.max_tokens} is over this server's cap of {limits.max_tokens} "
                                "(--max-tokens-cap).", param="max_tokens")  # fmt: skip
    return body


def check_chat(server: Server, request: Request, body: ChatRequest) -> str:
    """Checks of a chat request that need no model; returns its session id."""
    limits = server.limits
    if body.messages[-1].kind != "user":
        raise RequestError(400, "The last message must come from the user.", param="messages")
    if len(body.messages) > limits.max_messages:
        raise RequestError(400, f"{len(body.messages)} messages is over the limit of {limits.max_messages} "
                                "(--max-messages); with X-Session-Id send only the new ones.",
                           param="messages")  # fmt: skip
    session_id = request.headers.get("x-session-id") or body.user
    prefix = namespace(tenant_of(request))
    if session_id is not None:
        check_session_id(session_id, limits.max_session_id, "user" if body.user == session_id else "X-Session-Id")
        return prefix + session_id
    return server.anonymous_id(body.messages, prefix)


def tenant_of(request: Request) -> str:
    """The tenant of the request's API key (set by :class:`Guard`; "" for the single key or none)."""
    return getattr(request.state, "tenant", "") or ""


def external(internal_id: str) -> str:
    """A session id as its tenant knows it (without the tenant's namespace)."""
    return internal_id.rpartition("\x1f")[2]


def check_session_id(session_id: str, longest: int, param: str = "X-Session-Id") -> None:
    """Refuse (400) a session id that is empty, longer than ``longest`` characters, or not printable ASCII (it
    is sent back in the ``X-Session-Id`` header, which cannot carry other characters or line breaks)."""
    if not 0 < len(session_id) <= longest:
        raise RequestError(400, f"A session id must have 1 to {longest} characters.", param=param)
    if not all(" " <= c <= "~" for c in session_id):
        raise RequestError(400, "A session id (X-Session-Id or user) must be printable ASCII: no line breaks, "
                                "control or non-ASCII characters.", param=param)  # fmt: skip


async def start_turn(server: Server, request: Request, body: Sampling, kind: str) -> Turn:
    loop = asyncio.get_running_loop()
    try:
        server.check_load()
    except QueueFull as problem:
        raise RequestError(429, str(problem), "rate_limit_error", code="queue_full") from None
    if kind != "chat":
        turn = server.completion_turn(body, loop)
    else:
        session_id = check_chat(server, request, body)
        try:
            live = await asyncio.to_thread(server.resolve, session_id, body.messages)
        finally:
            server.store.release(session_id)  # an anonymous request's claim (no-op otherwise)
        try:
            turn = server.chat_turn(body, live, loop)
            server.submit(turn)
        except BaseException:
            live.inflight -= 1
            raise
        return turn
    server.submit(turn)
    return turn


async def respond(server: Server, request: Request, schema: type[BaseModel], kind: str):
    try:
        body = await read_body(server, request, schema)
        turn = await start_turn(server, request, body, kind)
    except (RequestError, ValueError) as problem:
        return failure(problem)
    watcher = asyncio.create_task(_watch_disconnect(request, turn.request))
    headers = {"X-Session-Id": external(turn.session_id)} if turn.session_id else None
    ident, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
    try:
        first = await _next_piece(turn)
    except BaseException:
        turn.request.cancel("client disconnected")
        watcher.cancel()
        raise
    if first is None and _ending_error(turn.request) is not None:  # refused, or ended before any text
        watcher.cancel()
        return failure(_ending_error(turn.request))
    if body.stream:
        watcher.cancel()
        stream = _sse(server, turn, first, body, ident, created, kind, request.state)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    try:
        pieces = [first] if first is not None else []
        while (piece := await _next_piece(turn)) is not None:
            pieces.append(piece)
    finally:
        turn.request.cancel("client disconnected")  # no-op once finished
        watcher.cancel()
    if _ending_error(turn.request) is not None:
        return failure(_ending_error(turn.request))
    request.state.usage = _usage(server, turn)  # for the access log
    return JSONResponse(_completion_body(server, turn, pieces, ident, created, kind), headers=headers)


async def _next_piece(turn: Turn):
    """The next text piece of the turn, or None once it is done (its pieces all read)."""
    while True:
        if turn.text.pieces:
            return turn.text.pieces.popleft()
        if turn.request.done:
            return turn.text.pieces.popleft() if turn.text.pieces else None
        await turn.events.get()


def _usage(server: Server, turn: Turn) -> dict[str, int]:
    request = turn.request
    completion = sum(t not in server.stop_ids for t in request.tokens)
    return {"prompt_tokens": request.prompt_tokens, "completion_tokens": completion,
            "total_tokens": request.prompt_tokens + completion}  # fmt: skip


def _completion_body(server: Server, turn: Turn, pieces: list, ident: str, created: int, kind: str) -> dict:
    text = "".join(p.text for p in pieces)
    reason = pieces[-1].finish_reason if pieces else None
    choice = {"index": 0, "finish_reason": FINISH.get(reason, "stop"), "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text})
    return {
        "id": ident, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
        "model": server.name, "choices": [choice], "usage": _usage(server, turn),
    }  # fmt: skip


RETRY_AFTER_S = 1  # what a 429 (queue full) and a 503 (shutting down, storage failed) suggest in Retry-After


def failure(item: BaseException) -> JSONResponse:
    if isinstance(item, RequestError):
        response = error_response(item.status, item.message, item.kind, item.param, item.code)
        if item.status in (429, 503):
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response
    if isinstance(item, SessionFileError):
        return error_response(400, str(item), code="invalid_session_file")
    if isinstance(item, QueueFull):
        response = error_response(429, str(item), "rate_limit_error", code="queue_full")
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response
    if isinstance(item, SessionBrokenError):
        return error_response(500, str(item), "server_error")
    if isinstance(item, ValueError):
        return error_response(400, str(item))
    log.error("request failed", exc_info=item)  # the details (paths too) go to the log, not to the client
    return error_response(500, f"Generation failed ({type(item).__name__}).", "server_error")


def _ending_error(request: runtime.Request) -> BaseException | None:
    """What ended a request that did not finish normally (for the last event of a stream)."""
    if request.error is not None:
        return request.error
    if request.finish_reason == "timeout":
        return RequestError(504, "The request ran past the server's time limit (--request-timeout).", "timeout_error",
                            code="timeout")  # fmt: skip
    if request.finish_reason == "shutdown":
        return RequestError(503, "The server is shutting down.", "server_error", code="shutting_down")
    return None


async def _watch_disconnect(request: Request, engine_request: runtime.Request) -> None:
    """Cancel the request as soon as the client goes away (checked every 50 ms)."""
    with contextlib.suppress(asyncio.CancelledError):
        while not engine_request.done:
            if await request.is_disconnected():
                engine_request.cancel("client disconnected")
                return
            await asyncio.sleep(0.05)


async def _sse(server: Server, turn: Turn, first, body: Sampling, ident: str, created: int, kind: str, state=None):
    """Server-sent events from the turn's pieces; the request is cancelled if the client goes away.

    ``state`` (the request's) receives ``usage`` at the end, for the access log."""

    def event(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
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
        piece = first
        while piece is not None:
            if piece.text:
                yield event({"content": piece.text})
            if piece.finish_reason:
                yield event({}, FINISH.get(piece.finish_reason, "stop"))
            piece = await _next_piece(turn)
        problem = _ending_error(turn.request)
        if problem is not None:
            yield f"data: {json.dumps({'error': json.loads(failure(problem).body)['error']})}\n\n"
            yield "data: [DONE]\n\n"  # the stream ends as every stream does, after its error event
            return
        if state is not None:
            state.usage = _usage(server, turn)
        if body.stream_options and body.stream_options.include_usage:
            yield event(None, usage=_usage(server, turn))
        yield "data: [DONE]\n\n"
    finally:
        turn.request.cancel("client disconnected")  # no-op once finished


def default_sampling() -> SamplingConfig:
    """The sampling of requests that give no sampling fields, unless the operator chose others: the CLI's."""
    from ..cli.common import SAMPLING_DEFAULTS

    return SamplingConfig(**SAMPLING_DEFAULTS)


def _create_or_exit(*args, **kwargs) -> FastAPI:
    """:func:`create_app`, with an unusable state dir as a one-line error instead of a traceback."""
    try:
        return create_app(*args, **kwargs)
    except StateDirError as error:
        raise SystemExit(f"error: --state-dir: {error}") from None


def serve(args: argparse.Namespace, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Run the server with the ``serve`` flags until SIGINT/SIGTERM."""
    import sys

    import uvicorn

    from ..cli.common import sampling_config
    from .access_log import configure
    from .connections import guarded_h11

    if not math.isfinite(args.request_timeout) or args.request_timeout <= 0:
        raise SystemExit("error: --request-timeout must be a positive number of seconds")
    hosts = {"127.0.0.1", "localhost", "::1", args.host}
    hosts.update(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
    if args.host in ("0.0.0.0", "::") and not args.allowed_hosts:
        log.warning("bound to all addresses: only loopback Host names are accepted unless --allowed-hosts names "
                    "the others")  # fmt: skip
    try:
        api_keys = read_api_keys(args.api_keys_file) if args.api_keys_file else None
    except ValueError as error:
        raise SystemExit(f"error: --api-keys-file: {error}") from None
    warning = exposure_warning(args.host, args.api_key or api_keys)
    if warning:
        print(f"\n{'!' * 100}\n{warning}\n{'!' * 100}\n", file=sys.stderr, flush=True)
    limits = Limits(max_tokens=args.max_tokens_cap, max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                    max_prompt_tokens=args.max_prompt_tokens, max_queue=args.max_queue,
                    request_timeout=args.request_timeout, body_timeout=args.body_timeout)  # fmt: skip
    app = _create_or_exit(
        model, tokenizer, name=args.name, start_size=args.start_size, recent_size=args.recent_size,
        max_sessions=args.max_sessions, state_dir=args.state_dir, api_key=args.api_key, api_keys=api_keys,
        allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
        allowed_hosts=tuple(hosts), limits=limits, shutdown_timeout=args.shutdown_timeout, rows=args.rows,
        pinned_capacity=args.pinned_capacity, sampling=sampling_config(args), aliases=tuple(args.model_alias),
        web=not args.no_web, memory=args.memory, kv_dtype=args.kv_dtype,
    )  # fmt: skip
    configure(args.log_format)
    config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.shutdown_timeout,
                            log_level="warning", limit_concurrency=args.max_connections,
                            http=guarded_h11(args.header_timeout, args.max_connections_per_client))  # fmt: skip
    page = "" if args.no_web else ", chat page at /"
    print(f"Serving on http://{args.host}:{args.port} (OpenAI API under /v1{page})", flush=True)
    engine = app.state.server.engine

    class Server_(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # End in-flight work first (streams get a shutting-down error event and [DONE], others a 503), so that
            # uvicorn's graceful wait finds the responses complete. A thread: the handler must not take a lock.
            threading.Thread(target=engine.shutdown, name="streaming-llm-shutdown", daemon=True).start()
            super().handle_exit(sig, frame)

    Server_(config).run()
