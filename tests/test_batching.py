"""Continuous batching in the server (--batch-rows): sessions decode together in one forward, and every
session gets exactly the tokens it gets from the plain one-forward-per-token engine."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from conftest import tiny_llama
from test_server import GREEDY, WINDOW, Served, chat, tiny_dir  # noqa: F401 (fixture)

from streaming_llm import StreamingSession
from streaming_llm.runtime.generation import GenerationChunk
from streaming_llm.serving.jobs import BatchingEngine, Done, Job, JobCancelled
from streaming_llm.serving.server import ChatRequest, Limits, Server, parse_body
from streaming_llm.serving.store import SessionStore

TURNS = {
    "a": ["Tell me about apples.", "And pears?", "And plums?"],
    "b": ["My code is 4711.", "What is my code?"],
    "c": ["Count to five.", "Again, backwards.", "Once more.", "Thanks."],
}


def run_sessions(server: Server, max_tokens: int) -> dict[str, list[list[int]]]:
    """Every session's turns, all sessions submitted at once (interleaved); the sampled ids per turn."""

    async def talk(name: str) -> list[list[int]]:
        replies = []
        for turn in TURNS[name]:
            body = parse_body(json.dumps({"model": "x", "messages": [{"role": "user", "content": turn}],
                                          "max_tokens": max_tokens}).encode(), ChatRequest)  # fmt: skip
            ticket = server.engine.submit(Job(name, lambda b=body: server.chat_work(b, name, True)))
            events = [e async for e in ticket.events()]
            assert isinstance(events[-1], Done), events[-1]
            replies.append([e.token_id for e in events if isinstance(e, GenerationChunk) and e.token_id is not None])
        return replies

    async def main():
        results = await asyncio.gather(*(talk(name) for name in TURNS))
        server.engine.shutdown()
        return dict(zip(TURNS, results, strict=True))

    return asyncio.run(main())


def test_three_interleaved_sessions_batched_equal_the_plain_engine(tokenizer, tmp_path):
    model = tiny_llama(vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    kwargs = dict(name="x", start_size=4, recent_size=24, max_sessions=8, state_dir=None, limits=Limits())
    plain = run_sessions(Server(model, tokenizer, **kwargs), max_tokens=12)
    batched_server = Server(model, tokenizer, **kwargs | {"state_dir": tmp_path}, batch_rows=4)
    batched = run_sessions(batched_server, max_tokens=12)
    engine = batched_server.engine
    assert isinstance(engine, BatchingEngine)
    assert batched == plain
    # Independent check: session "c" alone, in-process, gives the same ids.
    alone = StreamingSession(model, tokenizer, start_size=4, recent_size=24)
    for turn, ids in zip(TURNS["c"], plain["c"], strict=True):
        assert [p.token_id for p in alone.send(turn, 12) if p.token_id is not None] == ids
    assert engine.batched_tokens > engine.batched_steps > 0  # several sessions did share forwards
    assert sum(len(ids) for turns in plain.values() for ids in turns) > 3 * 12  # windows were crossed
    assert batched_server.slots is not None and not batched_server.slots.live  # every row given back
    # The turn saved from a row restores and continues like the session that never left one process.
    restored = SessionStore(model, tokenizer, 2, tmp_path).get("c").session
    assert restored.cache.seen_tokens == alone.cache.seen_tokens
    assert restored.chat("One more.", 12) == alone.chat("One more.", 12)


def test_four_concurrent_clients_through_uvicorn_with_batch_rows(tiny_dir):  # noqa: F811
    served = Served(tiny_dir, *GREEDY, "--batch-rows", "4", "--max-sessions", "8")
    try:
        results: dict[int, list[str]] = {}
        errors: list[BaseException] = []
        turns = ["Hello there.", "Tell me more.", "And then?"]

        def talk(i: int) -> None:
            try:
                client = served.client()
                results[i] = [chat(client, [{"role": "user", "content": f"{t} ({i})"}], session=f"s{i}",
                                   stream=i % 2 == 0, max_tokens=16) for t in turns]  # fmt: skip
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=talk, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        health = httpx.get(served.url + "/health", timeout=30).json()
        assert health["batched_tokens"] > health["batched_steps"] > 0
    finally:
        served.stop()
    from streaming_llm import load_model

    model, tokenizer = load_model(str(tiny_dir), device="cpu", dtype="float32")
    for i in range(4):  # each client got what its conversation gives alone
        session = StreamingSession(model, tokenizer, recent_size=WINDOW)
        assert results[i] == [session.chat(f"{t} ({i})", max_new_tokens=16) for t in turns]


def test_negative_batch_rows_is_refused(tokenizer):
    with pytest.raises(ValueError, match="batch_rows must be >= 0"):
        Server(tiny_llama(), tokenizer, name="x", start_size=4, recent_size=24, max_sessions=2, state_dir=None,
               limits=Limits(), batch_rows=-1)  # fmt: skip


def test_a_cancelled_batched_reply_gives_its_row_back_and_the_session_continues(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer))
    server = Server(model, tokenizer, name="x", start_size=4, recent_size=24, max_sessions=4, state_dir=None,
                    limits=Limits(), batch_rows=2)  # fmt: skip

    def body(max_tokens: int) -> ChatRequest:
        return parse_body(json.dumps({"model": "x", "messages": [{"role": "user", "content": "Go on."}],
                                      "max_tokens": max_tokens}).encode(), ChatRequest)  # fmt: skip

    async def main():
        long = server.engine.submit(Job("x", lambda: server.chat_work(body(200), "x", True)))
        other = server.engine.submit(Job("y", lambda: server.chat_work(body(200), "y", True)))
        seen = 0
        async for event in long.events():
            seen += 1
            if seen == 5:
                long.cancel("client disconnected")
            last = event
        again = server.engine.submit(Job("x", lambda: server.chat_work(body(4), "x", True)))
        ends = [last, [e async for e in other.events()][-1], [e async for e in again.events()][-1]]
        server.engine.shutdown()
        return ends

    cancelled, done_other, done_again = asyncio.run(main())
    assert isinstance(cancelled, JobCancelled)
    assert isinstance(done_other, Done) and isinstance(done_again, Done)
    assert not server.slots.live  # no row leaked
    assert server.store.live["x"].session.turns == 2  # the cancelled turn was closed, then one more
