"""An OpenAI-compatible HTTP server over streaming sessions (``streaming-llm serve``).

Needs the optional dependencies ``fastapi`` and ``uvicorn`` (``pip install 'streaming-llm[server]'``).

Thin by design: handlers parse and validate requests, then hand work to one worker thread, the only
code that touches the model and the caches. ``/v1/chat/completions`` requests are matched to live
sessions by a hash chain of their messages: a request that extends a conversation the server has
already seen continues that session and feeds only the new message (history is never re-processed);
anything else starts a new session. At most ``max_sessions`` are kept (least recently used first out),
so memory is bounded by ``max_sessions`` fixed-size caches.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(both with ``"stream": true`` as server-sent events).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .generation import GenerationChunk, stream_generate
from .sampling import SamplingConfig
from .session import StreamingSession

FINISH = {"eos": "stop", "stop": "stop", "length": "length", None: "stop"}


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    max_tokens: int | None = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    model: str | None = None

    def config(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)


def _chain(digest: str, message: Message) -> str:
    return hashlib.sha256(f"{digest}\x00{message.role}\x00{message.content}".encode()).hexdigest()


class SessionPool:
    """Live sessions keyed by the hash chain of the messages they have processed (LRU-bounded)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, start_size: int,
                 recent_size: int, max_sessions: int):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.start_size, self.recent_size, self.max_sessions = start_size, recent_size, max_sessions
        self.sessions: OrderedDict[str, StreamingSession] = OrderedDict()
        self.resumed = 0  # requests that continued a live session

    def session_for(self, messages: list[Message]) -> tuple[StreamingSession, str]:
        """The session that has seen ``messages[:-1]`` (resumed, or rebuilt), and their digest."""
        digest = ""
        for message in messages[:-1]:
            digest = _chain(digest, message)
        if digest in self.sessions:
            self.resumed += 1
            return self.sessions.pop(digest), digest
        system = messages[0].content if messages[0].role == "system" else None
        session = StreamingSession(
            self.model, self.tokenizer, system, start_size=self.start_size, recent_size=self.recent_size
        )
        for message in messages[1 if system is not None else 0 : -1]:
            session.add_message(message.role, message.content)
        return session, digest

    def keep(self, session: StreamingSession, digest: str) -> None:
        self.sessions[digest] = session
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)


class Engine:
    """The single worker thread that owns the model, and what it runs."""

    def __init__(self, pool: SessionPool, name: str):
        self.pool, self.name = pool, name
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streaming-llm-worker")

    def chat(self, request: ChatRequest) -> Iterator[GenerationChunk | dict]:
        """Pieces of the reply, then a final usage dict; the session is kept for the next turn."""
        last = request.messages[-1]
        if last.role != "user":
            raise ValueError("The last message must come from the user.")
        session, digest = self.pool.session_for(request.messages)
        session.use_sampling(request.config())
        seen, text, piece = session.cache.seen_tokens, [], None
        for piece in session.send(last.content, request.max_tokens, request.stops()):
            text.append(piece.text)
            yield piece
        reply = Message(role="assistant", content="".join(text))
        self.pool.keep(session, _chain(_chain(digest, last), reply))
        completion = piece.generated if piece else 0
        yield {"prompt_tokens": session.cache.seen_tokens - seen - completion, "completion_tokens": completion}

    def complete(self, request: CompletionRequest) -> Iterator[GenerationChunk | dict]:
        pool, piece = self.pool, None
        prompt_tokens = len(pool.tokenizer(request.prompt, add_special_tokens=False)["input_ids"])
        for piece in stream_generate(
            pool.model, pool.tokenizer, request.prompt, start_size=pool.start_size, recent_size=pool.recent_size,
            max_new_tokens=request.max_tokens, sampling=request.config(), stop=request.stops(),
        ):  # fmt: skip
            yield piece
        yield {"prompt_tokens": prompt_tokens, "completion_tokens": piece.generated if piece else 0}


def create_app(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, name: str = "streaming-llm",
               start_size: int = 4, recent_size: int = 2000, max_sessions: int = 8):  # fmt: skip
    """The FastAPI application (``fastapi`` is an optional dependency: ``pip install 'streaming-llm[server]'``)."""
    engine = Engine(SessionPool(model, tokenizer, start_size, recent_size, max_sessions), name)
    app = FastAPI(title="streaming-llm", description=__doc__)
    app.state.engine = engine

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)

    async def parse(request: Request, schema: type[BaseModel]):
        try:
            return schema.model_validate(await request.json())
        except json.JSONDecodeError as problem:
            raise ValueError(f"The body is not valid JSON: {problem.msg}.") from None
        except ValidationError as problem:
            details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in problem.errors())
            raise ValueError(f"Invalid request: {details}.") from None

    async def respond(request: Request, schema: type[BaseModel], kind: str):
        try:
            body = await parse(request, schema)
        except ValueError as problem:
            return error(400, str(problem))
        run = engine.chat if kind == "chat" else engine.complete
        ident, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            events = _events(engine, run, body, ident, created, kind)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            pieces = await asyncio.get_running_loop().run_in_executor(engine.executor, lambda: list(run(body)))
        except ValueError as problem:
            return error(400, str(problem))
        usage, pieces = pieces[-1], pieces[:-1]
        text = "".join(p.text for p in pieces)
        finish = FINISH[pieces[-1].finish_reason if pieces else None]
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text})
        return {
            "id": ident, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
            "model": engine.name, "choices": [choice],
            "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
        }  # fmt: skip

    @app.get("/health")
    def health():
        return {"status": "ok", "sessions": len(engine.pool.sessions), "resumed": engine.pool.resumed}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, ChatRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, CompletionRequest, "completion")

    return app


async def _events(engine: Engine, run, body, ident: str, created: int, kind: str):
    """Server-sent events: pieces as the worker thread produces them, then ``[DONE]``."""
    loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    end = object()

    def work():
        try:
            for piece in run(body):
                if cancelled.is_set():  # the client went away: stop between tokens
                    break
                loop.call_soon_threadsafe(queue.put_nowait, piece)
        except ValueError as problem:
            loop.call_soon_threadsafe(queue.put_nowait, {"error": str(problem)})
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, end)

    def event(delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"delta": delta} if kind == "chat" else {"text": delta.get("content", "")})
        chunk = {"id": ident, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                 "created": created, "model": engine.name, "choices": [choice]}  # fmt: skip
        return f"data: {json.dumps(chunk)}\n\n"

    future = loop.run_in_executor(engine.executor, work)
    try:
        if kind == "chat":
            yield event({"role": "assistant"})
        while (item := await queue.get()) is not end:
            if isinstance(item, dict):
                if "error" in item:
                    yield f"data: {json.dumps({'error': {'message': item['error']}})}\n\n"
                continue
            if item.text:
                yield event({"content": item.text})
            if item.finish_reason:
                yield event({}, FINISH[item.finish_reason])
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()
        await future
