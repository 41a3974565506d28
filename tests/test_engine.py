"""The engine loop (streaming_llm/runtime/engine.py): interleaving, order within a stream, cancel, deadline,
shutdown, spilling, and a worker thread. Expectations are independent: each stream's greedy tokens when it
runs alone on a one-row cache, fed turn by turn."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import tiny_llama

import streaming_llm
from streaming_llm import StreamingCache
from streaming_llm.runtime.engine import Engine, EngineStopped, Request

START, RECENT = 4, 12


@pytest.fixture(scope="module")
def model():
    return streaming_llm.install(tiny_llama())


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_of(model, rows: int, chunk: int = 7) -> Engine:
    cache = StreamingCache(model.config, START, RECENT, rows=rows, dtype=torch.float32, device="cpu")
    return Engine(model, cache, chunk_size=chunk)


def alone(model, turns: list[tuple[list[int], int]]) -> list[list[int]]:
    """The expectation: one stream on its own one-row engine, turn after turn (greedy)."""
    engine = engine_of(model, 1)
    stream = engine.open("alone")
    return [engine.run_to_end(engine.submit(Request(stream, p, n))).tokens for p, n in turns]


def test_prefill_chunks_interleave_with_batched_decode_and_each_stream_gets_its_own_tokens(model):
    engine = engine_of(model, 3, chunk=7)
    prompts = {"a": ids(30, 20), "b": ids(3, 21), "c": ids(17, 22)}
    streams = {name: engine.open(name) for name in prompts}
    requests = {name: engine.submit(Request(streams[name], prompts[name], 25)) for name in ("b", "c")}
    while len(requests["c"].tokens) < 2:  # b and c are decoding
        engine.step()
    requests["a"] = engine.submit(Request(streams["a"], prompts["a"], 25))
    during = []
    while not requests["a"].tokens:  # "a" needs 5 chunks of 7: b and c decode one token per chunk meanwhile
        engine.step()
        during.append(len(requests["b"].tokens))
    assert len(during) >= 5 and during == sorted(set(during))  # b got a token at every step of a's prefill
    while not all(r.done for r in requests.values()):
        engine.step()
    assert engine.stepper.max_batch == 3  # all three decoded in one forward
    follow = engine.run_to_end(engine.submit(Request(streams["a"], ids(9, 30), 10)))
    assert [requests["a"].tokens, follow.tokens] == alone(model, [(prompts["a"], 25), (ids(9, 30), 10)])
    for name in ("b", "c"):
        assert [requests[name].tokens] == alone(model, [(prompts[name], 25)])
        assert requests[name].finish_reason == "length"


def test_requests_of_one_stream_run_in_order(model):
    engine = engine_of(model, 2)
    stream = engine.open("s")
    first, second = (engine.submit(Request(stream, ids(5, s), 6)) for s in (1, 2))
    engine.step()
    assert first._phase != "waiting" and second._phase == "waiting"  # one request of a stream at a time
    engine.run_to_end(second)
    assert first.done and [first.tokens, second.tokens] == alone(model, [(ids(5, 1), 6), (ids(5, 2), 6)])


def test_cancel_keeps_what_was_generated_and_the_next_request_continues_after_it(model):
    engine = engine_of(model, 2)
    stream = engine.open("s")
    request = engine.submit(Request(stream, ids(6, 3), 50))
    while len(request.tokens) < 4:
        engine.step()
    request.cancel()
    engine.run_to_end(request)
    assert request.finish_reason == "cancelled" and 4 <= len(request.tokens) < 50
    after = engine.run_to_end(engine.submit(Request(stream, [5], 4)))
    # The cancelled tokens stay in the stream (the last one owed to the next request): as if it had been asked for.
    [expected] = alone(model, [(ids(6, 3) + request.tokens + [5], 4)])
    assert after.tokens == expected


def test_deadline_ends_a_request_and_a_waiting_one(model):
    engine = engine_of(model, 1)
    busy, late = engine.open("busy"), engine.open("late")
    slow = engine.submit(Request(busy, ids(4, 5), None, deadline=time.monotonic() + 0.3))
    waiting = engine.submit(Request(late, ids(4, 6), 3, deadline=time.monotonic() + 0.2))  # no row until slow ends
    engine.run_to_end(slow)
    engine.run_to_end(waiting)
    assert slow.finish_reason == "timeout" and slow.tokens
    assert waiting.finish_reason == "timeout" and waiting.tokens == [] and waiting.prompt_tokens == 0


def test_shutdown_cancels_everything_and_refuses_new_requests(model):
    engine = engine_of(model, 2)
    streams = [engine.open(f"s{i}") for i in range(3)]
    running = [engine.submit(Request(s, ids(5, 7), None)) for s in streams]
    engine.step()
    engine.shutdown()
    with pytest.raises(EngineStopped):
        engine.submit(Request(streams[0], [1], 1))
    while not engine.idle:
        engine.step()
    assert all(r.done and r.finish_reason == "shutdown" for r in running)


def test_tail_is_fed_after_generation_however_it_ends(model):
    """``on_finish`` returns tokens the engine feeds after generation: the stream has seen them afterwards."""
    engine = engine_of(model, 1)
    stream = engine.open("s")
    request = engine.run_to_end(engine.submit(Request(stream, ids(5, 8), 3, on_finish=lambda r: [r.tokens[-1], 9])))
    seen = engine.row_stats(stream).seen_tokens
    assert seen == 5 + 2 + 2  # prompt, two fed generated tokens, the tail (the last token and 9)
    [expected] = alone(model, [(ids(5, 8) + request.tokens + [9], 1)])
    assert engine.run_to_end(engine.submit(Request(stream, [], 1))).tokens == expected


def test_a_worker_thread_serves_requests_submitted_from_other_threads(model):
    engine = engine_of(model, 4)
    stop = threading.Event()
    worker = threading.Thread(target=engine.serve_forever, args=(stop,))
    worker.start()
    try:
        streams = [engine.open(f"s{i}") for i in range(6)]  # more streams than rows: spills on the way
        requests = [engine.submit(Request(s, ids(8, 40 + i), 5)) for i, s in enumerate(streams)]
        assert all(r.wait(60) for r in requests)
        more = [engine.submit(Request(s, [3], 3)) for s in streams]
        assert all(r.wait(60) for r in more)
    finally:
        stop.set()
        worker.join(10)
    assert not worker.is_alive() and engine.spills >= 2 and engine.restores >= 2
    for i in range(6):
        assert [requests[i].tokens, more[i].tokens] == alone(model, [(ids(8, 40 + i), 5), ([3], 3)])


def test_bad_requests_are_refused_before_anything_is_fed(model):
    engine = engine_of(model, 1)
    stream = engine.open("s")
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="max_new_tokens"):
            engine.submit(Request(stream, [1, 2], bad))

    def failing():
        raise ValueError("this turn is refused")

    refused = engine.run(engine.submit(Request(stream, failing, 3)))
    for _ in refused:
        pass
    assert stream.stats is None or stream.stats.seen_tokens == 0
    with pytest.raises(ValueError, match="chunk_size"):
        Engine(model, StreamingCache(model.config, START, RECENT, rows=1, dtype=torch.float32, device="cpu"),
               chunk_size=0)  # fmt: skip
